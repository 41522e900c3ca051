"""Errors the engine raises; package errors are re-exported so callers need one import."""

from __future__ import annotations

from stream_run.cache import BudgetError
from stream_run.engine.tokenizer import ChatTemplateError
from stream_run.loaders import FormatError, MissingTensorError, ReadError


class EngineError(RuntimeError):
    """A generation failed (a read error mid-stream, a context overflow...)."""


class QueueFullError(EngineError):
    """Too many requests wait for a batch slot (EngineConfig.max_queue); retry later."""


class ContextLengthError(ValueError):
    """The prompt plus max_tokens do not fit the model's context."""


class ConvertError(ValueError):
    """stream-convert cannot convert: a bad recipe, output path, or tensor shape."""


__all__ = [
    "BudgetError", "ChatTemplateError", "ContextLengthError", "ConvertError", "EngineError",
    "FormatError", "MissingTensorError", "QueueFullError", "ReadError",
]
