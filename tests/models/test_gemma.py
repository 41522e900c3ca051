"""Gemma 2 and Gemma 3 (text, and the text model of the multimodal checkpoints) against HF
transformers (float32) on tiny random checkpoints saved with save_pretrained: interleaved
sliding and global layers with prompts longer than the window, RoPE bases per layer kind,
query_pre_attn_scalar, (1 + w) norms, soft-capping; from safetensors and from GGUF (llama.cpp's
names, norms stored with the +1 added) on numpy and MLX's CPU device; stream-convert,
stream-eval, streaming under a budget and stream-serve batching."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from stream_run.engine import EngineConfig
from stream_run.kernels import available_backends
from tests import model_checks
from tests.hf_reference import hf_greedy, hf_logits
from tests.tiny_models import VOCAB, write_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HEAD_DIM = 16
WINDOW = 5
PROMPT = [5, 17, 42, 99, 3, 250, 7, 11]  # PROMPT * 3 and the 32 greedy steps pass WINDOW
N_NEW = 32
BACKENDS = ["numpy"] + (["mlx"] if "mlx" in available_backends() else [])
GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
               "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}}
# per case: (architecture, config overrides); the GGUF cases keep query_pre_attn_scalar at
# head_dim, as llama.cpp assumes for every size but 27B
CASES = {
    "gemma2": ("gemma2", {"query_pre_attn_scalar": 24, "attn_logit_softcapping": 3.0,
                          "final_logit_softcapping": 4.0}),
    "gemma2_gguf": ("gemma2", {"query_pre_attn_scalar": HEAD_DIM, "attn_logit_softcapping": 3.0,
                               "final_logit_softcapping": 4.0}),
    "gemma3": ("gemma3_text", {"query_pre_attn_scalar": 24, "sliding_window_pattern": 3,
                               "final_logit_softcapping": 4.0, "rope_parameters": GEMMA3_ROPE}),
    "gemma3_gguf": ("gemma3_text", {"query_pre_attn_scalar": HEAD_DIM, "sliding_window_pattern": 3,
                                    "rope_parameters": GEMMA3_ROPE}),
    # transformers 4's spelling, as the Gemma 3 checkpoints on the Hub have it
    "gemma3_legacy": ("gemma3_text", {"query_pre_attn_scalar": 24, "sliding_window_pattern": 3,
                                      "rope_parameters": GEMMA3_ROPE, "legacy": True}),
    "gemma3_multimodal": ("gemma3", {"query_pre_attn_scalar": 24, "sliding_window_pattern": 3,
                                     "rope_parameters": GEMMA3_ROPE}),
}


def text_config(arch: str, overrides: dict):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM,
              max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.2,
              sliding_window=WINDOW, bos_token_id=0, eos_token_id=2, pad_token_id=None)
    kw.update((k, v) for k, v in overrides.items() if k != "legacy")
    if arch == "gemma2":
        return transformers.Gemma2Config(**kw)
    return transformers.Gemma3TextConfig(**kw)


def build(arch: str, overrides: dict, seed: int = 0):
    """A random HF model; norm weights random too (HF starts them at 0, where 1 + w = 1), the
    post-norms' around 4 so that the blocks outweigh the scaled embedding (else the tied head
    echoes the last token and greedy decoding repeats one token)."""
    cfg = text_config(arch, overrides)
    torch.manual_seed(seed)
    if arch == "gemma2":
        model = transformers.Gemma2ForCausalLM(cfg)
    elif arch == "gemma3_text":
        model = transformers.Gemma3ForCausalLM(cfg)
    else:
        vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                      num_attention_heads=2, image_size=28, patch_size=14)
        model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
            text_config=cfg.to_dict(), vision_config=vision, mm_tokens_per_image=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(4.0 if ".post_" in name else 0.0, 0.3)
    return model.eval()


def write_gemma(path, case: str, seed: int = 0):
    arch, overrides = CASES[case]
    model = build(arch, overrides, seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    cfg = json.loads((path / "config.json").read_text())
    if overrides.get("legacy"):
        rope = cfg.pop("rope_parameters")
        full = rope["full_attention"]
        cfg.update(rope_theta=full["rope_theta"], rope_scaling={
            "rope_type": full["rope_type"], "factor": full["factor"]},
            rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
            sliding_window_pattern=overrides["sliding_window_pattern"])
        del cfg["layer_types"]
        (path / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(path, cfg.get("text_config", cfg))
    return model


def run_engine(path, backend: str, budget: int | None = None):
    return model_checks.run_engine(path, PROMPT, N_NEW, backend, budget)


def check_against(model, logits, tokens) -> float:
    want = hf_logits(model, PROMPT * 3)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    assert tokens == hf_greedy(model, PROMPT, N_NEW)
    return float(np.abs(logits - want).max())


@pytest.mark.reference
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["gemma2", "gemma3", "gemma3_legacy", "gemma3_multimodal"])
def test_gemma_matches_transformers(tmp_path, case, backend):
    model = write_gemma(tmp_path, case)
    logits, tokens, _, _ = run_engine(tmp_path, backend)
    check_against(model, logits, tokens)


@pytest.mark.reference
@pytest.mark.parametrize("case", ["gemma2", "gemma3"])
def test_windows_softcaps_and_scalar_change_the_logits(case):
    """Ignoring any of these would fail the comparisons above: each moves HF's logits."""
    arch, overrides = CASES[case]
    model = build(arch, overrides)
    want = hf_logits(model, PROMPT * 3)
    changes = [{"sliding_window": 4096}, {"final_logit_softcapping": None},
               {"query_pre_attn_scalar": HEAD_DIM}]
    if arch == "gemma2":
        changes.append({"attn_logit_softcapping": None})
    else:
        changes.append({"rope_parameters": {k: {**v, "rope_theta": 1000.0}
                                            for k, v in GEMMA3_ROPE.items()}})
    for change in changes:
        other = build(arch, {**overrides, **change})
        other.load_state_dict(model.state_dict())
        assert np.abs(hf_logits(other, PROMPT * 3) - want).max() > 1e-2, change


