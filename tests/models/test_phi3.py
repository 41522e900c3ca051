"""Phi-3 against HF transformers (float32) on tiny random checkpoints saved with save_pretrained:
fused qkv and gate_up, partial rotary embeddings, longrope with both factor sets in play."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from stream_run.engine import Engine, EngineConfig, GenerationParams
from stream_run.kernels import available_backends
from tests import model_checks
from tests.hf_reference import hf_greedy, hf_logits
from tests.tiny_models import VOCAB, write_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HEAD_DIM = 16
PROMPT = [5, 17, 42, 99, 3, 250, 7, 11]
N_NEW = 32
# short/long factors differ per frequency, so using the wrong set moves the logits
SHORT = [1.0 + 0.1 * i for i in range(HEAD_DIM // 4)]
LONG = [2.0 + 0.5 * i for i in range(HEAD_DIM // 4)]
CASES = {
    "plain": {},
    "partial_rotary": {"partial_rotary_factor": 0.5},
    "longrope": {"partial_rotary_factor": 0.5, "original_max_position_embeddings": 16,
                 "rope_scaling": {"rope_type": "longrope", "short_factor": SHORT,
                                  "long_factor": LONG}},
    "sliding_window": {"sliding_window": 6},
}
BACKENDS = ["numpy"] + (["mlx"] if "mlx" in available_backends() else [])


def write_phi3(path, overrides: dict, seed: int = 0):
    path.mkdir(parents=True, exist_ok=True)
    cfg = transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=0, eos_token_id=2,
        pad_token_id=None, tie_word_embeddings=False, **overrides)
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(cfg).eval()
    model.save_pretrained(str(path), safe_serialization=True)
    write_tokenizer(path, json.loads((path / "config.json").read_text()))
    return model


def run_engine(path, backend: str, budget: int | None = None):
    return model_checks.run_engine(path, PROMPT, N_NEW, backend, budget)


@pytest.mark.reference
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_phi3_matches_transformers(tmp_path, case, backend):
    model = write_phi3(tmp_path, CASES[case])
    logits, tokens, _, _ = run_engine(tmp_path, backend)
    np.testing.assert_allclose(logits, hf_logits(model, PROMPT * 3), rtol=1e-4, atol=1e-4)
    assert tokens == hf_greedy(model, PROMPT, N_NEW)


def test_longrope_uses_the_long_factors_past_the_original_context(tmp_path):
    """The case above would pass with the short factors alone if the prompt never crossed the
    original context: the long set must change the logits of a long prompt."""
    model = write_phi3(tmp_path, CASES["longrope"])
    short_only = model.model.rotary_emb.original_inv_freq.numpy()
    from stream_run.models.rope import rope_parameters

    inv, _ = rope_parameters(HEAD_DIM, 10000.0, CASES["longrope"]["rope_scaling"], 256, 0.5,
                             original_max_position_embeddings=16)
    np.testing.assert_allclose(inv, short_only, rtol=1e-6)
    long, _ = rope_parameters(HEAD_DIM, 10000.0, CASES["longrope"]["rope_scaling"], 256, 0.5,
                              seq_len=17, original_max_position_embeddings=16)
    assert not np.allclose(long, inv)


def test_phi3_streams_under_a_budget_with_the_same_tokens(tmp_path):
    write_phi3(tmp_path, CASES["longrope"])
    _, resident, _, model_bytes = run_engine(tmp_path, "numpy")
    _, streamed, bytes_read, _ = run_engine(tmp_path, "numpy", budget=model_bytes * 2 // 3)
    assert streamed == resident
    assert bytes_read > model_bytes


def write_phi3_gguf(path, model, qtype: str) -> None:
    """The HF model's weights as a phi3 GGUF (llama.cpp's names; linears in qtype, norms F32);
    the model's linears are set to what the file dequantizes to, so it stays the reference."""
    import gguf

    cfg = model.config
    QT = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(path), "phi3")
    rotary = int(HEAD_DIM * cfg.rope_parameters.get("partial_rotary_factor", 1.0))
    for key, val in {"block_count": cfg.num_hidden_layers, "context_length": 256,
                     "embedding_length": cfg.hidden_size,
                     "feed_forward_length": cfg.intermediate_size,
                     "attention.head_count": cfg.num_attention_heads,
                     "attention.head_count_kv": cfg.num_key_value_heads,
                     "rope.dimension_count": rotary}.items():
        w.add_uint32(f"phi3.{key}", val)
    w.add_float32("phi3.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32("phi3.rope.freq_base", 10000.0)
    tokens = ["<s>", "</s>", "<unk>"] + [f"t{i}" for i in range(VOCAB - 3)]
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "default")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.merges", [])
    w.add_array("tokenizer.ggml.token_type", [3, 3, 3] + [1] * (VOCAB - 3))
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    names = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
             "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    for name, arr in state.items():
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            module = rest.removesuffix(".weight")
            gname = f"blk.{i}.{names[module]}.weight"
        if arr.ndim == 2 and qtype != "F32":
            data = gguf.quants.quantize(arr, QT[qtype])
            w.add_tensor(gname, data, raw_dtype=QT[qtype])
            arr = gguf.quants.dequantize(data, QT[qtype]).reshape(arr.shape)
        else:
            w.add_tensor(gname, arr)
        state[name] = arr
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})


