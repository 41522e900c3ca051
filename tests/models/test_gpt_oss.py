"""gpt-oss (gpt_oss, issue 18) against HF transformers (float32) on tiny random checkpoints:
attention sinks, sliding layers whose window the prompt and the generation outrun, yarn RoPE,
the biased top-k router and the clamped SwiGLU experts, stored fused (transformers' layout) or
as MXFP4 blocks + scales (OpenAI's), each expert a unit of its own; and the MXFP4 kernels
against gguf-py's and transformers' dequantization."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest

from stream_run.engine import Engine, EngineConfig
from stream_run.kernels import available_backends, mxfp4, mxfp4_kernels
from stream_run.loaders import FormatError, MissingTensorError, layer_key
from stream_run.models import gpt_oss, open_model
from tests import model_checks
from tests.hf_reference import hf_greedy, hf_logits
from tests.tiny_models import VOCAB, write_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = [5, 17, 42, 99, 3, 250, 7, 11]
N_NEW = 32
N_EXPERTS = 8
BACKENDS = ["numpy"] + (["mlx"] if "mlx" in available_backends() else [])
YARN = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              num_local_experts=N_EXPERTS, num_experts_per_tok=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=0, eos_token_id=2,
              pad_token_id=None, rope_parameters=YARN)
CONFIGS = {
    # layers 0 and 2 slide over 6 keys: the 24-token logits prompt and the 40 tokens of
    # generation outrun them; a low swiglu_limit makes the clamps bite
    "sliding": dict(sliding_window=6, swiglu_limit=0.6),
    "full": dict(layer_types=["full_attention"] * 3, num_experts_per_tok=3,
                 rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
}


def make_model(seed: int = 0, **overrides):
    """A random GptOss with every bias and sink nonzero (HF initializes most biases to 0)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.GptOssConfig(**{**COMMON, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks")):
                p.copy_(torch.randn_like(p) * (1.0 if name.endswith("sinks") else 0.3))
    return model


def write_oss(path, seed: int = 0, **overrides):
    path.mkdir(parents=True, exist_ok=True)
    model = make_model(seed, **overrides)
    model.save_pretrained(str(path), safe_serialization=True)
    write_tokenizer(path, json.loads((path / "config.json").read_text()))
    return model


def to_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(out, in) float32 -> HF's blocks (out, in/32, 16), scales (out, in/32): gguf-py's MXFP4
    quantizer, its ggml nibble order rewritten to HF's (element 2j low, 2j + 1 high)."""
    from gguf import GGMLQuantizationType, quants

    out, n_in = w.shape
    ggml = quants.quantize(w, GGMLQuantizationType.MXFP4).reshape(out, n_in // 32, 17)
    codes = np.concatenate([ggml[..., 1:] & 15, ggml[..., 1:] >> 4], axis=-1)  # element order
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8), ggml[..., 0].copy()


def write_mxfp4(path, seed: int = 0, **overrides):
    """OpenAI's layout: each layer's experts as gate_up_proj_blocks (E, 2I, H/32, 16) and
    _scales, down_proj likewise, quant_method mxfp4. Returns the HF model holding the weights
    those blocks dequantize to (transformers' own dequantizer)."""
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    model = write_oss(path, seed, **overrides)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        fused = state.pop(name).numpy()  # (E, in, out)
        packed = [to_mxfp4(np.ascontiguousarray(e.T)) for e in fused]
        blocks = torch.from_numpy(np.stack([b for b, _ in packed]))
        scales = torch.from_numpy(np.stack([s for _, s in packed]))
        state[f"{name}_blocks"], state[f"{name}_scales"] = blocks, scales
        model.state_dict()[name].copy_(convert_moe_packed_tensors(blocks, scales,
                                                                  dtype=torch.float32))
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4",
                                  "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (path / "config.json").write_text(json.dumps(cfg))
    return model


def run_engine(path, backend: str = "numpy", budget: int | None = None):
    return model_checks.run_engine(path, PROMPT, N_NEW, backend, budget)


def check_against(model, path, backend: str = "numpy") -> None:
    logits, tokens, _, _ = run_engine(path, backend)
    np.testing.assert_allclose(logits, hf_logits(model, PROMPT * 3), rtol=1e-4, atol=1e-4)
    assert tokens == hf_greedy(model, PROMPT, N_NEW)


@pytest.mark.reference
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_gpt_oss_matches_transformers(tmp_path, config, backend):
    check_against(write_oss(tmp_path, **CONFIGS[config]), tmp_path, backend)


@pytest.mark.reference
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_checkpoint_matches_transformers_on_its_values(tmp_path, backend):
    """A bf16 checkpoint (16-bit fused experts, stored (in, out)) against HF float32 on the
    same bf16 values."""
    import copy

    model = make_model(**CONFIGS["sliding"])
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(str(tmp_path),
                                                            safe_serialization=True)
    write_tokenizer(tmp_path, json.loads((tmp_path / "config.json").read_text()))
    with torch.no_grad():  # the parameters only: RoPE's inv_freq buffer stays float32
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    check_against(model, tmp_path, backend)


@pytest.mark.reference
def test_sinks_and_sliding_layers_are_what_makes_it_match(tmp_path):
    """The same checkpoint read with the sinks zeroed, or every layer full, leaves HF's
    logits: both features are exercised by the reference test."""
    model = write_oss(tmp_path, **CONFIGS["sliding"])
    ref = hf_logits(model, PROMPT * 3)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "layer_types": ["full_attention"]
                                                      * 3}))
    assert np.abs(run_engine(tmp_path)[0] - ref).max() > 1e-2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _edit(tmp_path, lambda w: w.update({k: np.zeros_like(v) for k, v in w.items()
                                        if k.endswith("sinks")}))
    assert np.abs(run_engine(tmp_path)[0] - ref).max() > 1e-2