def write_gemma_gguf(path, model, arch: str, qtype: str) -> None:
    """The HF model's weights as llama.cpp's converter writes them (norms + 1; linears and the
    embedding in qtype); the model's weights are set to what the file dequantizes to."""
    import gguf

    cfg, QT = model.config, gguf.GGMLQuantizationType
    name = "gemma2" if arch == "gemma2" else "gemma3"
    w = gguf.GGUFWriter(str(path), name)
    for key, val in {"block_count": cfg.num_hidden_layers, "context_length": 256,
                     "embedding_length": cfg.hidden_size,
                     "feed_forward_length": cfg.intermediate_size,
                     "attention.head_count": cfg.num_attention_heads,
                     "attention.head_count_kv": cfg.num_key_value_heads,
                     "attention.key_length": HEAD_DIM, "attention.value_length": HEAD_DIM,
                     "attention.sliding_window": WINDOW}.items():
        w.add_uint32(f"{name}.{key}", val)
    w.add_float32(f"{name}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    if arch == "gemma2":
        w.add_float32(f"{name}.rope.freq_base", 10000.0)
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    else:
        full = GEMMA3_ROPE["full_attention"]
        w.add_float32(f"{name}.rope.freq_base", full["rope_theta"])
        w.add_rope_freq_base_swa(GEMMA3_ROPE["sliding_attention"]["rope_theta"])
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    tokens = ["<s>", "</s>", "<unk>"] + [f"t{i}" for i in range(VOCAB - 3)]
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "default")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.merges", [])
    w.add_array("tokenizer.ggml.token_type", [3, 3, 3] + [1] * (VOCAB - 3))
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm",
             "post_feedforward_layernorm": "post_ffw_norm"}
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    for hf, arr in state.items():
        if hf == "lm_head.weight":
            continue  # tied
        if hf == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif hf == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, i, rest = hf.split(".", 3)
            gname = f"blk.{i}.{names[rest.removesuffix('.weight')]}.weight"
        if arr.ndim == 2 and qtype != "F32":
            data = gguf.quants.quantize(arr, QT[qtype])
            w.add_tensor(gname, data, raw_dtype=QT[qtype])
            arr = gguf.quants.dequantize(data, QT[qtype]).reshape(arr.shape)
        else:
            w.add_tensor(gname, arr + 1 if hf.endswith("norm.weight") else arr)
        state[hf] = arr
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})


