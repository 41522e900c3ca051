"""Synthetic Mixture-of-Experts models: named shapes (Qwen3-30B-A3B, Mixtral 8x7B, tiny ones)
and an optional skewed router, for the HF and GGUF synths (bench.synth, bench.synth_gguf).

Random weights route about uniformly: every expert is as likely as any other, so an expert
cache sees no popular experts to keep. --router-skew S makes expert popularity Zipf-like
(expert of rank r gets a router logit offset of -S ln r, ranks a random permutation per layer)
with weights alone, so llama.cpp runs the identical file:
- every token's embedding has the constant c = sqrt(hidden) in dim 0;
- no sublayer writes dim 0 (row 0 of o_proj and of every down_proj is zero), so the residual
  stream keeps h[0] = c in every layer;
- the router's column 0 holds offset_e / x0, where x0 is what the post-attention RMSNorm makes
  of c at that depth (estimated: the residual's other dims grow by about one unit of variance
  per sublayer). The offsets are therefore approximate; stream-bench reports the popularity
  the router actually gives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MOE_ARCHS = ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss")  # qwen2_moe: a shared expert size
# experts written fused per layer ([n_experts, ...] tensors), as these families' Hub
# checkpoints hold them
FUSED_ARCHS = ("gpt_oss",)
MXFP4_SCALE = 120  # e8m0 exponent of synthetic MXFP4 blocks: weights of std ~0.018 (2880 wide)


@dataclass(frozen=True)
class MoEShape:
    archs: tuple[str, ...]
    dims: tuple[int, int, int, int, int, int]  # hidden, intermediate, layers, heads, kv, vocab
    head_dim: int
    n_experts: int
    top_k: int
    expert_size: int  # mixtral: == intermediate


SHAPES = {
    # Qwen/Qwen3-30B-A3B config.json
    "qwen3-30b-a3b": MoEShape(("qwen3_moe",), (2048, 6144, 48, 32, 4, 151936), 128, 128, 8, 768),
    # a few GB at 4 bits: Qwen3-30B-A3B's widths, 16 layers, 64 experts, a 32k vocabulary
    "qwen3-moe-mid": MoEShape(("qwen3_moe",), (2048, 6144, 16, 32, 4, 32000), 128, 64, 8, 768),
    # Qwen/Qwen3-235B-A22B config.json
    "qwen3-235b-a22b": MoEShape(("qwen3_moe",), (4096, 12288, 94, 64, 4, 151936), 128, 128, 8,
                                1536),
    # mistralai/Mixtral-8x7B-v0.1 config.json
    "mixtral-8x7b": MoEShape(("mixtral",), (4096, 14336, 32, 32, 8, 32000), 128, 8, 2, 14336),
    # deepseek-ai/DeepSeek-V3 config.json (671B; MLA from head_dim 128: see deepseek_fields)
    "deepseek-v3": MoEShape(("deepseek_v3",), (7168, 18432, 61, 128, 128, 129280), 128, 256, 8,
                            2048),
    # moonshotai/Kimi-K2-Instruct config.json (1T: DeepSeek-V3's layout, 384 experts in one
    # group, 64 heads, the first layer dense; see deepseek_fields)
    "kimi-k2": MoEShape(("deepseek_v3",), (7168, 18432, 61, 64, 64, 163840), 128, 384, 8, 2048),
    # a few GB at 4 bits: DeepSeek-V3's MLA and expert widths at 2048 hidden, 8 layers (the
    # first dense), 64 experts top-8 in 8 groups, a 32k vocabulary
    "deepseek-v3-mini": MoEShape(("deepseek_v3",), (2048, 6144, 8, 16, 16, 32000), 128, 64, 8,
                                 768),
    "tiny-moe": MoEShape(MOE_ARCHS, (64, 128, 4, 4, 2, 320), 16, 16, 2, 64),
    # openai/gpt-oss-20b and gpt-oss-120b config.json (experts MXFP4 with --dtype mxfp4)
    "gpt-oss-20b": MoEShape(("gpt_oss",), (2880, 2880, 24, 64, 8, 201088), 64, 32, 4, 2880),
    "gpt-oss-120b": MoEShape(("gpt_oss",), (2880, 2880, 36, 64, 8, 201088), 64, 128, 4, 2880),
}


def shape_fields(shape: str, arch: str) -> dict:
    """SynthSpec fields of a named MoE shape for arch.

    Raises:
        ValueError: the shape is not an MoE shape of arch.
    """
    s = SHAPES[shape]
    if arch not in s.archs:
        raise ValueError(f"--shape {shape} is a {'/'.join(s.archs)} shape, got --arch {arch}")
    e, i, n, h, kv, v = s.dims
    return dict(arch=arch, hidden_size=e, intermediate_size=s.expert_size
                if arch in ("mixtral", "gpt_oss") else i, num_hidden_layers=n,
                num_attention_heads=h, num_key_value_heads=kv,
                vocab_size=v, head_dim=s.head_dim, num_experts=s.n_experts,
                num_experts_per_tok=s.top_k, moe_intermediate_size=s.expert_size)


MIXTRAL = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def hf_name(arch: str, full: str) -> str:
    """A full HF tensor name as the family's Hub checkpoints spell it: Mixtral's experts are
    block_sparse_moe.experts.{e}.w1/w3/w2 and its router block_sparse_moe.gate."""
    if arch != "mixtral" or ".mlp." not in full:
        return full
    head, tail = full.split(".mlp.", 1)
    if tail.startswith("experts."):
        _, e, linear, what = tail.split(".")
        tail = f"experts.{e}.{MIXTRAL[linear]}.{what}"
    return f"{head}.block_sparse_moe.{tail}"


def config_fields(spec) -> dict:
    """config.json's expert fields (as transformers names them per family)."""
    if spec.arch == "deepseek_v3":
        return deepseek_fields(spec)
    if spec.arch == "mixtral":
        return {"num_local_experts": spec.num_experts,
                "num_experts_per_tok": spec.num_experts_per_tok}
    if spec.arch == "gpt_oss":  # gpt-oss-20b's attention and RoPE; experts intermediate_size
        return {"num_local_experts": spec.num_experts,
                "num_experts_per_tok": spec.num_experts_per_tok, "sliding_window": 128,
                "attention_bias": True,
                "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                    "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0,
                                    "original_max_position_embeddings": 4096},
                **({"quantization_config": {"quant_method": "mxfp4"}}
                   if spec.dtype == "mxfp4" else {})}
    return {"num_experts": spec.num_experts, "num_experts_per_tok": spec.num_experts_per_tok,
            "moe_intermediate_size": spec.moe_intermediate_size, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": []}


def deepseek_fields(spec) -> dict:
    """deepseek_v3's fields, scaled from head_dim as DeepSeek-V3 sets them at 128: no-rope
    q/k and v heads of head_dim, a rope part of head_dim / 2, a latent of 4 head_dim, a q LoRA
    rank of 12 head_dim; 8 expert groups (4 kept) where 8 divide the experts in groups of at
    least 2, else one; one shared expert; the first layer dense (DeepSeek-V3: 3 of 61).
    Kimi K2's 384 experts: one group, only the first layer dense, as its config has them."""
    d = spec.head_dim or spec.hidden_size // spec.num_attention_heads
    rope = max(2, d // 2 // 2 * 2)
    kimi = spec.num_experts == 384
    n_group = 8 if spec.num_experts % 8 == 0 and spec.num_experts >= 16 and not kimi else 1
    return {"n_routed_experts": spec.num_experts,
            "num_experts_per_tok": spec.num_experts_per_tok,
            "moe_intermediate_size": spec.moe_intermediate_size, "n_shared_experts": 1,
            "n_group": n_group, "topk_group": max(1, n_group // 2),
            "first_k_dense_replace": 3 if spec.num_hidden_layers > 8 and not kimi else 1,
            "norm_topk_prob": True, "routed_scaling_factor": 2.827 if kimi else 2.5,
            "scoring_func": "sigmoid",
            "qk_nope_head_dim": d, "qk_rope_head_dim": rope, "v_head_dim": d,
            "kv_lora_rank": 4 * d, "q_lora_rank": 12 * d, "rope_interleave": True,
            # as save_pretrained writes them: transformers repeats no KV heads for MLA, and
            # its RoPE turns head_dim dims (qk_rope_head_dim)
            "num_key_value_heads": spec.num_attention_heads, "head_dim": rope}


def deepseek_gguf_keys(spec) -> tuple[dict[str, int], dict[str, float | bool]]:
    """llama.cpp's deepseek2 metadata for deepseek_fields (uint32 keys; float32 and bool
    keys), as its converter wrote them before splitting kv_b_proj (one attn_kv_b; per-head
    key and value widths under key_length and value_length), which llama.cpp still reads;
    the expert keys as the current converter writes them."""
    f = deepseek_fields(spec)
    ints = {"attention.head_count_kv": spec.num_attention_heads,
            "attention.key_length": f["qk_nope_head_dim"] + f["qk_rope_head_dim"],
            "attention.value_length": f["v_head_dim"],
            "attention.q_lora_rank": f["q_lora_rank"], "attention.kv_lora_rank": f["kv_lora_rank"],
            "rope.dimension_count": f["qk_rope_head_dim"],
            "leading_dense_block_count": f["first_k_dense_replace"],
            "expert_shared_count": f["n_shared_experts"], "expert_gating_func": 2,  # sigmoid
            "expert_group_count": f["n_group"], "expert_group_used_count": f["topk_group"]}
    return ints, {"expert_weights_scale": f["routed_scaling_factor"],
                  "expert_weights_norm": f["norm_topk_prob"]}


def check(spec) -> None:
    """Raises ValueError (one line, naming the flag) for MoE fields synth cannot write."""
    if spec.dtype == "mxfp4" and spec.arch != "gpt_oss":
        raise ValueError(f"--dtype mxfp4 (MXFP4 experts) needs --arch gpt_oss, got {spec.arch!r}")
    if spec.arch not in MOE_ARCHS:
        if spec.num_experts or spec.router_skew:
            raise ValueError(f"--experts and --router-skew need --arch "
                             f"{' or '.join(MOE_ARCHS)}, got {spec.arch!r}")
        return
    if spec.router_skew and spec.arch == "gpt_oss":  # its biases write the residual's dim 0
        raise ValueError("--router-skew is not supported for --arch gpt_oss")
    if spec.num_experts <= 0 or not 0 < spec.num_experts_per_tok <= spec.num_experts:
        raise ValueError(f"--arch {spec.arch} needs an MoE shape ({', '.join(SHAPES)}) or "
                         "--shape custom with --experts and --experts-per-tok <= --experts")
    if spec.moe_intermediate_size <= 0:
        raise ValueError("--expert-size must be > 0")
    if spec.arch == "deepseek_v3":
        from stream_run.models.deepseek import deepseek_args

        try:
            deepseek_args({**deepseek_fields(spec), "num_hidden_layers": spec.num_hidden_layers})
        except ValueError as exc:
            raise ValueError(f"--arch deepseek_v3: {exc} (from --experts, --experts-per-tok, "
                             "--head-dim)") from None
    if spec.arch == "gpt_oss" and spec.moe_intermediate_size != spec.intermediate_size:
        raise ValueError(f"--expert-size must equal --intermediate-size for --arch gpt_oss (its "
                         f"experts are intermediate_size wide), got {spec.moe_intermediate_size} "
                         f"and {spec.intermediate_size}")
    if not 0 <= spec.router_skew <= 8:
        raise ValueError(f"--router-skew must be in 0..8 (a Zipf exponent), got "
                         f"{spec.router_skew}")


def fuse_experts(shapes: dict[str, dict[str, tuple[int, ...]]], n_experts: int
                 ) -> dict[str, dict[str, tuple[int, ...]]]:
    """expected_shapes with each layer's expert units as fused tensors of its block
    ("mlp.experts.{name}", shape (n_experts, ...)), as FUSED_ARCHS' checkpoints store them."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, unit in shapes.items():
        layer, sep, expert = key.partition(".mlp.experts.")
        if not sep:
            out[key] = dict(unit)
        elif expert == "0":
            out[layer].update({f"mlp.experts.{n}": (n_experts, *s) for n, s in unit.items()})
    return out


def mxfp4_chunk(name: str, pool_bytes: np.ndarray, rng: np.random.Generator, n: int
                ) -> np.ndarray | None:
    """n bytes of a synthetic MXFP4 tensor (random codes, MXFP4_SCALE exponents), or None for
    a tensor of another kind."""
    if name.endswith("_scales"):
        return np.full(n, MXFP4_SCALE, np.uint8)
    if name.endswith("_blocks"):
        start = int(rng.integers(0, pool_bytes.size - n + 1))
        return pool_bytes[start:start + n]
    return None


# --- the skewed router: edits on the chunks a tensor is written in ---------------------------
Edit = Callable[[int, np.ndarray], np.ndarray]  # (first unit's index, units) -> units


def skew_edit(spec, name: str, shape: tuple[int, ...], unit_elems: int,
              embed_block: np.ndarray | None = None) -> Edit | None:
    """The edit --router-skew makes to one tensor (HF name or GGUF name), on chunks of units
    (values for floats, blocks of unit_elems values for quantized types); None: unchanged.

    embed_block: the quantized block holding [c, 0, ..., 0] (the embedding's first block of
    each row) for a quantized embedding.
    """
    if not spec.router_skew:
        return None
    E = spec.hidden_size
    c = math.sqrt(E)
    if name in ("model.embed_tokens.weight", "token_embd.weight"):
        fill = np.float32(c) if embed_block is None else embed_block
        if embed_block is None and unit_elems != 1:
            raise ValueError("a quantized embedding needs its [c, 0, ...] block")
        return _periodic(E // unit_elems, 1, fill)
    if name.endswith(("o_proj.weight", "down_proj.weight", "attn_output.weight",
                      "ffn_down_exps.weight", ".w2.weight", "ffn_down_shexp.weight",
                      "ffn_down.weight")):
        return _periodic(math.prod(shape[-2:]) // unit_elems, shape[-1] // unit_elems, 0)
    if name.endswith(("mlp.gate.weight", "ffn_gate_inp.weight", "block_sparse_moe.gate.weight")):
        layer = int(name.split(".")[2 if name.startswith("model.") else 1])
        return _router_column(router_offsets(spec, layer) / _x0(spec, layer), E)
    return None


def router_offsets(spec, layer_idx: int) -> np.ndarray:
    """-S ln(rank) per expert, ranks a permutation by (seed, layer)."""
    rank = np.random.default_rng([spec.seed, layer_idx]).permutation(spec.num_experts) + 1
    return (-spec.router_skew * np.log(rank)).astype(np.float32)


def _x0(spec, layer_idx: int) -> float:
    """dim 0 after the post-attention RMSNorm of layer i: c / rms(h), the other dims' variance
    about 1 + 2i + 1 (the embedding, two sublayers a layer, this layer's attention)."""
    E = spec.hidden_size
    var = (E - 1) * (2 + 2 * layer_idx) / E + 1.0  # c^2 / E = 1
    return math.sqrt(E) / math.sqrt(var)


def _periodic(period: int, count: int, fill) -> Edit:
    """Units whose index modulo period is below count become fill."""
    def edit(start: int, units: np.ndarray) -> np.ndarray:
        idx = np.arange(start, start + units.shape[0])
        mask = idx % period < count
        if mask.any():
            units = units.copy()
            units[mask] = fill
        return units
    return edit


def _router_column(col: np.ndarray, E: int) -> Edit:
    """The router (n_experts, E) in float values: column 0 becomes col."""
    def edit(start: int, units: np.ndarray) -> np.ndarray:
        idx = np.arange(start, start + units.shape[0])
        mask = idx % E == 0
        if mask.any():
            units = units.astype(np.float32)
            units[mask] = col[idx[mask] // E]
        return units
    return edit


def popularity(counts: np.ndarray) -> dict:
    """Summary of expert picks (n_layers, n_experts): the share of picks the top 10 % of each
    layer's experts take (uniform: 10 %), and the max/mean ratio."""
    counts = np.asarray(counts, np.float64)
    top = max(1, counts.shape[1] // 10)
    srt = -np.sort(-counts, axis=1)
    share = srt[:, :top].sum() / max(1.0, counts.sum())
    return {"top10pct_share": float(share),
            "max_over_mean": float(srt[:, 0].mean() / max(1e-9, counts.mean()))}
