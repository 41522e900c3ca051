"""GGUF files (llama.cpp) -> LayerIndex: header and metadata only, never tensor data.

gguf-py's GGUFReader memory-maps the file and parses the header; we keep only, per tensor,
the absolute data offset, byte count, type and shape, then drop the reader (and its map).
GGUF names are translated to HF names by the architecture's table (loaders.arch.Architecture.
gguf_names, gguf-py style with {bid}), which the model file supplies.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from stream_run.loaders.arch import Architecture, Registry
from stream_run.loaders.errors import FormatError, MissingTensorError
from stream_run.loaders.index import EMBED, HEAD, LayerIndex, TensorRef, Unit, layer_key
from stream_run.loaders.schema import check_index
from stream_run.loaders.spec import ModelSpec

GGUF_MAGIC = b"GGUF"
BLOCK = "layers.{bid}"  # == layer_key(bid)

# The types the engine computes (kernels/formats.py FORMATS); stream-convert reads them too.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0",
                   "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Types computed only as stacked expert tensors (llama.cpp's MXFP4_MOE files: ffn_*_exps)
EXPERT_TYPES = ("MXFP4",)
# Metadata read for any architecture that has it: {arch}.<key> -> HF config field. A
# sliding_window_pattern array (llama.cpp: one bool per layer, true = sliding) -> layer_types.
OPTIONAL_KEYS = {
    "attention.sliding_window": "sliding_window",
    "attention.sliding_window_pattern": "sliding_window_pattern",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
    "rope.freq_base_swa": "rope_local_base_freq",
    # Mixture-of-Experts (models/moe.py's gguf_config renames them per family)
    "expert_count": "num_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
}
_BLK = re.compile(r"^blk\.(\d+)\.")
_REQUIRED = object()


def unpermute_rows(data: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation on whole rows of raw bytes.

    convert_hf_to_gguf.py (LlamaModel.permute) reorders the rows of q_proj/k_proj (weights and
    biases) so that ggml's interleaved ("normal") RoPE equals HF's rotate-half RoPE:
    HF -> GGUF is `w.reshape(n_head, 2, rows//n_head//2, *rest).swapaxes(1, 2).reshape(w.shape)`,
    i.e. within each head the two halves are interleaved: GGUF row 2*i + j = HF row j*half + i.
    This applies the inverse. Quant blocks run along a row, so rows move as opaque bytes.

    Args:
        data: (rows, row_bytes) uint8, one tensor's bytes as stored in the GGUF file.
        n_head: heads the rows were permuted by (n_head for q, n_head_kv for k).

    Returns:
        A new contiguous (rows, row_bytes) array with the rows in HF order.
    """
    rows = data.shape[0]
    half = rows // n_head // 2
    # (n_head, half, 2, row_bytes) -> (n_head, 2, half, row_bytes)
    return data.reshape(n_head, half, 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def hf_name(gguf_name: str, names: dict[str, tuple[str, str]] | Any
            ) -> tuple[str, str] | None:
    """(unit key, HF name inside the unit) for a GGUF tensor name, by an architecture's
    gguf_names table; None if not in the table."""
    m = _BLK.match(gguf_name)
    template = _BLK.sub("blk.{bid}.", gguf_name, count=1) if m else gguf_name
    entry = names.get(template)
    if entry is None:
        return None
    unit, rel = entry
    return (layer_key(int(m.group(1))) if m else unit), rel


def open_gguf(path: str | os.PathLike[str], registry: Registry
              ) -> tuple[LayerIndex, dict[str, Any]]:
    """Index a .gguf file without reading tensor data, and check it against its architecture
    (resolved from general.architecture by registry).

    Returns:
        The LayerIndex and the file's metadata as plain Python values (tokenizer.*, etc.).

    Raises:
        FormatError: not a GGUF file, truncated, unsupported architecture or tensor type,
            unknown tensor names, or shapes that disagree with the metadata.
        MissingTensorError: a tensor the architecture needs is absent.
    """
    path = os.fspath(path)
    metadata, infos = _read_header(path)
    arch = metadata.get("general.architecture")
    # llama.cpp writes Mixtral as "llama" with experts: the expert count picks the family
    experts = bool(isinstance(arch, str) and metadata.get(f"{arch}.expert_count"))
    desc = registry.for_gguf(arch, path, experts=experts)
    spec = spec_from_metadata(metadata, infos, path, desc)
    if spec.num_hidden_layers > len(infos):  # every block has tensors; a corrupt count would
        raise FormatError(                    # make a unit per claimed block first
            f"{path}: {arch}.block_count={spec.num_hidden_layers} but the file has only "
            f"{len(infos)} tensors; the header is corrupt")
    expected = desc.expected_shapes(spec)
    layers = [layer_key(i) for i in range(spec.num_hidden_layers)]
    # in pass order; units beyond embed, blocks and head (routed experts) come from expected
    keys = dict.fromkeys([EMBED, *layers, *(k for k in expected if k not in (EMBED, HEAD)), HEAD])
    units: dict[str, Unit] = {k: Unit(k) for k in keys}
    unknown = []
    for name, (type_name, shape, offset, nbytes) in infos.items():
        where = hf_name(name, desc.gguf_names)
        if where is None:
            unknown.append(name)
            continue
        key, rel = where
        if key not in units:
            raise FormatError(
                f"{path}: tensor {name!r} is for a layer beyond {arch}.block_count="
                f"{spec.num_hidden_layers}"
            )
        unpermute = None
        if rel in desc.gguf_permuted:
            q = desc.gguf_permuted[rel] == "q"
            unpermute = spec.num_attention_heads if q else spec.num_key_value_heads
            if shape[0] % (2 * unpermute):
                raise FormatError(
                    f"{path}: tensor {name!r} has {shape[0]} rows, not divisible by "
                    f"2 * {unpermute} heads; cannot undo llama.cpp's q/k permutation"
                )
        ref = TensorRef(rel, path, offset, nbytes, type_name, shape, unpermute)
        try:  # a tensor stacking every expert -> each expert's byte sub-range, in its own unit
            placed = [(key, ref)] if desc.hf_units is None else desc.hf_units(spec, key, ref)
        except FormatError as exc:
            raise FormatError(f"{path}: tensor {name!r}: {exc}") from None
        for key, ref in placed:
            units[key].tensors[ref.name] = ref
    if unknown:
        raise FormatError(
            f"{path}: unknown tensor name(s) {unknown[:4]} ({len(unknown)} in all) for "
            f"architecture {arch!r} (the tensors of model_type {spec.model_type!r} are listed "
            "by its model file in models/)"
        )
    index = LayerIndex(spec=spec, units=units, source=path)
    _check_complete(index, desc, expected)
    check_index(index, expected)
    return index, metadata


def _read_header(path: str) -> tuple[dict[str, Any], dict[str, tuple]]:
    """Metadata as Python values, and per tensor (type name, HF-order shape, offset, nbytes)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        size = os.path.getsize(path)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise FormatError(
            f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r}); "
            "hint: pass a .gguf produced by llama.cpp's convert_hf_to_gguf.py or a model directory"
        )
    import gguf  # deferred: only GGUF users pay for the import

    from stream_run.loaders.gguf_bounds import check_bounds

    check_bounds(path)  # gguf-py would walk a corrupt array count for minutes
    problem = None
    try:
        reader = gguf.GGUFReader(path, "r")
        metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        tensors = [(t.name, t.tensor_type.name, [int(d) for d in t.shape], int(t.data_offset),
                    int(t.n_bytes)) for t in reader.tensors]
        del reader  # releases the memory map; we keep no view of tensor data
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:  # raised out here: a chained traceback would keep the map alive
        raise FormatError(  # check_bounds found every length in the file: not cut short
            f"{path}: not a valid GGUF file: gguf-py cannot read its header ({problem}); "
            "hint: re-download or re-convert it"
        )
    infos = {}
    for name, type_name, ne, offset, nbytes in tensors:
        if type_name not in SUPPORTED_TYPES and not (
                type_name in EXPERT_TYPES and name.endswith("_exps.weight")):
            raise FormatError(
                f"{path}: tensor {name!r} has unsupported type {type_name}; supported: "
                f"{', '.join(SUPPORTED_TYPES)} ({', '.join(EXPERT_TYPES)}: stacked expert "
                "tensors ffn_*_exps only); hint: use a GGUF quantized to one of those"
            )
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]
        if not ne or ne[0] % block:
            raise FormatError(f"{path}: tensor {name!r} of type {type_name} has shape {ne}, "
                              f"whose first dim is not a multiple of the block size {block}")
        if offset + nbytes > size:
            raise FormatError(
                f"{path}: tensor {name!r} needs bytes [{offset}, {offset + nbytes}) but the file "
                f"has {size} bytes; the file is truncated; hint: re-download it"
            )
        infos[name] = (type_name, tuple(reversed(ne)), offset, nbytes)  # GGUF ne is innermost first
    return metadata, infos


def spec_from_metadata(meta: dict[str, Any], infos: dict[str, tuple], path: str,
                       desc: Architecture) -> ModelSpec:
    """Map GGUF metadata ({arch}.*, tokenizer.ggml.*) onto HF config.json fields.

    Raises:
        FormatError: a missing required key, or unsupported RoPE.
    """
    arch = meta.get("general.architecture")

    def get(key: str, default: Any = _REQUIRED) -> Any:
        val = meta.get(f"{arch}.{key}", default)
        if val is _REQUIRED:
            raise FormatError(f"{path}: missing GGUF metadata key {arch}.{key!s}")
        if isinstance(val, list):
            raise FormatError(f"{path}: {arch}.{key} is a per-layer array; unsupported")
        return float(str(np.float32(val))) if isinstance(val, float) else val  # f32 -> 1e-05

    n_heads = get("attention.head_count")
    embd = infos.get("token_embd.weight")
    vocab = embd[1][0] if embd else get("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])))
    tokens = meta.get("tokenizer.ggml.tokens")
    if embd and isinstance(tokens, list) and tokens and len(tokens) != vocab:
        # llama.cpp pads the token list to the embedding's rows; a mismatch is a broken file
        raise FormatError(f"{path}: tensor 'token_embd.weight' has {vocab} rows but "
                          f"tokenizer.ggml.tokens has {len(tokens)} tokens; expected one row "
                          "per token")
    cfg: dict[str, Any] = {
        "model_type": desc.model_type,
        "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", n_heads),
        "head_dim": get("attention.key_length", None),
        "vocab_size": vocab,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": get("rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(meta, arch, infos, path),
        "max_position_embeddings": get("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in infos,
        "attention_bias": "blk.0.attn_q.bias" in infos,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_token_ids(meta),
    }
    value_length = get("attention.value_length", None)
    rope_dims = get("rope.dimension_count", None)
    head_dim = cfg["head_dim"] or cfg["hidden_size"] // n_heads
    if rope_dims is not None and rope_dims != head_dim:
        if not 0 < rope_dims < head_dim:
            raise FormatError(f"{path}: {arch}.rope.dimension_count={rope_dims} is not in "
                              f"1..head_dim={head_dim}")
        cfg["partial_rotary_factor"] = rope_dims / head_dim  # the model file says if it can
    for key, field in OPTIONAL_KEYS.items():
        val = meta.get(f"{arch}.{key}")
        if isinstance(val, list) and key == "attention.sliding_window_pattern":
            cfg["layer_types"] = ["sliding_attention" if v else "full_attention" for v in val]
        elif val:  # 0 means none, as llama.cpp reads it
            cfg[field] = get(key)
    if desc.gguf_config is not None:
        # every {arch}.* key, for a family whose fields OPTIONAL_KEYS does not cover (MLA)
        cfg["gguf_metadata"] = {k.removeprefix(f"{arch}."): v for k, v in meta.items()
                                if k.startswith(f"{arch}.")}
        try:
            cfg = desc.gguf_config(cfg)
        except ValueError as exc:
            raise FormatError(f"{path}: {exc}") from None
        cfg.pop("gguf_metadata", None)
    # a family whose value heads differ from its key heads says so with v_head_dim
    if value_length is not None and value_length != cfg["head_dim"] and "v_head_dim" not in cfg:
        raise FormatError(f"{path}: {arch}.attention.value_length={value_length} differs from "
                          f"key_length={cfg['head_dim']}; unsupported")
    return ModelSpec.from_dict({**cfg, **desc.config_overrides}, source=path)


def eos_token_ids(meta: dict[str, Any]) -> list[int]:
    """End-of-generation ids: eos plus llama.cpp's eot/eom when the file sets them."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        val = meta.get(f"tokenizer.ggml.{key}")
        if isinstance(val, int) and val not in ids:
            ids.append(val)
    return ids


def _rope_scaling(meta: dict, arch: str, infos: dict, path: str) -> dict[str, Any] | None:
    if "rope_freqs.weight" in infos:
        raise FormatError(
            f"{path}: RoPE frequency factors stored as tensor 'rope_freqs.weight' (llama3-style "
            "scaling) are not supported from GGUF; hint: use the HF model directory instead"
        )
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    if kind is None and factor is not None:
        kind = "linear"  # old files only had rope.scale_linear
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    out: dict[str, Any] = {"rope_type": kind, "factor": float(str(np.float32(factor or 1.0)))}
    orig = meta.get(f"{arch}.rope.scaling.original_context_length")
    if orig is not None:
        out["original_max_position_embeddings"] = orig
    if kind != "yarn":
        return out

    def f32(key: str) -> float | None:
        """A float32 metadata value as the decimal it was written from (0.1, not 0.100000001)."""
        val = meta.get(f"{arch}.rope.scaling.{key}")
        return None if val is None else float(str(np.float32(val)))

    # convert_hf_to_gguf.py writes HF's beta_fast/beta_slow/attention_factor under these keys
    for key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                        ("yarn_attn_factor", "attention_factor")):
        val = f32(key)
        if val is not None:
            out[hf_key] = val
    log_mul = f32("yarn_log_multiplier")
    if log_mul is not None:
        # DeepSeek: log_mul = 0.1 * mscale_all_dim. llama.cpp scales the softmax by the yarn
        # mscale squared and cancels it in the rotation, i.e. HF with mscale == mscale_all_dim.
        m = float(str(np.float32(log_mul * 10)))
        out["mscale"] = out["mscale_all_dim"] = m
    ext = f32("yarn_ext_factor")
    if ext is not None and ext >= 0 and ext != 1.0:
        # HF's ramp has no such weight; a negative value means llama.cpp's default (1.0)
        raise FormatError(f"{path}: {arch}.rope.scaling.yarn_ext_factor={ext} is not supported "
                          "(HF yarn corresponds to 1.0)")
    return out


