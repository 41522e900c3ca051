"""stream-run's public API: open a model, stream tokens, read the statistics."""

from engine.config import EngineConfig, format_size, parse_size
from engine.engine import Chunk, Engine, GenerationParams
from engine.errors import (
    BudgetError,
    ChatTemplateError,
    ContextLengthError,
    EngineError,
    FormatError,
    MissingTensorError,
    ReadError,
)
from engine.sampling import SamplingParams
from engine.stats import GenerationStats

__all__ = [
    "BudgetError", "ChatTemplateError", "Chunk", "ContextLengthError", "Engine", "EngineConfig",
    "EngineError", "FormatError", "GenerationParams", "GenerationStats", "MissingTensorError",
    "ReadError", "SamplingParams", "format_size", "parse_size",
]
