"""Check a LayerIndex against the tensors and shapes its architecture expects (the model file
supplies them: loaders.arch.Architecture.expected_shapes).

Import checking follows nanoGPT's from_pretrained: the key sets must match exactly and every
shape must match; a failure names the first few missing or unexpected keys.
"""

from __future__ import annotations

from stream_run.loaders.errors import FormatError, MissingTensorError
from stream_run.loaders.index import LayerIndex


def quant_params(quant: dict | None, prefix: str) -> tuple[int, int] | None:
    """(bits, group_size) for a linear's prefix in an MLX-quantized unit, or None."""
    if not quant:
        return None
    override = quant.get(prefix)
    if isinstance(override, dict):
        return int(override["bits"]), int(override["group_size"])
    return int(quant["bits"]), int(quant["group_size"])


def check_index(index: LayerIndex, expected: dict[str, dict[str, tuple[int, ...]]]) -> None:
    """Check every unit has exactly the expected tensors with the expected shapes.

    Raises:
        MissingTensorError: a required tensor is absent.
        FormatError: an unexpected tensor or a shape mismatch.
    """
    for key, shapes in expected.items():
        unit = index.units.get(key)
        have = dict(unit.tensors) if unit else {}
        quant = unit.quantization if unit else None
        missing = [n for n in shapes if n not in have]
        if missing:
            raise MissingTensorError(
                f"{index.source}: unit {key!r} is missing tensor(s) {missing[:4]} "
                f"(expected by model_type {index.spec.model_type!r})"
            )
        for name, shape in shapes.items():
            ref = have.pop(name)
            prefix = name.rsplit(".", 1)[0]
            if ref.dtype == "U32":
                _check_quantized(index.source, key, name, ref.shape, shape, have,
                                 quant_params(quant, prefix))
            elif tuple(ref.shape) != shape:
                raise FormatError(
                    f"{ref.path}: tensor {name!r} of unit {key!r} has shape {list(ref.shape)}, "
                    f"expected {list(shape)} from the config"
                )
        if have:
            raise FormatError(
                f"{index.source}: unit {key!r} has unexpected tensor(s) {sorted(have)[:4]}"
            )


def _check_quantized(source, key, name, got, shape, rest, params) -> None:
    prefix = name.rsplit(".", 1)[0]
    if params is None:
        raise FormatError(
            f"{source}: tensor {name!r} of unit {key!r} is packed uint32 but config.json has "
            "no 'quantization' section with bits and group_size"
        )
    bits, group = params
    out, inn = shape
    want = {name: (out, inn * bits // 32), f"{prefix}.scales": (out, inn // group),
            f"{prefix}.biases": (out, inn // group)}
    for n, s in want.items():
        ref_shape = got if n == name else (rest.pop(n).shape if n in rest else None)
        if ref_shape is None:
            raise MissingTensorError(f"{source}: unit {key!r} is missing tensor {n!r}")
        if tuple(ref_shape) != s:
            raise FormatError(
                f"{source}: tensor {n!r} of unit {key!r} has shape {list(ref_shape)}, expected "
                f"{list(s)} for {bits}-bit group {group} quantization of {list(shape)}"
            )
