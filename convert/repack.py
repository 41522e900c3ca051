"""stream-convert's tensor work: what becomes of each tensor (the plan), and its conversion.

A weight already in MLX's affine form (MLX-packed U32; GGUF Q4_0/Q4_1/Q8_0 blocks through
kernels.formats.gguf_to_affine, group 32) is repacked exactly whenever the target can hold it:
at least as many bits, and a group size dividing the source's. Q4_1 -> 4-bit group 32 copies the
blocks; Q4_1 -> 8-bit group 32 keeps the 4-bit codes in 8-bit fields. Anything else is
dequantized to float32 (K-quants through gguf-py's reference dequantization) and requantized by
the chosen quantizer: "rtn" (kernels.quant.quantize, equal to mx.quantize; the default) or
"mse" (kernels.quant.quantize_search: a clip search and least-squares scale and bias per
group, scored with the float16 values written). mse halves the squared weight error at 4-bit
group 64 yet measured worse perplexity on SmolLM2 at 3, 4 and 5 bits (GPL-3 and Apache-2.0
texts; better at 6 and 8), so it is opt-in: RTN keeps each group's largest-magnitude weight
and zero exactly, which seems to matter more than squared error. Dense tensors kept at full
precision are copied byte for byte. The third quantizer, "gptq", needs the whole model and a
calibration text: convert/calibrate.py runs it and hands its weights to convert_unit.

Scales and biases are stored as float16, as mlx-lm does for float16 models: GGUF's block scales
and minimums are float16 already (so the copies stay exact), float16 has 3 more mantissa bits
than bfloat16, and it halves their bytes next to float32. A tensor whose scales or biases do not
fit float16 (overflow; or, for a lossless copy, any value float16 cannot hold exactly) keeps
float32 for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_run.convert.recipes import Quant, Recipe
from stream_run.engine.errors import ConvertError
from stream_run.kernels.formats import (
    DENSE_DTYPES,
    GGUF_BLOCK,
    GGUF_TYPES,
    gguf_to_affine,
    to_float32,
)
from stream_run.kernels.quant import (
    SUPPORTED_GROUP_SIZES,
    QuantizedWeight,
    dequantize,
    pack,
    quantize,
    quantize_search,
    unpack,
)
from stream_run.loaders import HostTensor, LayerIndex, Unit
from stream_run.loaders.hf import full_name
from stream_run.loaders.safetensors_file import DTYPE_SIZES
from stream_run.loaders.schema import quant_params

ROW_CHUNK_ELEMS = 1 << 22  # float32 elements dequantized and requantized at once (16 MB)
COMPANIONS = ("scales", "biases")
# requantization methods by name; "rtn" is bit-exact with mx.quantize
QUANTIZERS: dict[str, Callable[[np.ndarray, int, int], QuantizedWeight]] = {
    "mse": quantize_search, "rtn": quantize}
DEFAULT_QUANTIZER = "rtn"

# (name, safetensors dtype, shape, array holding exactly the stored bytes)
OutTensor = tuple[str, str, tuple[int, ...], np.ndarray]


@dataclass(frozen=True)
class TensorPlan:
    rel: str  # name inside the unit, e.g. "self_attn.q_proj.weight"
    name: str  # full HF name, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple[int, ...]  # logical (unquantized) shape
    dtype: str  # storage dtype in the source: "BF16", "Q4_K", "U32", ...
    source_quant: Quant | None  # bits/group of an MLX-packed (U32) source
    target: Quant | None  # None: keep full precision

    @property
    def source_affine(self) -> Quant | None:
        """Bits and group size of a source already in affine form (MLX U32, GGUF Q4_0/Q4_1/
        Q8_0), else None."""
        if self.dtype in GGUF_TYPES:
            return Quant(GGUF_TYPES[self.dtype][0], GGUF_BLOCK)
        return self.source_quant

    @property
    def lossless(self) -> bool:
        """The target holds the source exactly: a dense copy, or an affine source at no more
        bits than the target with a group size the target's divides."""
        src = self.source_affine
        if self.target is None:
            return self.dtype in DENSE_DTYPES
        return src is not None and src.bits <= self.target.bits \
            and src.group_size % self.target.group_size == 0


