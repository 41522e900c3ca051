"""Mixture-of-Experts GGUF files (issue 18): qwen3moe, qwen2moe and llama with experts
(Mixtral), written from tiny random HF checkpoints the way llama.cpp's converter lays them out
(every expert's linear stacked in one ffn_{gate,up,down}_exps tensor). Each expert is a unit of
its own whose byte ranges are its sub-range of each stacked tensor, computed on the file's own
blocks; the engine's logits and 32 greedy tokens equal HF float32 on what the file holds."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from stream_run.loaders import FormatError, MissingTensorError
from stream_run.models import moe, open_model
from tests.hf_reference import hf_greedy, hf_logits
from tests.models.test_moe import N_EXPERTS, N_NEW, PROMPT, make_config, run_engine
from tests.packed_models import permute
from tests.tiny_models import VOCAB

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
QT = gguf.GGMLQuantizationType
ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama"}
LINEAR = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm",
          "post_attention_layernorm": "ffn_norm", "mlp.gate": "ffn_gate_inp",
          "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
          "mlp.shared_expert.up_proj": "ffn_up_shexp",
          "mlp.shared_expert.down_proj": "ffn_down_shexp",
          "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}


def make_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    # every layer sparse (llama.cpp's qwen2moe has no dense layers); block-sized rows
    extra = {"mlp_only_layers": [], "shared_expert_intermediate_size": 64} \
        if family == "qwen2_moe" else {}
    cfg = make_config(family, **extra)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def gguf_tensors(model, family: str) -> dict[str, np.ndarray]:
    """The model's float32 weights under llama.cpp's names and layout: gate_up_proj split into
    ffn_gate_exps and ffn_up_exps, q/k rows permuted for the "llama" architecture."""
    cfg = model.config
    out = {}
    for name, val in model.state_dict().items():
        arr = val.detach().numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = arr
        elif name == "model.norm.weight":
            out["output_norm.weight"] = arr
        elif name == "lm_head.weight":
            out["output.weight"] = arr
        elif name.endswith("mlp.experts.gate_up_proj"):
            i, inner = name.split(".")[2], arr.shape[1] // 2
            out[f"blk.{i}.ffn_gate_exps.weight"] = np.ascontiguousarray(arr[:, :inner])
            out[f"blk.{i}.ffn_up_exps.weight"] = np.ascontiguousarray(arr[:, inner:])
        elif name.endswith("mlp.experts.down_proj"):
            out[f"blk.{name.split('.')[2]}.ffn_down_exps.weight"] = arr
        else:
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if family == "mixtral" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = cfg.num_attention_heads if module.endswith("q_proj") \
                    else cfg.num_key_value_heads
                arr = permute(arr, heads)
            out[f"blk.{i}.{LINEAR[module]}.{kind}"] = arr
    return out


def write_gguf(path, model, family: str, qtype: str = "F32",
               edit=None, meta_edit: dict | None = None) -> None:
    """model as a GGUF file of qtype (linears and experts; norms, biases and the router stay
    F32, as llama-quantize leaves them); model's weights are then set to what the file
    dequantizes to, so it stays the reference. edit(tensors) may break the file for the
    bad-input tests; meta_edit overrides metadata keys (without the arch prefix)."""
    cfg, arch = model.config, ARCH[family]
    w = gguf.GGUFWriter(str(path), arch)
    meta = {"block_count": cfg.num_hidden_layers, "context_length": 256,
            "embedding_length": cfg.hidden_size, "attention.head_count": cfg.num_attention_heads,
            "attention.head_count_kv": cfg.num_key_value_heads,
            "expert_count": N_EXPERTS, "expert_used_count": cfg.num_experts_per_tok,
            "feed_forward_length": cfg.intermediate_size}
    if family != "mixtral":
        meta["expert_feed_forward_length"] = cfg.moe_intermediate_size
        meta["attention.key_length"] = meta["attention.value_length"] = \
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if family == "qwen2_moe":
        meta["expert_shared_feed_forward_length"] = cfg.shared_expert_intermediate_size
    meta.update(meta_edit or {})
    for key, val in meta.items():
        if val is not None:
            w.add_uint32(f"{arch}.{key}", val)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", float(cfg.rope_parameters["rope_theta"]))
    tokens = ["<s>", "<pad>", "</s>"] + [f"t{i}" for i in range(VOCAB - 3)]
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "default")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.merges", [])
    w.add_array("tokenizer.ggml.token_type", [3, 3, 3] + [1] * (VOCAB - 3))
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    tensors = gguf_tensors(model, family)
    if edit is not None:
        edit(tensors)
    held = {}
    for name, arr in tensors.items():
        quantize = qtype != "F32" and arr.ndim >= 2 and "ffn_gate_inp" not in name
        if quantize and qtype == "F16":
            w.add_tensor(name, arr.astype(np.float16))
            arr = arr.astype(np.float16).astype(np.float32)
        elif quantize:
            data = gguf.quants.quantize(arr, QT[qtype])
            w.add_tensor(name, data, raw_dtype=QT[qtype])
            arr = gguf.quants.dequantize(data, QT[qtype]).reshape(arr.shape)
        else:
            w.add_tensor(name, arr)
        held[name] = arr
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if edit is None:
        set_weights(model, family, held)


def set_weights(model, family: str, held: dict[str, np.ndarray]) -> None:
    """Load what the file holds back into the HF model (the inverse of gguf_tensors)."""
    back = {}
    names = {v: k for k, v in LINEAR.items()}
    for name, arr in held.items():
        if name == "token_embd.weight":
            back["model.embed_tokens.weight"] = arr
        elif name == "output_norm.weight":
            back["model.norm.weight"] = arr
        elif name == "output.weight":
            back["lm_head.weight"] = arr
        else:
            _, i, g, kind = name.split(".")
            if g == "ffn_gate_exps":
                back[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.concatenate(
                    [arr, held[f"blk.{i}.ffn_up_exps.weight"]], axis=1)
            elif g == "ffn_down_exps":
                back[f"model.layers.{i}.mlp.experts.down_proj"] = arr
            elif g != "ffn_up_exps":
                module = names[g]
                if family == "mixtral" and g in ("attn_q", "attn_k"):
                    cfg = model.config
                    heads = cfg.num_attention_heads if g == "attn_q" else cfg.num_key_value_heads
                    arr = permute_back(arr, heads)
                back[f"model.layers.{i}.{module}.{kind}"] = arr
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                           for k, v in back.items()}, strict=False)


def permute_back(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


# The engine computes Q4_0 on the file's blocks with x rounded to int8 per block, as llama.cpp
# does (kernels/gguf_blocks.py matvec: ~0.5-1 % of max|y|); F32, F16 and Q8_0 keep x float32.
X_ROUNDED = {"Q4_0": 0.15}


@pytest.mark.reference
@pytest.mark.parametrize("family,qtype", [
    ("qwen3_moe", "F32"), ("qwen3_moe", "Q8_0"), ("qwen3_moe", "Q4_0"),
    ("qwen2_moe", "F16"), ("qwen2_moe", "Q8_0"), ("mixtral", "F32"), ("mixtral", "Q4_0")])
def test_moe_gguf_matches_transformers(tmp_path, family, qtype):
    """Logits of a 24-token prompt and 32 greedy tokens against HF float32 on the weights the
    file dequantizes to. Where x is rounded (Q4_0) the logits are within that rounding's
    error, and each greedy token is within twice it of HF's best on the engine's own prefix."""
    model = make_model(family)
    write_gguf(tmp_path / "m.gguf", model, family, qtype)
    logits, tokens, _, _ = run_engine(tmp_path / "m.gguf")
    tol = X_ROUNDED.get(qtype)
    if tol is None:
        np.testing.assert_allclose(logits, hf_logits(model, PROMPT * 3), rtol=1e-4, atol=1e-4)
        assert tokens == hf_greedy(model, PROMPT, N_NEW)
        return
    np.testing.assert_allclose(logits, hf_logits(model, PROMPT * 3), rtol=0, atol=tol)
    forced = hf_logits(model, PROMPT + tokens[:-1])[len(PROMPT) - 1:]  # (N_NEW, V)
    picked = forced[np.arange(N_NEW), tokens]
    assert np.all(picked >= forced.max(axis=1) - 2 * tol), picked - forced.max(axis=1)
    agree = sum(a == b for a, b in zip(tokens, hf_greedy(model, PROMPT, N_NEW), strict=True))
    assert agree >= 4  # not vacuous: HF's own tokens, at least until a near-tie


@pytest.mark.parametrize("qtype", ["F32", "Q4_0"])
def test_each_expert_is_its_sub_range_of_the_stacked_tensors(tmp_path, qtype):
    """Expert e's gate, up and down are the e-th 1/n of ffn_{gate,up,down}_exps' bytes, in
    the file's own type (only the routed experts are read)."""
    model = make_model("qwen3_moe")
    write_gguf(tmp_path / "m.gguf", model, "qwen3_moe", qtype)
    index = open_model(str(tmp_path / "m.gguf")).index
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    stacked = {t.name: t for t in reader.tensors}
    for i in range(model.config.num_hidden_layers):
        assert "mlp.gate.weight" in index.units[f"layers.{i}"].tensors
        assert not any("experts" in n for n in index.units[f"layers.{i}"].tensors)
        for g, p in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            t = stacked[f"blk.{i}.ffn_{g}_exps.weight"]
            per = int(t.n_bytes) // N_EXPERTS
            for e in range(N_EXPERTS):
                ref = index.units[moe.expert_key(i, e)].tensors[f"{p}.weight"]
                assert (ref.offset, ref.nbytes, ref.dtype) == (
                    int(t.data_offset) + e * per, per, qtype)


