"""The tensors each unit of a Llama-family model must have, and their shapes.

Import checking follows nanoGPT's from_pretrained: the key sets must match exactly and every
shape must match; a failure names the first few missing or unexpected keys.
"""

from __future__ import annotations

from stream_run.loaders.errors import FormatError, MissingTensorError
from stream_run.loaders.index import EMBED, HEAD, LayerIndex, layer_key
from stream_run.loaders.spec import ModelSpec

LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


def expected_shapes(spec: ModelSpec) -> dict[str, dict[str, tuple[int, ...]]]:
    """Logical (unquantized) shape of every tensor, per unit key."""
    E, I, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    D = spec.head_dim
    assert D is not None and spec.num_key_value_heads is not None
    q_out, kv_out = spec.num_attention_heads * D, spec.num_key_value_heads * D
    block: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (E,),
        "post_attention_layernorm.weight": (E,),
        "self_attn.q_proj.weight": (q_out, E),
        "self_attn.k_proj.weight": (kv_out, E),
        "self_attn.v_proj.weight": (kv_out, E),
        "self_attn.o_proj.weight": (E, q_out),
        "mlp.gate_proj.weight": (I, E),
        "mlp.up_proj.weight": (I, E),
        "mlp.down_proj.weight": (E, I),
    }
    if spec.attention_bias:
        block.update({"self_attn.q_proj.bias": (q_out,), "self_attn.k_proj.bias": (kv_out,),
                      "self_attn.v_proj.bias": (kv_out,)})
        if spec.model_type == "llama":
            block["self_attn.o_proj.bias"] = (E,)
    if spec.qk_norm:
        block.update({"self_attn.q_norm.weight": (D,), "self_attn.k_norm.weight": (D,)})
    units = {EMBED: {"embed_tokens.weight": (V, E)}}
    for i in range(spec.num_hidden_layers):
        units[layer_key(i)] = dict(block)
    units[HEAD] = {"norm.weight": (E,)}
    if not spec.tie_word_embeddings:
        units[HEAD]["lm_head.weight"] = (V, E)
    return units


def quant_params(quant: dict | None, prefix: str) -> tuple[int, int] | None:
    """(bits, group_size) for a linear's prefix in an MLX-quantized unit, or None."""
    if not quant:
        return None
    override = quant.get(prefix)
    if isinstance(override, dict):
        return int(override["bits"]), int(override["group_size"])
    return int(quant["bits"]), int(quant["group_size"])


def check_index(index: LayerIndex) -> None:
    """Check every unit has exactly the expected tensors with the expected shapes.

    Raises:
        MissingTensorError: a required tensor is absent.
        FormatError: an unexpected tensor or a shape mismatch.
    """
    for key, shapes in expected_shapes(index.spec).items():
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