@pytest.mark.reference
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("case", ["plain", "partial_rotary"])
def test_phi3_gguf_matches_transformers(tmp_path, case, qtype):
    model = write_phi3(tmp_path / "hf", CASES[case])
    write_phi3_gguf(tmp_path / "m.gguf", model, qtype)
    logits, tokens, _, _ = run_engine(tmp_path / "m.gguf", "numpy")
    np.testing.assert_allclose(logits, hf_logits(model, PROMPT * 3), rtol=1e-4, atol=1e-4)
    assert tokens == hf_greedy(model, PROMPT, N_NEW)


def test_phi3_converts_to_8_bit_and_runs_on_the_packed_weights(tmp_path):
    """stream-convert packs the fused weights like any other; the engine on the packed model
    equals HF on the weights the packed file dequantizes to, and stream-eval scores both."""
    from stream_run.engine.perplexity import evaluate

    model = write_phi3(tmp_path / "hf", CASES["partial_rotary"])
    state, packed = model_checks.convert_8bit_reference(model, tmp_path / "hf",
                                                        tmp_path / "q8")
    assert any(f"{n.removesuffix('.weight')}.scales" in packed for n in state
               if "qkv_proj" in n)
    model.load_state_dict(state)
    logits, tokens, _, _ = run_engine(tmp_path / "q8", "numpy")
    np.testing.assert_allclose(logits, hf_logits(model, PROMPT * 3), rtol=1e-4, atol=1e-4)
    assert tokens == hf_greedy(model, PROMPT, N_NEW)
    config = EngineConfig(backend="numpy")
    source = asyncio.run(evaluate(str(tmp_path / "hf"), PROMPT * 8, config, ctx=32))
    converted = asyncio.run(evaluate(str(tmp_path / "q8"), PROMPT * 8, config, ctx=32))
    assert converted.n_scored == source.n_scored == len(PROMPT) * 8 - 1
    assert abs(converted.perplexity / source.perplexity - 1) < 0.05


def test_phi3_requests_share_passes_in_stream_serve(tmp_path):
    pytest.importorskip("openai")
    write_phi3(tmp_path, CASES["longrope"])
    model_checks.assert_requests_share_passes(tmp_path, [PROMPT, PROMPT[::-1], PROMPT[2:],
                                                          PROMPT * 2])


def test_a_mis_shaped_fused_weight_is_named_with_both_shapes(tmp_path):
    """Bad input through the command: one line naming the tensor, the shape found and the
    shape the phi3 model file expects, exit 2."""
    import subprocess
    import sys

    from safetensors.numpy import load_file, save_file

    write_phi3(tmp_path, {})
    weights = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.1.self_attn.qkv_proj.weight"
    weights[name] = weights[name][:-16]
    save_file(weights, str(tmp_path / "model.safetensors"))
    run = subprocess.run([sys.executable, "-m", "stream_run.cli.run", str(tmp_path), "-p", "hi"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "'self_attn.qkv_proj.weight'" in run.stderr and "layers.1" in run.stderr
    assert "[112, 64]" in run.stderr and "expected [128, 64]" in run.stderr


def test_longrope_prefill_in_chunks_computes_as_one_call(tmp_path):
    """A prompt past the original context gets the long factors in every prefill chunk, as
    HF's one forward call gives them (review finding: early chunks got the short ones)."""
    model = write_phi3(tmp_path, CASES["longrope"])  # original context 16
    prompt = [(7 * i + 3) % 200 + 3 for i in range(30)]
    want = hf_greedy(model, prompt, 8)

    async def go(chunk):
        engine = await Engine.open(str(tmp_path), EngineConfig(backend="numpy",
                                                                prefill_chunk=chunk))
        try:
            done = await engine.complete(prompt, GenerationParams(max_tokens=8, ignore_eos=True))
            return done.token_ids
        finally:
            engine.close()

    for chunk in (512, 8, 1):
        assert asyncio.run(go(chunk)) == want, chunk


def test_original_context_inside_rope_parameters_only(tmp_path):
    """transformers 5 may keep original_max_position_embeddings inside rope_parameters alone:
    the switch to the long factors then happens there too."""
    from stream_run.kernels import get_backend
    from stream_run.models import model_class, open_model

    write_phi3(tmp_path, CASES["longrope"])
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("original_max_position_embeddings", None)
    cfg["rope_parameters"]["original_max_position_embeddings"] = 16
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = open_model(str(tmp_path)).index.spec
    model = model_class("phi3")(spec, get_backend("numpy", 1))
    assert model.long_after == 16 and model.rope_factor > 1


def test_gguf_partial_rotary_survives_stream_convert(tmp_path):
    from stream_run.convert.convert import convert_model

    model = write_phi3(tmp_path / "hf", CASES["partial_rotary"])
    write_phi3_gguf(tmp_path / "m.gguf", model, "F32")
    convert_model(str(tmp_path / "m.gguf"), str(tmp_path / "q8"), bits=8, group_size=32,
                  progress=False)
    cfg = json.loads((tmp_path / "q8" / "config.json").read_text())
    assert cfg.get("partial_rotary_factor") == 0.5 and "config" not in cfg
    gguf_logits, _, _, _ = run_engine(tmp_path / "m.gguf", "numpy")
    packed_logits, _, _, _ = run_engine(tmp_path / "q8", "numpy")
    assert np.corrcoef(gguf_logits.ravel(), packed_logits.ravel())[0, 1] > 0.999
