"""deepseek_v3 from GGUF (llama.cpp's deepseek2), written from tiny random HF checkpoints the
way llama.cpp's converter lays them out: experts stacked in ffn_{gate,up,down}_exps (each expert
a byte sub-range, a unit of its own), kv_b_proj split into attn_k_b (transposed) and attn_v_b
with the MLA widths under key_length_mla / value_length_mla (or, from older converters, one
attn_kv_b with the per-head widths under key_length / value_length), the router's correction
bias as exp_probs_b.bias, no q/k row permutation (llama.cpp rotates DeepSeek's interleaved
pairs as they are). The engine's logits and 32 greedy tokens equal HF float32 on what the file
holds."""

from __future__ import annotations

import numpy as np
import pytest

from stream_run.loaders import FormatError
from stream_run.models import moe, open_model
from tests.hf_reference import hf_greedy, hf_logits
from tests.models.test_deepseek_v3 import (
    BACKENDS,
    N_EXPERTS,
    N_NEW,
    PROMPT,
    run_engine,
    write_deepseek,
)
from tests.tiny_models import VOCAB

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
QT = gguf.GGMLQuantizationType
ARCH = "deepseek2"
NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm",
         "self_attn.q_b_proj": "attn_q_b", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
         "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.kv_b_proj": "attn_kv_b",
         "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "mlp.gate": "ffn_gate_inp", "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
         "mlp.shared_experts.up_proj": "ffn_up_shexp",
         "mlp.shared_experts.down_proj": "ffn_down_shexp"}
# block-sized rows for Q8_0 where llama.cpp quantizes (attn_k_b's rows of qk_nope_head_dim=16
# stay F32, as llama-quantize keeps a tensor whose rows do not fill a block)
SIZES = dict(q_lora_rank=64, v_head_dim=16)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 1.0}


def gguf_tensors(model, split: bool) -> dict[str, np.ndarray]:
    """The model's float32 weights under llama.cpp's deepseek2 names and layout."""
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
        elif name.endswith("mlp.gate.e_score_correction_bias"):
            out[f"blk.{name.split('.')[2]}.exp_probs_b.bias"] = arr
        elif name.endswith("kv_b_proj.weight") and split:
            i, nope = name.split(".")[2], cfg.qk_nope_head_dim
            kv_b = arr.reshape(cfg.num_attention_heads, nope + cfg.v_head_dim, -1)
            out[f"blk.{i}.attn_k_b.weight"] = np.ascontiguousarray(
                kv_b[:, :nope].transpose(0, 2, 1))  # (H, rank, nope)
            out[f"blk.{i}.attn_v_b.weight"] = np.ascontiguousarray(kv_b[:, nope:])
        else:
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            out[f"blk.{i}.{NAMES[module]}.{kind}"] = arr
    return out