@pytest.mark.reference
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("case", ["gemma2_gguf", "gemma3_gguf"])
def test_gemma_gguf_matches_transformers(tmp_path, case, qtype, backend):
    arch, overrides = CASES[case]
    model = build(arch, overrides)
    write_gemma_gguf(tmp_path / "m.gguf", model, arch, qtype)
    logits, tokens, _, _ = run_engine(tmp_path / "m.gguf", backend)
    check_against(model, logits, tokens)


def test_gguf_converts_with_its_norms_and_config(tmp_path):
    """stream-convert of a Gemma GGUF keeps what the GGUF hook put in the config (norms
    stored with +1, llama.cpp's attention scale), so the packed model runs the same."""
    from stream_run.convert.convert import convert_model

    arch, overrides = CASES["gemma3_gguf"]
    write_gemma_gguf(tmp_path / "m.gguf", build(arch, overrides), arch, "Q8_0")
    convert_model(str(tmp_path / "m.gguf"), str(tmp_path / "q8"), bits=8, group_size=32,
                  progress=False)
    cfg = json.loads((tmp_path / "q8" / "config.json").read_text())
    assert cfg["norm_weight_offset"] == 0.0 and cfg["query_pre_attn_scalar"] == HEAD_DIM
    _, source, _, _ = run_engine(tmp_path / "m.gguf", "numpy")
    _, converted, _, _ = run_engine(tmp_path / "q8", "numpy")
    assert converted == source


def test_a_multimodal_checkpoint_converts_to_its_text_model(tmp_path):
    """stream-convert keeps the text model (un-prefixed) and the nested config; the vision
    tower is left out, and the output runs exactly as the source."""
    from stream_run.convert.convert import convert_model

    write_gemma(tmp_path / "hf", "gemma3_multimodal")
    convert_model(str(tmp_path / "hf"), str(tmp_path / "out"), recipe="none", progress=False)
    names = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert not [n for n in names["weight_map"] if not n.startswith("model.")]
    source, converted = run_engine(tmp_path / "hf", "numpy"), run_engine(tmp_path / "out", "numpy")
    np.testing.assert_array_equal(converted[0], source[0])
    assert converted[1] == source[1]


@pytest.mark.parametrize("case", ["gemma2", "gemma3"])
def test_gemma_converts_to_8_bit_and_runs_on_the_packed_weights(tmp_path, case):
    """The engine on the stream-convert output equals HF on the weights the packed file
    dequantizes to, and stream-eval scores both alike."""
    from stream_run.engine.perplexity import evaluate

    model = write_gemma(tmp_path / "hf", case)
    state, packed = model_checks.convert_8bit_reference(model, tmp_path / "hf",
                                                        tmp_path / "q8")
    assert any(f"{n.removesuffix('.weight')}.scales" in packed for n in state if "o_proj" in n)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state)
    logits, tokens, _, _ = run_engine(tmp_path / "q8", "numpy")
    check_against(model, logits, tokens)
    config = EngineConfig(backend="numpy")
    source = asyncio.run(evaluate(str(tmp_path / "hf"), PROMPT * 8, config, ctx=32))
    converted = asyncio.run(evaluate(str(tmp_path / "q8"), PROMPT * 8, config, ctx=32))
    assert converted.n_scored == source.n_scored == len(PROMPT) * 8 - 1
    assert abs(converted.perplexity / source.perplexity - 1) < 0.05


