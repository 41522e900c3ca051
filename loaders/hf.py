"""HF model directories (safetensors, single or sharded; MLX-quantized) -> LayerIndex."""

from __future__ import annotations

import json
import os
import re

from stream_run.loaders.arch import Architecture, Registry
from stream_run.loaders.errors import FormatError
from stream_run.loaders.index import EMBED, HEAD, LayerIndex, TensorRef, Unit, layer_key
from stream_run.loaders.packed import file_checksums
from stream_run.loaders.safetensors_file import read_safetensors_header
from stream_run.loaders.schema import check_index
from stream_run.loaders.spec import ModelSpec

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.rotary_emb\.)")


def read_json(path: str) -> dict:
    _check_regular(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FormatError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:  # json's decoder recurses per nesting level
        raise FormatError(f"{path}: not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return data


def _check_regular(path: str) -> None:
    """A FIFO or device in a model directory would block the first read forever."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise FormatError(f"{path}: not a regular file")


def weight_files(model_dir: str) -> list[str]:
    """The safetensors files of a model dir: the sharded index's files, or all *.safetensors."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError(f"{index_path}: missing or empty 'weight_map'")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.exists(os.path.join(model_dir, name)):
                raise FormatError(
                    f"{os.path.join(model_dir, name)}: shard listed in "
                    "model.safetensors.index.json is missing"
                )
        for name in files:
            _check_regular(os.path.join(model_dir, name))
        return [os.path.join(model_dir, n) for n in files]
    files = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    for name in files:
        _check_regular(os.path.join(model_dir, name))
    if not files:
        raise FormatError(
            f"{model_dir}: no weights found (expected model.safetensors, sharded "
            "model-*.safetensors with model.safetensors.index.json, or a .gguf file)"
        )
    return [os.path.join(model_dir, n) for n in files]


def unit_of(name: str, prefixes: tuple[str, ...] = ("",)) -> tuple[str, str] | None:
    """Map a full HF tensor name to (unit key, name inside the unit); None if ignored.

    prefixes: what a checkpoint may put before the text model's names (Architecture.
    hf_prefixes); a name under a longer, other prefix (a vision tower) is not the model's.
    """
    if _IGNORED.search(name):
        return None
    for prefix in sorted(prefixes, key=len, reverse=True):
        if name.startswith(prefix):
            name = name.removeprefix(prefix)
            break
    else:
        return None
    if prefixes != ("",) and not name.startswith(("model.", "lm_head.")):
        return None  # another tower of a multimodal checkpoint
    m = _LAYER.match(name)
    if m:
        return layer_key(int(m.group(1))), m.group(2)
    if name.startswith("model.embed_tokens."):
        return EMBED, name.removeprefix("model.")
    if name.startswith("model.norm."):
        return HEAD, name.removeprefix("model.")
    if name.startswith("lm_head."):
        return HEAD, name
    raise FormatError(f"unexpected tensor name {name!r}")


def full_name(key: str, rel: str) -> str:
    """The inverse of unit_of: (unit key, name inside the unit) -> the full HF tensor name."""
    if key.startswith("layers."):
        return f"model.{key}.{rel}"
    return rel if rel.startswith("lm_head.") else f"model.{rel}"


def open_hf_dir(model_dir: str, registry: Registry) -> LayerIndex:
    """Index an HF (or MLX-quantized) model directory without reading tensor data, and check
    it against its architecture (resolved from config.json's model_type by registry).

    Raises:
        FormatError: missing config, unknown model_type, no weights, bad header, unknown
            tensor, wrong shape.
        MissingTensorError: a tensor the architecture needs is absent.
    """
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(config_path):
        raise FormatError(f"{model_dir}: no config.json (not an HF model directory)")
    cfg = read_json(config_path)
    arch: Architecture = registry.for_model_type(cfg.get("model_type"), config_path)
    if arch.hf_config is not None:
        try:
            cfg = arch.hf_config(cfg)
        except ValueError as exc:
            raise FormatError(f"{config_path}: {exc}") from None
    spec = ModelSpec.from_dict({**cfg, **arch.config_overrides}, source=config_path)
    expected = arch.expected_shapes(spec)
    layers = [layer_key(i) for i in range(spec.num_hidden_layers)]
    # in pass order; units beyond embed, blocks and head (routed experts) come from expected
    keys = dict.fromkeys([EMBED, *layers, *(k for k in expected if k not in (EMBED, HEAD)), HEAD])
    units: dict[str, Unit] = {k: Unit(k) for k in keys}
    for path in weight_files(model_dir):
        for name, e in read_safetensors_header(path).items():
            try:
                where = unit_of(name, arch.hf_prefixes)
                if where is None:
                    continue
                ref = TensorRef(where[1], path, e.offset, e.nbytes, e.dtype, e.shape)
                placed = [(where[0], ref)] if arch.hf_units is None \
                    else arch.hf_units(spec, where[0], ref)
            except FormatError as exc:
                raise FormatError(f"{path}: {exc}") from None
            for key, ref in placed:
                if key not in units:
                    raise FormatError(
                        f"{path}: tensor {name!r} is for a layer beyond num_hidden_layers="
                        f"{spec.num_hidden_layers} in config.json"
                    )
                if key == HEAD and ref.name.startswith("lm_head.") and spec.tie_word_embeddings:
                    continue  # some tied checkpoints still carry a copy of the embedding
                units[key].tensors[ref.name] = ref
    if spec.quantization:
        for unit in units.values():
            unit.quantization = _unit_quantization(spec.quantization, unit.key)
    index = LayerIndex(spec=spec, units=units, source=model_dir,
                       checksums=file_checksums(model_dir))
    check_index(index, expected)
    return index


def _unit_quantization(quant: dict, key: str) -> dict:
    """Global bits/group_size plus mlx-lm per-module overrides, re-keyed relative to a unit."""
    out = {"bits": quant.get("bits", 4), "group_size": quant.get("group_size", 64)}
    prefix = "model." + (key + "." if key.startswith("layers.") else "")
    for name, val in quant.items():
        if isinstance(val, dict) and name.startswith(prefix):
            out[name.removeprefix(prefix)] = val
        elif isinstance(val, dict) and key == HEAD and name == "lm_head":
            out[name] = val
    return out
