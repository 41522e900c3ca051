"""Quantization recipes for stream-convert: which tensors are packed, at what bits and group size.

A recipe is a default (bits and group size, or None: keep full precision) plus rules applied in
order, each matching rule overriding what it sets. A rule matches a module path, the HF tensor
name without ".weight" as mlx-lm's "quantization" section keys it ("model.embed_tokens",
"model.layers.3.mlp.down_proj", "lm_head"), by fnmatch glob, and optionally only in some
blocks. Only 2-D weights (linears, the embedding, lm_head) are ever quantized: norms, biases and
other 1-D tensors stay at full precision whatever a rule says.

Built in: "uniform" (every 2-D weight at --bits/--group-size), "mixed" (embedding and lm_head
8-bit, attention and MLP at --bits, 4 by default) and "none" (nothing quantized). "uniform" and
"mixed" keep a Mixture-of-Experts router (ROUTERS) at full precision, as llama.cpp's files hold
it (F32): it is a few KB a layer, and at 4 bits it picks other experts for the same input (a
4-bit copy of a qwen3_moe GGUF picked 113-117 of the source's 128 experts per token, so its
greedy output parted from the source's at the third token). A rule can still set its bits.
A recipe file is JSON:

    {"base": "uniform",              optional: uniform | mixed | none, applied before the rules
     "bits": 4, "group_size": 64,    optional: default --bits / --group-size
     "rules": [
       {"pattern": "model.layers.*", "layers": [0, 1, -2, -1], "bits": 6},
       {"pattern": "*.mlp.down_proj", "layers": "10:20", "group_size": 32},
       {"pattern": "lm_head", "bits": null}]}     null: keep full precision

"layers" is a block index (negative counts from the end), a "start:stop" slice, or a list of
those; a rule with "layers" never matches the embedding or the head.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from stream_run.engine.errors import ConvertError
from stream_run.kernels.quant import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

BUILTIN = ("uniform", "mixed", "none")
MIXED_EDGE_BITS = 8  # embeddings and lm_head in the "mixed" recipe
# Mixture-of-Experts routers (module paths): kept at full precision by "uniform" and "mixed"
ROUTERS = ("model.layers.*.mlp.gate", "model.layers.*.mlp.shared_expert_gate",
           "model.layers.*.block_sparse_moe.gate", "model.layers.*.mlp.router")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_RULE_KEYS = {"pattern", "layers", "bits", "group_size"}
_FILE_KEYS = {"base", "bits", "group_size", "rules"}


@dataclass(frozen=True)
class Quant:
    bits: int
    group_size: int


@dataclass(frozen=True)
class Rule:
    pattern: str
    layers: tuple[int | str, ...] | None = None  # indices and "start:stop" slices
    updates: dict[str, int | None] = field(default_factory=dict)  # "bits"/"group_size"

    def matches(self, module: str, layer_idx: int | None, n_layers: int) -> bool:
        if not fnmatch.fnmatchcase(module, self.pattern):
            return False
        return self.layers is None or (layer_idx is not None
                                       and layer_idx in layer_set(self.layers, n_layers))

    def apply(self, cur: Quant | None, default: Quant) -> Quant | None:
        if "bits" in self.updates and self.updates["bits"] is None:
            return None
        base = cur or default
        bits, group = self.updates.get("bits"), self.updates.get("group_size")
        return Quant(base.bits if bits is None else bits,
                     base.group_size if group is None else group)


@dataclass(frozen=True)
class Recipe:
    """name: "uniform" | "mixed" | "none" | the file path; default: the starting point of every
    2-D weight (None: full precision); base: what a rule falls back to for unset fields."""

    name: str
    default: Quant | None
    base: Quant
    rules: tuple[Rule, ...] = ()

    def resolve(self, name: str, shape: tuple[int, ...], n_layers: int) -> Quant | None:
        """Bits and group size for the tensor `name` (full HF name), or None: keep it as is.

        Args:
            name: e.g. "model.layers.3.mlp.down_proj.weight".
            shape: the logical (unquantized) shape.
            n_layers: the model's block count, for negative layer indices.
        """
        if len(shape) != 2 or not name.endswith(".weight"):
            return None
        module = name.removesuffix(".weight")
        m = _LAYER.match(name)
        layer_idx = int(m.group(1)) if m else None
        quant = self.default
        for rule in self.rules:
            if rule.matches(module, layer_idx, n_layers):
                quant = rule.apply(quant, self.base)
        return quant

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for manifest.json."""
        return {"name": self.name, "bits": self.base.bits, "group_size": self.base.group_size,
                "default": None if self.default is None else vars(self.default),
                "rules": [{"pattern": r.pattern, "layers": None if r.layers is None
                           else list(r.layers), **r.updates} for r in self.rules]}