@pytest.mark.parametrize("case", ["gemma2", "gemma3_multimodal"])
def test_gemma_streams_under_a_budget_with_the_same_tokens(tmp_path, case):
    write_gemma(tmp_path, case)
    _, resident, _, model_bytes = run_engine(tmp_path, "numpy")
    _, streamed, bytes_read, _ = run_engine(tmp_path, "numpy", budget=model_bytes * 2 // 3)
    assert streamed == resident
    assert bytes_read > model_bytes


@pytest.mark.parametrize("case", ["gemma2", "gemma3"])
def test_gemma_requests_share_passes_in_stream_serve(tmp_path, case):
    pytest.importorskip("openai")
    write_gemma(tmp_path, case)
    model_checks.assert_requests_share_passes(tmp_path, [PROMPT, PROMPT[::-1], PROMPT[2:],
                                                          PROMPT * 2])


def test_a_mis_shaped_norm_is_named_with_both_shapes(tmp_path):
    """Bad input through the command: one line naming the tensor, the shape found and the
    shape the gemma model file expects, exit 2 (here under the multimodal prefix)."""
    import subprocess
    import sys

    from safetensors.numpy import load_file, save_file

    write_gemma(tmp_path, "gemma3_multimodal")
    weights = load_file(str(tmp_path / "model.safetensors"))
    name = "language_model.model.layers.1.self_attn.k_norm.weight"
    weights[name] = weights[name][:-4]
    save_file(weights, str(tmp_path / "model.safetensors"))
    run = subprocess.run([sys.executable, "-m", "stream_run.cli.run", str(tmp_path), "-p", "hi"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "'self_attn.k_norm.weight'" in run.stderr and "layers.1" in run.stderr
    assert "[12]" in run.stderr and "expected [16]" in run.stderr


def test_config_hooks_follow_hf_defaults_and_llama_cpp():
    """A sparse multimodal config (as on the Hub) takes HF's Gemma3TextConfig defaults; a GGUF
    takes llama.cpp's attention scale (27B: hidden / heads) and norms as stored."""
    from stream_run.models.gemma import embed_scale, gguf_config, hf_config

    hub = {"model_type": "gemma3", "eos_token_id": [1, 106], "torch_dtype": "bfloat16",
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                           "num_hidden_layers": 34, "model_type": "gemma3_text",
                           "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024}}
    cfg = hf_config("gemma3", hub)
    want = transformers.Gemma3TextConfig(**hub["text_config"])
    for key in ("num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                "query_pre_attn_scalar", "rms_norm_eps", "max_position_embeddings"):
        assert cfg[key] == getattr(want, key), key
    assert cfg["model_type"] == "gemma3" and cfg["eos_token_id"] == [1, 106]
    big = gguf_config("gemma3_text", {"hidden_size": 5376, "num_attention_heads": 32,
                                      "head_dim": 128, "num_hidden_layers": 62})
    assert big["query_pre_attn_scalar"] == 168 and big["norm_weight_offset"] == 0.0
    for E in (2304, 2560, 3840, 5376):
        scale = torch.tensor(E**0.5).to(torch.bfloat16).float().item()
        assert embed_scale(E, "bfloat16") == scale
        assert embed_scale(E, "float32") == torch.tensor(E**0.5).item()


def test_a_multimodal_config_without_text_config_is_refused(tmp_path):
    from stream_run.loaders import FormatError
    from stream_run.models import open_model

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    with pytest.raises(FormatError, match=r"config\.json: field 'text_config' must be an "
                                          r"object, got None; hint: a Gemma 3 multimodal"):
        open_model(str(tmp_path))
