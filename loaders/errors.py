"""Errors raised while reading model files. Each message names the file or tensor."""

from __future__ import annotations


class FormatError(ValueError):
    """A model file or directory is malformed, truncated or unsupported."""


class MissingTensorError(KeyError):
    """A tensor the architecture needs is absent from the checkpoint."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class ReadError(OSError):
    """Reading a unit's bytes failed (file removed, truncated, or an I/O error)."""
