"""stream-run's public API: open a model, stream tokens, read the statistics."""

from engine.config import EngineConfig, format_size, parse_size
from engine.engine import Engine
from engine.errors import (
    BudgetError,
    ChatTemplateError,
    ContextLengthError,
    EngineError,
    FormatError,
    MissingTensorError,
    QueueFullError,
    ReadError,
)
from engine.request import Chunk, Completion, GenerationParams, Usage
from engine.sampling import SamplingParams
from engine.stats import GenerationStats

__all__ = [
    "BudgetError", "ChatTemplateError", "Chunk", "Completion", "ContextLengthError", "Engine",
    "EngineConfig", "EngineError", "FormatError", "GenerationParams", "GenerationStats",
    "MissingTensorError", "QueueFullError", "ReadError", "SamplingParams", "Usage",
    "format_size", "parse_size",
]