def write_gguf(path, model, split: bool = True, qtype: str = "F32",
               meta_edit: dict | None = None) -> None:
    """model as a deepseek2 GGUF of qtype (matrices whose rows fill blocks; norms, the router
    and its bias F32); the model's weights are then set to what the file holds."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), ARCH)
    rope, nope = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim
    ints = {"block_count": cfg.num_hidden_layers, "context_length": 256,
            "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
            "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": 1,
            "expert_count": N_EXPERTS, "expert_used_count": cfg.num_experts_per_tok,
            "expert_feed_forward_length": cfg.moe_intermediate_size,
            "expert_shared_count": cfg.n_shared_experts,
            "leading_dense_block_count": cfg.first_k_dense_replace,
            "expert_gating_func": 2, "expert_group_count": cfg.n_group,
            "expert_group_used_count": cfg.topk_group,
            "attention.kv_lora_rank": cfg.kv_lora_rank, "rope.dimension_count": rope,
            "vocab_size": VOCAB}
    if cfg.q_lora_rank is not None:
        ints["attention.q_lora_rank"] = cfg.q_lora_rank
    if split:
        ints.update({"attention.key_length": cfg.kv_lora_rank + rope,
                     "attention.value_length": cfg.kv_lora_rank,
                     "attention.key_length_mla": nope + rope,
                     "attention.value_length_mla": cfg.v_head_dim})
    else:
        ints.update({"attention.key_length": nope + rope,
                     "attention.value_length": cfg.v_head_dim})
    ints.update(meta_edit or {})
    for key, val in ints.items():
        w.add_uint32(f"{ARCH}.{key}", val)
    w.add_float32(f"{ARCH}.expert_weights_scale", cfg.routed_scaling_factor)
    if cfg.norm_topk_prob:
        w.add_bool(f"{ARCH}.expert_weights_norm", True)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(f"{ARCH}.rope.freq_base", float(cfg.rope_parameters["rope_theta"]))
    if cfg.rope_parameters.get("rope_type") == "yarn":
        p = cfg.rope_parameters
        w.add_string(f"{ARCH}.rope.scaling.type", "yarn")
        w.add_float32(f"{ARCH}.rope.scaling.factor", p["factor"])
        w.add_uint32(f"{ARCH}.rope.scaling.original_context_length",
                     p["original_max_position_embeddings"])
        w.add_float32(f"{ARCH}.rope.scaling.yarn_log_multiplier", 0.1 * p["mscale_all_dim"])
    tokens = ["<s>", "<pad>", "</s>"] + [f"t{i}" for i in range(VOCAB - 3)]
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "default")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.merges", [])
    w.add_array("tokenizer.ggml.token_type", [3, 3, 3] + [1] * (VOCAB - 3))
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    held = {}
    for name, arr in gguf_tensors(model, split).items():
        if qtype != "F32" and arr.ndim >= 2 and "ffn_gate_inp" not in name \
                and arr.shape[-1] % 32 == 0:
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
    set_weights(model, held)


def set_weights(model, held: dict[str, np.ndarray]) -> None:
    """Load what the file holds back into the HF model (the inverse of gguf_tensors)."""
    cfg, back = model.config, {}
    names = {v: k for k, v in NAMES.items()}
    for name, arr in held.items():
        if name == "token_embd.weight":
            back["model.embed_tokens.weight"] = arr
        elif name == "output_norm.weight":
            back["model.norm.weight"] = arr
        elif name == "output.weight":
            back["lm_head.weight"] = arr
        else:
            _, i, g, kind = name.split(".")
            layer = f"model.layers.{i}"
            if g == "ffn_gate_exps":
                back[f"{layer}.mlp.experts.gate_up_proj"] = np.concatenate(
                    [arr, held[f"blk.{i}.ffn_up_exps.weight"]], axis=1)
            elif g == "ffn_down_exps":
                back[f"{layer}.mlp.experts.down_proj"] = arr
            elif g == "exp_probs_b":
                back[f"{layer}.mlp.gate.e_score_correction_bias"] = arr
            elif g == "attn_k_b":
                v_b = held[f"blk.{i}.attn_v_b.weight"]
                kv_b = np.concatenate([arr.transpose(0, 2, 1), v_b], axis=1)
                back[f"{layer}.self_attn.kv_b_proj.weight"] = kv_b.reshape(
                    -1, cfg.kv_lora_rank)
            elif g not in ("ffn_up_exps", "attn_v_b"):
                back[f"{layer}.{names[g]}.{kind}"] = arr
    missing, _ = model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                                        for k, v in back.items()}, strict=False)
    assert not missing, missing


CASES = {
    # the current converter (attn_k_b, attn_v_b), float32
    "split-f32": ("q_lora", True, "F32", {}),
    # an older converter's attn_kv_b, Q8_0, one q_proj (llama.cpp rotates interleaved pairs)
    "kv_b-q8_0": ("no_q_lora", False, "Q8_0", dict(rope_interleave=True)),
    # yarn (mscale == mscale_all_dim, as llama.cpp reads yarn_log_multiplier), Q8_0
    "yarn-split-q8_0": ("yarn", True, "Q8_0", dict(rope_parameters=YARN, attention_bias=False,
                                                    n_shared_experts=1)),
}


@pytest.mark.reference
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_matches_transformers(tmp_path, case, backend):
    variant, split, qtype, overrides = CASES[case]
    model = write_deepseek(tmp_path / "hf", variant, **{**SIZES, **overrides})
    path = tmp_path / "m.gguf"
    write_gguf(path, model, split, qtype)
    index = open_model(str(path)).index
    experts = [k for k in index.units if ".mlp.experts." in k]
    first = model.config.first_k_dense_replace
    assert experts == [moe.expert_key(i, e) for i in range(first, model.config.num_hidden_layers)
                       for e in range(N_EXPERTS)]
    logits, tokens, _, _ = run_engine(path, backend)
    np.testing.assert_allclose(logits, hf_logits(model, PROMPT * 3), rtol=1e-4, atol=1e-4)
    assert tokens == hf_greedy(model, PROMPT, N_NEW)


def test_expert_units_are_sub_ranges_of_the_stacked_tensors(tmp_path):
    model = write_deepseek(tmp_path / "hf", **SIZES)
    write_gguf(tmp_path / "m.gguf", model, qtype="Q8_0")
    units = open_model(str(tmp_path / "m.gguf")).index.units
    refs = [units[moe.expert_key(1, e)].tensors["gate_proj.weight"] for e in range(N_EXPERTS)]
    per = refs[0].nbytes
    assert [r.offset - refs[0].offset for r in refs] == [e * per for e in range(N_EXPERTS)]
    assert refs[0].dtype == "Q8_0" and tuple(refs[0].shape) == (32, 64)


@pytest.mark.parametrize("edit,words", [
    ({"expert_gating_func": 1}, ["deepseek2.expert_gating_func", "sigmoid"]),
    ({"expert_group_count": 3}, ["deepseek2.expert_group_count", "'n_group'"]),
    ({"attention.kv_lora_rank": 0}, ["deepseek2.attention.kv_lora_rank"]),
])
def test_bad_gguf_metadata_is_named(tmp_path, edit, words):
    model = write_deepseek(tmp_path / "hf", **SIZES)
    write_gguf(tmp_path / "m.gguf", model, meta_edit=edit)
    with pytest.raises(FormatError) as exc:
        open_model(str(tmp_path / "m.gguf"))
    for word in [*words, "m.gguf"]:
        assert word in str(exc.value)


def test_split_gguf_converts_to_8_bit(tmp_path):
    """stream-convert of a GGUF with attn_k_b / attn_v_b: the packed model keeps them (2-D,
    each head's rows contiguous) and says so in its config; it runs, within 8-bit rounding of
    HF on the file's weights."""
    import json

    from stream_run.convert.convert import convert_model

    model = write_deepseek(tmp_path / "hf", **SIZES, qk_nope_head_dim=32)  # k_b rows of 32
    write_gguf(tmp_path / "m.gguf", model, split=True, qtype="Q8_0")
    convert_model(str(tmp_path / "m.gguf"), str(tmp_path / "q8"), bits=8, group_size=32,
                  progress=False)
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["gguf_kv_b_split"]
    block = open_model(str(tmp_path / "q8")).index.units["layers.1"].tensors
    assert "self_attn.k_b_proj.weight" in block and "self_attn.kv_b_proj.weight" not in block
    logits, tokens, _, _ = run_engine(tmp_path / "q8")
    want = hf_logits(model, PROMPT * 3)
    assert np.abs(logits - want).max() < 0.01 * np.abs(want).max()  # measured: 0.5 %