def layer_set(layers: tuple[int | str, ...], n_layers: int) -> set[int]:
    """Block indices named by ints (negative from the end) and "start:stop" slices."""
    out: set[int] = set()
    for item in layers:
        if isinstance(item, int):
            idx = item + n_layers if item < 0 else item
            if 0 <= idx < n_layers:
                out.add(idx)
        else:
            start, stop = (int(p) if p.strip() else None for p in item.split(":"))
            out.update(range(n_layers)[slice(start, stop)])
    return out


def make_recipe(recipe: str, bits: int = 4, group_size: int = 64) -> Recipe:
    """A built-in recipe by name, or a recipe file by path.

    Raises:
        ConvertError: unsupported bits or group size, an unknown recipe, a bad recipe file.
    """
    base = _quant(bits, group_size, "bits/group_size")
    if recipe in BUILTIN:
        return _builtin(recipe, base)
    if not os.path.isfile(recipe):
        raise ConvertError(f"recipe {recipe!r}: not one of {', '.join(BUILTIN)} and not a file")
    return load_recipe_file(recipe, base)


def _builtin(name: str, base: Quant) -> Recipe:
    if name == "none":
        return Recipe(name, None, base)
    rules = tuple(Rule(p, updates={"bits": None}) for p in ROUTERS)
    if name == "mixed":
        edge = {"bits": MIXED_EDGE_BITS}
        rules += (Rule("model.embed_tokens", updates=edge), Rule("lm_head", updates=edge))
    return Recipe(name, base, base, rules)


def load_recipe_file(path: str, base: Quant) -> Recipe:
    """Parse a JSON recipe file (see the module docstring); `base` gives unset bits/group.

    Raises:
        ConvertError: unreadable or invalid JSON, unknown keys, bad values (names the rule).
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}: cannot read recipe: {exc}") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: a recipe file is a JSON object")
    _check_keys(path, "recipe", data, _FILE_KEYS)
    base_name = data.get("base", "uniform")
    if base_name not in BUILTIN:
        raise ConvertError(f"{path}: 'base' must be one of {', '.join(BUILTIN)}, "
                           f"got {base_name!r}")
    bits = data.get("bits", base.bits)  # null: only the rules quantize
    base = _quant(base.bits if bits is None else bits,
                  data.get("group_size", base.group_size), path)
    start = _builtin(base_name, base)
    default = None if bits is None else start.default
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise ConvertError(f"{path}: 'rules' must be a list")
    parsed = tuple(_rule(path, i, r) for i, r in enumerate(rules))
    return Recipe(path, default, base, start.rules + parsed)


def _rule(path: str, i: int, raw: Any) -> Rule:
    where = f"{path}: rule {i}"
    if not isinstance(raw, dict):
        raise ConvertError(f"{where}: expected an object, got {raw!r}")
    _check_keys(where, "rule", raw, _RULE_KEYS)
    pattern = raw.get("pattern")
    if not isinstance(pattern, str) or not pattern:
        raise ConvertError(f"{where}: 'pattern' must be a non-empty string (a glob on module "
                           "paths such as 'model.layers.*.mlp.*')")
    updates: dict[str, int | None] = {}
    if "bits" in raw:
        if raw["bits"] is not None:
            _quant(raw["bits"], SUPPORTED_GROUP_SIZES[0], where)
        updates["bits"] = raw["bits"]
    if "group_size" in raw:
        _quant(SUPPORTED_BITS[0], raw["group_size"], where)
        updates["group_size"] = raw["group_size"]
    if not updates:
        raise ConvertError(f"{where}: sets neither 'bits' nor 'group_size'")
    return Rule(pattern, _layers(where, raw["layers"]) if "layers" in raw else None, updates)


def _layers(where: str, raw: Any) -> tuple[int | str, ...]:
    items = raw if isinstance(raw, list) else [raw]
    for item in items:
        ok = isinstance(item, int) and not isinstance(item, bool)
        if isinstance(item, str):
            ok = re.fullmatch(r"\s*-?\d*\s*:\s*-?\d*\s*", item) is not None
        if not ok:
            raise ConvertError(f"{where}: 'layers' item {item!r} is not a block index or a "
                               "'start:stop' slice")
    return tuple(items)


def _check_keys(where: str, what: str, data: dict, allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConvertError(f"{where}: unknown {what} key(s) {unknown}; expected "
                           f"{sorted(allowed)}")


def _quant(bits: Any, group_size: Any, where: str) -> Quant:
    if bits not in SUPPORTED_BITS or isinstance(bits, bool):
        raise ConvertError(f"{where}: bits={bits!r} is not supported; expected one of "
                           f"{SUPPORTED_BITS}")
    if group_size not in SUPPORTED_GROUP_SIZES or isinstance(group_size, bool):
        raise ConvertError(f"{where}: group_size={group_size!r} is not supported; expected one "
                           f"of {SUPPORTED_GROUP_SIZES}")
    return Quant(int(bits), int(group_size))
