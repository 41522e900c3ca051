"""stream-run's public API: open a model, stream tokens, read the statistics."""

from stream_run.engine.config import EngineConfig, format_size, parse_size
from stream_run.engine.engine import Engine
from stream_run.engine.errors import (
    BudgetError,
    ChatTemplateError,
    ContextLengthError,
    EngineError,
    FormatError,
    MissingTensorError,
    QueueFullError,
    ReadError,
)
from stream_run.engine.request import Chunk, Completion, GenerationParams, Usage
from stream_run.engine.sampling import SamplingParams, TokenLogprob
from stream_run.engine.stats import GenerationStats

__all__ = [
    "BudgetError", "ChatTemplateError", "Chunk", "Completion", "ContextLengthError", "Engine",
    "EngineConfig", "EngineError", "FormatError", "GenerationParams", "GenerationStats",
    "MissingTensorError", "QueueFullError", "ReadError", "SamplingParams", "TokenLogprob",
    "Usage",
    "format_size", "parse_size",
]