def _check_complete(index: LayerIndex, desc: Architecture,
                    expected: dict[str, dict[str, tuple[int, ...]]]) -> None:
    """Name a missing tensor, or one of the wrong shape, by its GGUF name too, before
    check_index's checks. A unit inside a layer ("layers.{i}.mlp.experts.{e}") takes its
    tensors from the layer's stacked ones ("mlp.experts.{name}" in gguf_names)."""
    gguf_of = {rel: g for g, (_, rel) in desc.gguf_names.items()}

    def gguf_name(key: str, rel: str) -> str:
        parts = key.split(".")
        bid = parts[1] if parts[0] == "layers" and len(parts) > 1 else ""
        sub = ".".join(p for p in parts[2:] if not p.isdigit())
        return gguf_of.get(f"{sub}.{rel}" if sub else rel, "?").replace("{bid}", bid)

    for key, shapes in expected.items():
        have = index.units[key].tensors
        missing = [n for n in shapes if n not in have]
        if missing:
            names = [gguf_name(key, n) for n in missing[:4]]
            raise MissingTensorError(
                f"{index.source}: unit {key!r} is missing tensor(s) {missing[:4]} (GGUF {names}), "
                f"expected for model_type {index.spec.model_type!r}"
            )
        for name, shape in shapes.items():
            if tuple(have[name].shape) != shape:
                raise FormatError(
                    f"{index.source}: tensor {name!r} of unit {key!r} has shape "
                    f"{list(have[name].shape)}, expected {list(shape)} from the config "
                    f"(GGUF {gguf_name(key, name)!r})")