@pytest.mark.reference
@pytest.mark.parametrize("backend", BACKENDS)
def test_mxfp4_experts_match_transformers(tmp_path, backend):
    """Experts as MXFP4 blocks, computed as stored, equal HF on what they dequantize to."""
    model = write_mxfp4(tmp_path, **CONFIGS["sliding"])
    index = open_model(str(tmp_path)).index
    unit = index.units[gpt_oss.expert_key(1, 5)]
    assert sorted(unit.tensors) == ["down_proj_bias", "down_proj_blocks", "down_proj_scales",
                                    "gate_up_proj_bias", "gate_up_proj_blocks",
                                    "gate_up_proj_scales"]
    assert unit.tensors["gate_up_proj_blocks"].dtype == "U8"
    check_against(model, tmp_path, backend)


@pytest.mark.reference
def test_tiled_prefill_and_concurrent_requests_give_the_tokens_of_single_runs(tmp_path):
    """A prompt in row tiles of 5 (across the sliding layers' window of 6) computes HF's
    logits; requests decoded together in shared passes give the tokens each gives alone."""
    from stream_run.engine import GenerationParams

    model = write_oss(tmp_path, **CONFIGS["sliding"])
    prompts = [PROMPT, PROMPT[::-1], PROMPT[2:]]

    async def go():
        async with await Engine.open(str(tmp_path), EngineConfig(backend="numpy",
                                                                  prefill_chunk=5)) as engine:
            logits = await engine.logits(PROMPT * 3)
            params = GenerationParams(max_tokens=12, ignore_eos=True)
            outs = await asyncio.gather(*(engine.complete(p, params) for p in prompts))
            return logits, [o.token_ids for o in outs], max(engine.batcher.passes,
                                                            key=lambda r: r.n_seqs).n_seqs

    logits, together, widest = asyncio.run(go())
    np.testing.assert_allclose(logits, hf_logits(model, PROMPT * 3), rtol=1e-4, atol=1e-4)
    assert widest >= 2
    assert together == [hf_greedy(model, p, 12) for p in prompts]


