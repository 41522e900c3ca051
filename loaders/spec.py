"""ModelSpec: the architecture hyper-parameters, with HF config.json field names verbatim."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from stream_run.loaders.errors import FormatError

log = logging.getLogger(__name__)


@dataclass
class ModelSpec:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    # sliding-window attention (models/ picks each layer's window from these)
    sliding_window: int | None = None
    use_sliding_window: bool = False
    max_window_layers: int | None = None
    layer_types: list[str] | None = None
    # MLX-quantized checkpoints: {"group_size": 64, "bits": 4, ...per-tensor overrides}
    quantization: dict[str, Any] | None = None
    # the whole config as read (HF names): a model file reads its own fields from it
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        elif self.eos_token_id is None:
            self.eos_token_id = []

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelSpec:
        """Build a spec from an HF config dict; unknown keys are ignored (logged at debug).

        The model_type is checked by the registry (models/) before this is called.

        Raises:
            FormatError: a missing/mistyped required field.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in names}
        unknown = sorted(set(cfg) - names)
        if unknown:
            log.debug("%s: ignoring config keys %s", source, unknown)
        if "quantization_config" in cfg and "quantization" not in cfg:
            kwargs["quantization"] = cfg["quantization_config"]
        kwargs.update(_rope_fields(cfg, source))
        kwargs["config"] = dict(cfg)
        for name, kinds, what in _OPTIONAL_TYPES:
            val = kwargs.get(name)
            if val is not None and (not isinstance(val, kinds) or isinstance(val, bool)
                                    and bool not in kinds):
                raise FormatError(f"{source}: field {name!r} must be {what}, got {val!r}")
        for req in ("hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "vocab_size"):
            val = kwargs.get(req)
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise FormatError(f"{source}: field {req!r} must be a positive int, got {val!r}")
        if kwargs["num_hidden_layers"] > MAX_LAYERS:  # a unit is made per layer before any read
            raise FormatError(f"{source}: field 'num_hidden_layers' is "
                              f"{kwargs['num_hidden_layers']}, more than {MAX_LAYERS}; the "
                              "config is corrupt")
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise FormatError(f"{source}: bad config: {exc}") from None


MAX_LAYERS = 65536  # far above any model (405B: 126); a corrupt count is refused

# optional fields whose type a model relies on ("false" as a string would be truthy)
_OPTIONAL_TYPES = (
    ("num_key_value_heads", (int,), "a positive int"),
    ("head_dim", (int,), "a positive int"),
    ("rms_norm_eps", (int, float), "a number"),
    ("rope_theta", (int, float), "a number"),
    ("rope_scaling", (dict,), "an object"),
    ("max_position_embeddings", (int,), "an int"),
    ("tie_word_embeddings", (bool,), "a boolean"),
    ("attention_bias", (bool,), "a boolean"),
    ("sliding_window", (int,), "an int or null"),
    ("use_sliding_window", (bool,), "a boolean"),
    ("max_window_layers", (int,), "an int or null"),
    ("layer_types", (list,), "a list of layer kinds"),
)


def _rope_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """rope_theta and rope_scaling from a config in either spelling: top-level rope_theta and
    rope_scaling (transformers 4), or one rope_parameters dict holding both (transformers 5
    writes only that; reading theta from the top level alone would silently give 10000)."""
    params = cfg.get("rope_parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise FormatError(f"{source}: field 'rope_parameters' must be an object, got {params!r}")
    out: dict[str, Any] = {}
    if "rope_theta" in params:
        out["rope_theta"] = params["rope_theta"]
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default" and cfg.get("rope_scaling") is None:
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return out