def test_llama_without_experts_stays_llama_and_mixtral_is_llama_with_experts(tmp_path):
    model = make_model("mixtral")
    write_gguf(tmp_path / "m.gguf", model, "mixtral")
    assert open_model(str(tmp_path / "m.gguf")).index.spec.model_type == "mixtral"


def _drop(name):
    return lambda t: t.pop(name)


def _router(t):
    t["blk.1.ffn_gate_inp.weight"] = t["blk.1.ffn_gate_inp.weight"][:6]


def _experts(t):
    t["blk.0.ffn_down_exps.weight"] = t["blk.0.ffn_down_exps.weight"][:6]


@pytest.mark.parametrize("edit,meta,error,match", [
    (_drop("blk.1.ffn_up_exps.weight"), None, MissingTensorError,
     r"'layers\.1\.mlp\.experts\.0' is missing tensor\(s\) \['up_proj\.weight'\] \(GGUF "
     r"\['blk\.1\.ffn_up_exps\.weight'\]\)"),
    (_router, None, FormatError,
     r"'mlp\.gate\.weight' of unit 'layers\.1' has shape \[6, 64\], expected \[8, 64\] .*"
     r"'blk\.1\.ffn_gate_inp\.weight'"),
    (_experts, None, FormatError,
     r"tensor 'blk\.0\.ffn_down_exps\.weight': has shape \[6, 64, 32\], expected \[8, 64, 32\]"),
    (None, {"expert_count": 6}, FormatError,
     r"tensor 'blk\.0\.ffn_gate_exps\.weight': has shape \[8, 32, 64\], expected "
     r"\[6, 32, 64\] from the metadata \(expert_count, "),
    (None, {"expert_used_count": 9}, FormatError,
     r"GGUF metadata key qwen3moe\.expert_used_count: field 'num_experts_per_tok' is 9, more "
     r"than the 8 experts"),
    (None, {"expert_feed_forward_length": None}, FormatError,
     r"GGUF metadata key qwen3moe\.expert_feed_forward_length: field 'moe_intermediate_size'"),
])
def test_bad_moe_gguf_is_named(tmp_path, edit, meta, error, match):
    model = make_model("qwen3_moe")
    write_gguf(tmp_path / "m.gguf", model, "qwen3_moe", "F32", edit, meta)
    with pytest.raises(error, match=match):
        open_model(str(tmp_path / "m.gguf"))


def test_cli_names_a_bad_router_and_exits_2(tmp_path):
    model = make_model("qwen3_moe")
    write_gguf(tmp_path / "m.gguf", model, "qwen3_moe", "F32", _router)
    proc = subprocess.run([sys.executable, "-m", "stream_run.cli.run", str(tmp_path / "m.gguf"),
                           "-p", "hi", "-m", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "blk.1.ffn_gate_inp.weight" in lines[0], proc.stderr