def test_each_expert_is_a_byte_range_of_the_fused_tensors(tmp_path):
    write_oss(tmp_path)
    units = open_model(str(tmp_path)).index.units
    experts = [k for k in units if ".mlp.experts." in k]
    assert experts == [gpt_oss.expert_key(i, e) for i in range(3) for e in range(N_EXPERTS)]
    for i in range(3):
        refs = [units[gpt_oss.expert_key(i, e)].tensors["gate_up_proj"] for e in range(3)]
        assert [r.shape for r in refs] == [(64, 64)] * 3
        assert refs[1].offset - refs[0].offset == refs[2].offset - refs[1].offset == 64 * 64 * 4
    dense = units[layer_key(0)].tensors
    assert {"self_attn.sinks", "mlp.router.weight", "mlp.router.bias",
            "self_attn.o_proj.bias"} <= set(dense)
    assert not any("experts" in n for n in dense)


@pytest.mark.parametrize("layout", ["fused", "mxfp4"])
def test_streams_under_a_budget_with_the_tokens_of_a_resident_run(tmp_path, layout):
    (write_mxfp4 if layout == "mxfp4" else write_oss)(tmp_path, **CONFIGS["sliding"])
    _, resident, resident_read, model_bytes = run_engine(tmp_path)
    assert resident_read <= model_bytes
    for budget in (model_bytes // 2, "min"):
        if budget == "min":
            budget = asyncio.run(_min_budget(tmp_path))
            assert budget < model_bytes // 2
        _, streamed, bytes_read, _ = run_engine(tmp_path, budget=budget)
        assert streamed == resident
        assert bytes_read > model_bytes


async def _min_budget(path) -> int:
    async with await Engine.open(str(path), EngineConfig(backend="numpy")) as engine:
        return engine.min_budget_bytes


@pytest.mark.reference
def test_converts_with_one_file_per_expert(tmp_path):
    """stream-convert --bits 8 writes each expert unit to a file of its own (its tensors
    under mlp.experts.{e}.*; the experts stay as stored, the attention linears are
    quantized); the engine on it equals HF on the weights the packed files dequantize to."""
    model = write_oss(tmp_path / "hf", **CONFIGS["sliding"])
    state, packed = model_checks.convert_8bit_reference(model, tmp_path / "hf", tmp_path / "q8")
    assert "model.layers.0.self_attn.q_proj.scales" in packed
    assert (tmp_path / "q8" / "model-layers.2.mlp.experts.7.safetensors").exists()
    model.load_state_dict(state)
    check_against(model, tmp_path / "q8")


def test_convert_names_mxfp4_experts_and_writes_nothing(tmp_path):
    from stream_run.convert.convert import convert_model
    from stream_run.engine.errors import ConvertError

    write_mxfp4(tmp_path / "hf")
    with pytest.raises(ConvertError, match="MXFP4 experts .* are computed as stored"):
        convert_model(str(tmp_path / "hf"), str(tmp_path / "q4"), bits=4, progress=False)
    assert not (tmp_path / "q4").exists()


# -- the MXFP4 kernels against independent dequantizers -----------------------------------------
def _random_mxfp4(rng, out: int = 12, n_in: int = 128):
    blocks = rng.integers(0, 256, (out, n_in // 32, 16), dtype=np.uint8)
    scales = rng.integers(110, 135, (out, n_in // 32), dtype=np.uint8)
    scales[0, :4] = [0, 1, 2, 254]  # subnormal and largest exponents
    return blocks, scales


def _ggml_bytes(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """HF's pair as ggml MXFP4 blocks (exponent, then element j low / j + 16 high nibbles)."""
    codes = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(*blocks.shape[:2], 32)
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    return np.concatenate([scales[..., None], qs], axis=-1).astype(np.uint8)


def test_mxfp4_dequantize_equals_gguf_and_transformers_bit_for_bit():
    from gguf import GGMLQuantizationType, quants
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _random_mxfp4(np.random.default_rng(0))
    ours = mxfp4_kernels.dequantize_rows(mxfp4.from_hf(blocks, scales))
    ggml = _ggml_bytes(blocks, scales)
    with np.errstate(over="ignore"):
        ref = quants.dequantize(ggml.reshape(12, -1), GGMLQuantizationType.MXFP4)
    assert np.array_equal(ours.view(np.uint32), ref.reshape(ours.shape).view(np.uint32))
    from_ggml = mxfp4_kernels.dequantize_rows(mxfp4.from_ggml(ggml, ours.shape))
    assert np.array_equal(from_ggml.view(np.uint32), ours.view(np.uint32))
    hf = convert_moe_packed_tensors(torch.from_numpy(blocks[None]),
                                    torch.from_numpy(scales[None]), dtype=torch.float32)
    finite = np.isfinite(ours)
    assert np.array_equal(hf[0].T.numpy()[finite], ours[finite])
    rows = np.array([3, 0, 11])
    assert np.array_equal(mxfp4_kernels.dequantize_rows(mxfp4.from_hf(blocks, scales), rows),
                          ours[rows])


@pytest.mark.parametrize("n_rows", [1, 3, 7, 8, 13])
@pytest.mark.parametrize("layout", ["hf", "ggml"])
def test_mxfp4_linear_equals_dequantized_matmul(n_rows, layout):
    """The vector kernel (<= 8 rows of x, by 4, 2 and 1: 7 takes each; 37 weight rows: tiles
    of 16, 16 and 5, each in calls of several rows then single ones),
    the plain-numba reference, and dequantized tiles into BLAS (13 rows)."""
    rng = np.random.default_rng(n_rows)
    blocks, scales = _random_mxfp4(rng, out=37)
    scales[0, :4] = 127  # finite products
    w = mxfp4.from_hf(blocks, scales) if layout == "hf" \
        else mxfp4.from_ggml(_ggml_bytes(blocks, scales), (37, 128))
    x = rng.standard_normal((n_rows, 128)).astype(np.float32)
    ref = x.astype(np.float64) @ mxfp4_kernels.dequantize_rows(w).T.astype(np.float64)
    np.testing.assert_allclose(mxfp4_kernels.linear(x, w), ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(mxfp4_kernels.matvec_reference(x, w), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif("mlx" not in BACKENDS, reason="no MLX")
def test_mlx_prepares_mxfp4_as_its_mxfp4_mode():
    from stream_run.kernels import get_backend

    blocks, scales = _random_mxfp4(np.random.default_rng(1))
    scales[0, :4] = 127
    w = mxfp4.from_hf(blocks, scales)
    ops = get_backend("mlx")
    x = np.random.default_rng(2).standard_normal((2, 128)).astype(np.float32)
    y = ops.to_numpy(ops.linear(ops.from_numpy(x), ops.prepare(
        {"w_blocks": _Raw(blocks, "U8"), "w_scales": _Raw(scales, "U8")}, None)["w"]))
    np.testing.assert_allclose(y, x @ mxfp4_kernels.dequantize_rows(w).T, rtol=1e-5, atol=1e-4)


class _Raw:
    def __init__(self, a: np.ndarray, dtype: str) -> None:
        self.data, self.dtype, self.shape = a.view(np.uint8).reshape(-1), dtype, a.shape


# -- bad input ---------------------------------------------------------------------------------
def _edit(path, fn) -> None:
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(path / "model.safetensors"))
    fn(weights)
    save_file(weights, str(path / "model.safetensors"))


def _config(path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


ROUTER = "model.layers.1.mlp.router.weight"
FUSED = "model.layers.2.mlp.experts.down_proj"
BAD_INPUT = {
    "layer_types_of_the_wrong_length": (lambda p: _config(p, layer_types=["full_attention"]),
                                        FormatError, ["'layer_types'", "3 layers"]),
    "top_k_above_the_expert_count": (lambda p: _config(p, num_experts_per_tok=9),
                                     FormatError, ["'num_experts_per_tok'", "num_local_experts"]),
    "unknown_quant_method": (lambda p: _config(p, quantization_config={"quant_method": "fp8"}),
                             FormatError, ["quant_method", "'fp8'"]),
    "fewer_experts_in_config": (lambda p: _config(p, num_local_experts=6),
                                FormatError, ["'model.layers.0.mlp.experts.", "expected [6, ",
                                              "num_local_experts"]),
    "fused_experts_of_the_wrong_shape": (
        lambda p: _edit(p, lambda w: w.update({FUSED: w[FUSED][:-1]})),
        FormatError, ["'model.layers.2.mlp.experts.down_proj'", "[7, 32, 64]", "[8, 32, 64]"]),
    "router_of_the_wrong_shape": (
        lambda p: _edit(p, lambda w: w.update({ROUTER: w[ROUTER][:-1]})),
        FormatError, ["'mlp.router.weight'", "'layers.1'", "[7, 64]"]),
    "missing_sinks": (lambda p: _edit(p, lambda w: w.pop("model.layers.0.self_attn.sinks")),
                      MissingTensorError, ["'layers.0'", "'self_attn.sinks'"]),
    "mxfp4_config_on_unquantized_experts": (
        lambda p: _config(p, quantization_config={"quant_method": "mxfp4"}),
        FormatError, ["'model.layers.0.mlp.experts.", "quantization_config"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_gpt_oss_input_is_named(tmp_path, case):
    write_oss(tmp_path)
    edit, error, words = BAD_INPUT[case]
    edit(tmp_path)
    with pytest.raises(error) as exc:
        open_model(str(tmp_path))
    for word in words:
        assert word in str(exc.value)


@pytest.mark.parametrize("case", ["layer_types_of_the_wrong_length",
                                  "fused_experts_of_the_wrong_shape"])
def test_bad_gpt_oss_input_exits_2_with_one_line(tmp_path, case):
    write_oss(tmp_path)
    edit, _, words = BAD_INPUT[case]
    edit(tmp_path)
    run = subprocess.run([sys.executable, "-m", "stream_run.cli.run", str(tmp_path), "-p", "hi"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    for word in words:
        assert word in run.stderr


# -- GGUF (llama.cpp's gpt-oss) ----------------------------------------------------------------
GGUF_LINEAR = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
               "mlp.router": "ffn_gate_inp"}


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's gpt-oss names and layout: gate_up_proj's
    interleaved columns apart as ffn_gate_exps and ffn_up_exps (E, I, H), down (E, H, I)."""
    out = {}
    for name, val in model.state_dict().items():
        arr = val.detach().numpy().astype(np.float32)
        top = {"model.embed_tokens.weight": "token_embd.weight",
               "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
        if name in top:
            out[top[name]] = arr
            continue
        _, _, i, rest = name.split(".", 3)
        if rest == "mlp.experts.gate_up_proj":  # (E, H, 2I)
            out[f"blk.{i}.ffn_gate_exps.weight"] = np.ascontiguousarray(
                arr[:, :, 0::2].transpose(0, 2, 1))
            out[f"blk.{i}.ffn_up_exps.weight"] = np.ascontiguousarray(
                arr[:, :, 1::2].transpose(0, 2, 1))
        elif rest == "mlp.experts.gate_up_proj_bias":
            out[f"blk.{i}.ffn_gate_exps.bias"] = np.ascontiguousarray(arr[:, 0::2])
            out[f"blk.{i}.ffn_up_exps.bias"] = np.ascontiguousarray(arr[:, 1::2])
        elif rest == "mlp.experts.down_proj":  # (E, I, H)
            out[f"blk.{i}.ffn_down_exps.weight"] = np.ascontiguousarray(arr.transpose(0, 2, 1))
        elif rest == "mlp.experts.down_proj_bias":
            out[f"blk.{i}.ffn_down_exps.bias"] = arr
        elif rest == "self_attn.sinks":
            out[f"blk.{i}.attn_sinks.weight"] = arr
        else:
            module, kind = rest.rsplit(".", 1)
            out[f"blk.{i}.{GGUF_LINEAR[module]}.{kind}"] = arr
    return out


def write_gguf(path, model, edit=None, meta_edit: dict | None = None) -> None:
    """model as llama.cpp's gpt-oss GGUF with MXFP4 experts (the rest F32); the model's
    experts are then set to what the file's blocks dequantize to (gguf-py)."""
    import gguf

    QT = gguf.GGMLQuantizationType
    cfg, arch = model.config, "gpt-oss"
    w = gguf.GGUFWriter(str(path), arch)
    meta = {"block_count": cfg.num_hidden_layers, "context_length": 256,
            "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
            "attention.head_count": cfg.num_attention_heads,
            "attention.head_count_kv": cfg.num_key_value_heads,
            "attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim,
            "expert_count": N_EXPERTS, "expert_used_count": cfg.num_experts_per_tok,
            "expert_feed_forward_length": cfg.intermediate_size,
            "attention.sliding_window": cfg.sliding_window,
            "rope.scaling.original_context_length": YARN["original_max_position_embeddings"],
            **(meta_edit or {})}
    for key, val in meta.items():
        w.add_uint32(f"{arch}.{key}", val)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", YARN["rope_theta"])
    w.add_string(f"{arch}.rope.scaling.type", "yarn")
    w.add_float32(f"{arch}.rope.scaling.factor", YARN["factor"])
    tokens = ["<s>", "<pad>", "</s>"] + [f"t{i}" for i in range(VOCAB - 3)]
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "default")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.merges", [])
    w.add_array("tokenizer.ggml.token_type", [3, 3, 3] + [1] * (VOCAB - 3))
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    tensors = gguf_tensors(model)
    if edit is not None:
        edit(tensors)
    held = {}
    for name, arr in tensors.items():
        if name.endswith("_exps.weight"):
            data = gguf.quants.quantize(arr, QT.MXFP4)
            w.add_tensor(name, data, raw_dtype=QT.MXFP4)
            arr = gguf.quants.dequantize(data, QT.MXFP4).reshape(arr.shape)
        else:
            w.add_tensor(name, arr)
        held[name] = arr
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with torch.no_grad():
        for i in range(cfg.num_hidden_layers):
            experts = model.model.layers[i].mlp.experts
            if f"blk.{i}.ffn_gate_exps.weight" not in held:
                continue
            gate_up = experts.gate_up_proj.numpy()
            gate_up[:, :, 0::2] = held[f"blk.{i}.ffn_gate_exps.weight"].transpose(0, 2, 1)
            gate_up[:, :, 1::2] = held[f"blk.{i}.ffn_up_exps.weight"].transpose(0, 2, 1)
            experts.down_proj.copy_(torch.from_numpy(
                held[f"blk.{i}.ffn_down_exps.weight"].transpose(0, 2, 1).copy()))


@pytest.mark.reference
@pytest.mark.parametrize("backend", BACKENDS)
def test_gguf_mxfp4_matches_transformers(tmp_path, backend):
    """llama.cpp's layout: gate and up apart, each expert a byte range of the stacked MXFP4
    tensors, computed on the file's blocks; HF float32 on what they dequantize to."""
    model = make_model(**CONFIGS["sliding"])
    write_gguf(tmp_path / "m.gguf", model)
    index = open_model(str(tmp_path / "m.gguf")).index
    unit = index.units[gpt_oss.expert_key(2, 7)]
    assert sorted(unit.tensors) == ["down_proj", "down_proj_bias", "gate_proj",
                                    "gate_proj_bias", "up_proj", "up_proj_bias"]
    gate = unit.tensors["gate_proj"]
    assert gate.dtype == "MXFP4" and gate.nbytes == 32 * 64 // 32 * 17
    assert gate.offset == index.units[gpt_oss.expert_key(2, 6)].tensors["gate_proj"].offset \
        + gate.nbytes
    # the file lost swiglu_limit (llama.cpp keeps 7.0 in its code): HF's default here
    model.config.swiglu_limit = 7.0
    for layer in model.model.layers:
        layer.mlp.experts.limit = 7.0
    logits, tokens, _, _ = model_checks.run_engine(tmp_path / "m.gguf", PROMPT, N_NEW, backend)
    np.testing.assert_allclose(logits, hf_logits(model, PROMPT * 3), rtol=1e-4, atol=1e-4)
    assert tokens == hf_greedy(model, PROMPT, N_NEW)


GGUF_BAD = {
    "expert_count_above_the_router": (dict(meta_edit={"expert_count": 9}), FormatError,
                                      ["blk.0.ffn_gate_exps.weight", "[9, 32, 64]"]),
    "top_k_above_the_expert_count": (dict(meta_edit={"expert_used_count": 9}), FormatError,
                                     ["gpt-oss.expert_used_count", "'num_experts_per_tok'"]),
    "missing_sinks": (dict(edit=lambda t: t.pop("blk.1.attn_sinks.weight")), MissingTensorError,
                      ["'self_attn.sinks'", "blk.1.attn_sinks.weight"]),
}


@pytest.mark.parametrize("case", sorted(GGUF_BAD))
def test_bad_gguf_is_named(tmp_path, case):
    kwargs, error, words = GGUF_BAD[case]
    write_gguf(tmp_path / "m.gguf", make_model(**CONFIGS["sliding"]), **kwargs)
    with pytest.raises(error) as exc:
        open_model(str(tmp_path / "m.gguf"))
    for word in words:
        assert word in str(exc.value)


# -- stream-bench synth --arch gpt_oss -----------------------------------------------------------
def test_synth_named_shapes_have_the_published_sizes():
    from stream_run.bench.synth import SynthSpec

    small = SynthSpec.from_shape("gpt-oss-20b", arch="gpt_oss", dtype="mxfp4")
    assert (small.num_experts, small.num_experts_per_tok, small.num_hidden_layers,
            small.intermediate_size, small.head_dim) == (32, 4, 24, 2880, 64)
    assert 13.7e9 < small.nbytes < 13.8e9  # openai/gpt-oss-20b's safetensors: 13.76 GB
    big = SynthSpec.from_shape("gpt-oss-120b", arch="gpt_oss", dtype="mxfp4")
    assert 65.0e9 < big.nbytes < 65.5e9
    with pytest.raises(ValueError, match="--dtype mxfp4 .* needs --arch gpt_oss"):
        SynthSpec.from_shape("tiny-moe", arch="qwen3_moe", dtype="mxfp4")
    with pytest.raises(ValueError, match="--router-skew is not supported for --arch gpt_oss"):
        SynthSpec.from_shape("tiny-moe", arch="gpt_oss", router_skew=1.0)
    with pytest.raises(ValueError, match="--expert-size must equal --intermediate-size"):
        SynthSpec(arch="gpt_oss", num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=32)


def _engine_logits(path, ids):
    async def go():
        async with await Engine.open(str(path), EngineConfig(backend="numpy")) as eng:
            return await eng.logits(ids)
    return asyncio.run(go())


@pytest.mark.reference
def test_synth_runs_in_the_engine_as_in_transformers(tmp_path):
    """The f32 synth is the fused layout transformers loads itself; the mxfp4 one is OpenAI's
    (blocks + scales), against HF on what transformers dequantizes its blocks to."""
    from safetensors.torch import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from stream_run.bench.synth import SynthSpec, synthesize

    synthesize(SynthSpec.from_shape("tiny-moe", arch="gpt_oss", dtype="f32"), str(tmp_path / "f"))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "f"), dtype=torch.float32).eval()
    np.testing.assert_allclose(_engine_logits(tmp_path / "f", PROMPT), hf_logits(model, PROMPT),
                               rtol=1e-4, atol=1e-4)

    spec = SynthSpec.from_shape("tiny-moe", arch="gpt_oss", dtype="mxfp4")
    synthesize(spec, str(tmp_path / "m"))
    state = {}
    for f in (tmp_path / "m").glob("*.safetensors"):
        state.update(load_file(str(f)))
    ref = {}
    for name, arr in state.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            stem = name.removesuffix("_blocks")
            ref[stem] = convert_moe_packed_tensors(arr, state[f"{stem}_scales"],
                                                   dtype=torch.float32)
        else:
            ref[name] = arr.float()  # bf16 -> float32, exact
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.pop("quantization_config")
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.GptOssConfig(**{k: v for k, v in cfg.items() if k != "architectures"}),
        dtype=torch.float32).eval()
    model.load_state_dict(ref)
    np.testing.assert_allclose(_engine_logits(tmp_path / "m", PROMPT), hf_logits(model, PROMPT),
                               rtol=1e-4, atol=1e-4)