def plan_unit(index: LayerIndex, unit: Unit, recipe: Recipe,
              keep_source_groups: bool = False) -> list[TensorPlan]:
    """What becomes of each tensor of a unit; every group size is checked before any work.

    keep_source_groups: a tensor already in affine form (GGUF Q4_0/Q4_1/Q8_0, MLX-packed) at
    no more bits than its target keeps its own group size, so it is copied exactly instead of
    re-quantized at the recipe's (the group size was not chosen by the user).

    Raises:
        ConvertError: a group size does not divide a tensor's input dimension (names it).
    """
    plans = []
    n_layers = index.spec.num_hidden_layers
    for rel, ref in unit.tensors.items():
        prefix, _, part = rel.rpartition(".")
        if part in COMPANIONS and f"{prefix}.weight" in unit.tensors \
                and unit.tensors[f"{prefix}.weight"].dtype == "U32":
            continue  # travels with its packed weight
        shape, source_quant = tuple(ref.shape), None
        if ref.dtype == "U32":
            params = quant_params(unit.quantization, prefix)
            assert params is not None  # check_index refuses U32 without a quantization section
            source_quant = Quant(*params)
            shape = (shape[0], shape[1] * 32 // source_quant.bits)
        name = full_name(unit.key, rel)
        target = recipe.resolve(name, shape, n_layers)
        src = TensorPlan(rel, name, shape, ref.dtype, source_quant, None).source_affine
        if keep_source_groups and target is not None and src is not None \
                and src.bits <= target.bits and src.group_size != target.group_size:
            target = Quant(target.bits, src.group_size)
        if target is not None and shape[1] % target.group_size:
            raise ConvertError(_group_error(index.source, name, shape, target, recipe))
        plans.append(TensorPlan(rel, name, shape, ref.dtype, source_quant, target))
    return plans


def _group_error(source: str, name: str, shape: tuple[int, ...], q: Quant, recipe: Recipe) -> str:
    fits = [g for g in SUPPORTED_GROUP_SIZES if shape[1] % g == 0]
    hint = (f"--group-size {max(fits)} divides it, or set its group size in a recipe file"
            if fits else "keep it at full precision with a recipe rule (\"bits\": null)")
    return (f"{source}: tensor {name!r} {list(shape)}: input dimension {shape[1]} is not "
            f"divisible by group_size {q.group_size} (recipe {recipe.name!r}); hint: {hint}")


def convert_unit(plans: list[TensorPlan], raw: Mapping[str, HostTensor],
                 quantizer: str = DEFAULT_QUANTIZER,
                 requantized: Mapping[str, QuantizedWeight] | None = None
                 ) -> tuple[list[OutTensor], dict[str, dict[str, Any]]]:
    """Convert one unit's tensors; quantizer (a QUANTIZERS name) requantizes what is not copied.

    Args:
        requantized: weights already requantized elsewhere (GPTQ), by name in the unit; they
            are written as given in place of the quantizer's result.

    Returns:
        The tensors to write, and per written tensor its manifest entry (dtype, shape, bits,
        group_size).

    Raises:
        ConvertError: a tensor holds NaN or inf (names it).
    """
    out: list[OutTensor] = []
    for p in plans:
        try:
            if requantized is not None and p.rel in requantized:
                out += _affine(p.name.removesuffix(".weight"), requantized[p.rel], exact=False)
            else:
                out += convert_tensor(p, raw, quantizer)
        except ValueError as exc:
            raise ConvertError(f"tensor {p.name!r}: {exc}") from None
    quant_of = {p.name.removesuffix(".weight"): p.target for p in plans if p.target}
    entries = {}
    for name, dtype, shape, _ in out:
        module, _, part = name.rpartition(".")
        q = quant_of.get(module) if part in ("weight", *COMPANIONS) else None
        entries[name] = {"dtype": dtype, "shape": list(shape),
                         "bits": q.bits if q else None, "group_size": q.group_size if q else None}
    return out, entries


def convert_tensor(p: TensorPlan, raw: Mapping[str, HostTensor],
                   quantizer: str = DEFAULT_QUANTIZER) -> list[OutTensor]:
    """One planned tensor -> the tensors it is written as (one, or weight/scales/biases)."""
    t = raw[p.rel]
    prefix = p.name.removesuffix(".weight")
    if p.target is None:
        if t.dtype in DENSE_DTYPES:
            return [(p.name, t.dtype, p.shape, t.data)]
        return [(p.name, "F32", p.shape, _float_rows(p, raw, 0, p.shape[0]))]
    if not p.lossless:
        return _affine(prefix, _requantize(p, raw, QUANTIZERS[quantizer]), exact=False)
    if t.dtype == "U32" and p.source_quant == p.target:
        rel = p.rel.removesuffix(".weight")
        return [(p.name, "U32", tuple(t.shape), t.data)] + [
            (f"{prefix}.{c}", raw[f"{rel}.{c}"].dtype, tuple(raw[f"{rel}.{c}"].shape),
             raw[f"{rel}.{c}"].data) for c in COMPANIONS]
    qw = _mlx_rows(p, raw, 0, p.shape[0]) if t.dtype == "U32" \
        else gguf_to_affine(t.data, t.dtype, p.shape)
    return _affine(prefix, widen(qw, p.target), exact=True)


def widen(qw: QuantizedWeight, target: Quant) -> QuantizedWeight:
    """The same weights at target.bits >= qw.bits and a group size dividing qw's, exactly:
    the codes keep their values in wider fields, each group's scale and bias repeat."""
    assert target.bits >= qw.bits and qw.group_size % target.group_size == 0
    if (qw.bits, qw.group_size) == (target.bits, target.group_size):
        return qw
    out, n_in = qw.shape
    packed = pack(unpack(qw.packed, qw.bits, n_in), target.bits)
    rep = qw.group_size // target.group_size
    return QuantizedWeight(packed, np.repeat(qw.scales, rep, axis=1),
                           np.repeat(qw.biases, rep, axis=1), target.bits, target.group_size)


def _requantize(p: TensorPlan, raw: Mapping[str, HostTensor],
                quantize_fn: Callable[[np.ndarray, int, int], QuantizedWeight]
                ) -> QuantizedWeight:
    assert p.target is not None
    rows, n_in = p.shape
    step = max(1, ROW_CHUNK_ELEMS // n_in)
    parts = [quantize_fn(_float_rows(p, raw, r, min(r + step, rows)), p.target.bits,
                      p.target.group_size) for r in range(0, rows, step)]
    return QuantizedWeight(*(np.concatenate([getattr(q, f) for q in parts])
                             for f in ("packed", "scales", "biases")),
                           bits=p.target.bits, group_size=p.target.group_size)


def _affine(prefix: str, qw: QuantizedWeight, exact: bool) -> list[OutTensor]:
    """A QuantizedWeight as MLX's three tensors, scales/biases float16 where they fit."""
    with np.errstate(over="ignore"):
        halves = [np.asarray(a, np.float32).astype(np.float16) for a in (qw.scales, qw.biases)]
    fits = all(np.isfinite(h).all() for h in halves)
    if fits and exact:
        fits = all(np.array_equal(h.astype(np.float32), a)
                   for h, a in zip(halves, (qw.scales, qw.biases), strict=True))
    dtype, (scales, biases) = ("F16", halves) if fits else ("F32", (qw.scales, qw.biases))
    return [(f"{prefix}.weight", "U32", tuple(qw.packed.shape), qw.packed),
            (f"{prefix}.scales", dtype, tuple(scales.shape), scales),
            (f"{prefix}.biases", dtype, tuple(biases.shape), biases)]


def source_float32(plans: list[TensorPlan], raw: Mapping[str, HostTensor]
                   ) -> dict[str, np.ndarray]:
    """Every tensor of a unit as float32, by name in the unit (quantized ones dequantized).

    Raises:
        ConvertError: a tensor cannot be read as float32 (names it).
    """
    out = {}
    for p in plans:
        t = raw[p.rel]
        try:
            out[p.rel] = _float_rows(p, raw, 0, p.shape[0]) if len(p.shape) == 2 \
                else to_float32(t.data, t.dtype, p.shape)
        except ValueError as exc:
            raise ConvertError(f"tensor {p.name!r}: {exc}") from None
    return out


def _float_rows(p: TensorPlan, raw: Mapping[str, HostTensor], r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of a 2-D tensor as float32, whatever its storage."""
    t = raw[p.rel]
    n_in = p.shape[1]
    shape = (r1 - r0, n_in)
    if t.dtype in DENSE_DTYPES:
        row_bytes = n_in * DTYPE_SIZES[t.dtype]
        return to_float32(t.data[r0 * row_bytes:r1 * row_bytes], t.dtype, shape)
    if t.dtype == "U32":
        return dequantize(_mlx_rows(p, raw, r0, r1))
    import gguf  # deferred, as in loaders/gguf_file.py

    qtype = gguf.GGMLQuantizationType[t.dtype]
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    row_bytes = n_in // block * block_bytes
    rows = t.data[r0 * row_bytes:r1 * row_bytes]
    if t.dtype in GGUF_TYPES:  # exact, and faster than gguf-py
        return dequantize(gguf_to_affine(rows, t.dtype, shape))
    return gguf.quants.dequantize(rows.reshape(shape[0], row_bytes), qtype).reshape(shape)


def _mlx_rows(p: TensorPlan, raw: Mapping[str, HostTensor], r0: int, r1: int
              ) -> QuantizedWeight:
    assert p.source_quant is not None
    bits, group = p.source_quant.bits, p.source_quant.group_size
    rel = p.rel.removesuffix(".weight")
    words = raw[p.rel].data.reshape(p.shape[0], -1)[r0:r1]
    packed = np.ascontiguousarray(words).view("<u4")
    parts = []
    for c in COMPANIONS:
        t = raw[f"{rel}.{c}"]
        n = math.prod(t.shape[1:])
        row_bytes = n * DTYPE_SIZES[t.dtype]
        parts.append(to_float32(t.data[r0 * row_bytes:r1 * row_bytes], t.dtype, (r1 - r0, n)))
    return QuantizedWeight(packed, parts[0], parts[1], bits, group)
