"""Model files: configs into a ModelSpec, the LayerIndex of byte ranges, tokenizers, reads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from stream_run.loaders.arch import Architecture, Registry, Shapes
from stream_run.loaders.errors import FormatError, MissingTensorError, ReadError
from stream_run.loaders.index import EMBED, HEAD, HostTensor, LayerIndex, TensorRef, Unit, layer_key
from stream_run.loaders.reader import READ_MODES, LoaderConfig, UnitReader
from stream_run.loaders.spec import ModelSpec
from stream_run.loaders.tokenizer import TokenizerData

__all__ = [
    "EMBED", "HEAD", "READ_MODES", "Architecture", "FormatError", "HostTensor", "LayerIndex",
    "LoaderConfig", "MissingTensorError", "ModelSource", "ModelSpec", "ReadError", "Registry",
    "Shapes", "TensorRef", "TokenizerData", "Unit", "UnitReader", "layer_key", "open_model",
]


@dataclass
class ModelSource:
    path: str
    index: LayerIndex
    tokenizer: TokenizerData
    # the model's own sampling defaults (loaders/generation.py, an Ollama manifest's params);
    # {} when it ships none
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    # what a model store adds (loaders/stores.py): where the name led, Ollama's stop strings
    # and system prompt
    origin: str = "path"
    stop: tuple[str, ...] = ()
    system_prompt: str | None = None


def open_model(path: str, registry: Registry) -> ModelSource:
    """Open a model directory or .gguf file, or a model store's name (loaders/stores.py: an HF
    cache id, ollama:NAME, lmstudio:NAME): spec, unit index and tokenizer; no tensor data.
    registry resolves the file's architecture (stream_run.models.open_model passes the
    engine's).

    Raises:
        FormatError / MissingTensorError: with the path and what is wrong.
    """
    from stream_run.loaders.stores import resolve

    found = resolve(path)
    source = _open_path(found.path, registry, gguf=found.origin == "ollama")  # blobs: no .gguf
    source.sampling_defaults = {**source.sampling_defaults, **found.sampling_defaults}
    source.origin, source.stop, source.system_prompt = found.origin, tuple(found.stop), \
        found.system
    return source


def _open_path(path: str, registry: Registry, gguf: bool = False) -> ModelSource:
    from stream_run.loaders.generation import defaults_from_dir, defaults_from_gguf
    from stream_run.loaders.gguf_file import open_gguf
    from stream_run.loaders.hf import open_hf_dir
    from stream_run.loaders.tokenizer import load_tokenizer_dir, tokenizer_from_gguf

    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        if not os.access(path, os.R_OK | os.X_OK):
            raise FormatError(f"{path}: directory is not readable")
        ggufs = sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
        if not os.path.exists(os.path.join(path, "config.json")) and len(ggufs) == 1:
            path = os.path.join(path, ggufs[0])
        else:
            index = open_hf_dir(path, registry)
            return ModelSource(path, index, load_tokenizer_dir(path), defaults_from_dir(path))
    if not os.path.isfile(path):  # a FIFO or device would block the first read forever
        raise FormatError(f"{path}: not a regular file or directory")
    if not os.access(path, os.R_OK):
        raise FormatError(f"{path}: file is not readable")
    if not gguf and not path.endswith(".gguf"):
        raise FormatError(f"{path}: expected a model directory or a .gguf file")
    index, metadata = open_gguf(path, registry)
    return ModelSource(path, index, tokenizer_from_gguf(metadata, path),
                       defaults_from_gguf(metadata, path))
