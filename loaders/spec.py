"""ModelSpec: the architecture hyper-parameters, with HF config.json field names verbatim."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from stream_run.loaders.errors import FormatError

log = logging.getLogger(__name__)

# model_type -> family implemented in engine/models. Kept here so a bad config fails at load.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


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
    # MLX-quantized checkpoints: {"group_size": 64, "bits": 4, ...per-tensor overrides}
    quantization: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        elif self.eos_token_id is None:
            self.eos_token_id = []
        if self.model_type == "qwen2":
            self.attention_bias = True  # qwen2 always has q/k/v biases

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelSpec:
        """Build a spec from an HF config dict; unknown keys are ignored (logged at debug).

        Raises:
            FormatError: unsupported model_type or a missing/mistyped required field.
        """
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise FormatError(
                f"{source}: unsupported model_type {model_type!r}; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in names}
        unknown = sorted(set(cfg) - names)
        if unknown:
            log.debug("%s: ignoring config keys %s", source, unknown)
        if "quantization_config" in cfg and "quantization" not in cfg:
            kwargs["quantization"] = cfg["quantization_config"]
        for req in ("hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "vocab_size"):
            val = kwargs.get(req)
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise FormatError(f"{source}: field {req!r} must be a positive int, got {val!r}")
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise FormatError(f"{source}: bad config: {exc}") from None
