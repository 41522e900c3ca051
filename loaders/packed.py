"""The packed layer format written by stream-convert: one safetensors file per unit plus
manifest.json (format, spec, and per unit its file, byte size, sha256 and tensors).

A packed directory is also a plain HF / mlx-lm model directory: config.json (with mlx-lm's
"quantization" section when weights are packed), model.safetensors.index.json, tokenizer files,
and the unit files named model-<unit>.safetensors in the top directory, because mlx-lm loads
the weights by globbing model*.safetensors there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from stream_run.loaders.errors import FormatError
from stream_run.loaders.safetensors_file import DTYPE_SIZES

FORMAT_NAME = "stream-run-packed"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_HASH_CHUNK_BYTES = 8 * 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


def unit_file_name(key: str) -> str:
    """The file of unit `key` inside a packed directory ("model-layers.3.safetensors")."""
    return f"model-{key}.safetensors"


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in large chunks (hashlib releases the GIL on them).

    Raises:
        OSError: the file cannot be read.
    """
    h = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def read_manifest(model_dir: str) -> dict[str, Any] | None:
    """The directory's manifest.json, or None if it has none (or one of another format).

    Raises:
        FormatError: the manifest is not valid JSON, or is of an unsupported version.
    """
    path = os.path.join(model_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:  # json's decoder recurses per nesting level
        raise FormatError(f"{path}: not valid JSON: nested too deeply") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        return None
    version = data.get("version")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise FormatError(
            f"{path}: {FORMAT_NAME} version {data.get('version')!r} is not supported (this "
            f"stream-run reads version {FORMAT_VERSION}); hint: re-run stream-convert"
        )
    return data


def file_checksums(model_dir: str) -> dict[str, str] | None:
    """{unit file path: expected sha256} from the manifest; None without a manifest.

    Raises:
        FormatError: the manifest is malformed (names the unit).
    """
    manifest = read_manifest(model_dir)
    if manifest is None:
        return None
    path = os.path.join(model_dir, MANIFEST)
    units = manifest.get("units")
    if not isinstance(units, dict):
        raise FormatError(f"{path}: missing 'units'")
    out = {}
    for key, unit in units.items():
        name = unit.get("file") if isinstance(unit, dict) else None
        digest = unit.get("sha256") if isinstance(unit, dict) else None
        if not isinstance(name, str) or not name or os.path.basename(name) != name \
                or name in (".", ".."):
            raise FormatError(f"{path}: unit {key!r}: 'file' must name a file in {model_dir}, "
                              f"got {name!r}")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise FormatError(f"{path}: unit {key!r}: 'sha256' must be 64 hex digits, got "
                              f"{str(digest)[:80]!r}")
        out[os.path.join(model_dir, name)] = digest
    return out


def write_safetensors(
    path: str, tensors: Sequence[tuple[str, str, tuple[int, ...], np.ndarray]],
    metadata: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Write a safetensors file and hash it on the way out (no second read).

    Tensors go widest dtype first (then by name), so every 4-byte tensor starts 4-byte
    aligned: the header is padded to 8 bytes and safetensors allows no gaps between tensors.

    Args:
        tensors: (name, safetensors dtype, shape, array holding exactly the stored bytes).

    Returns:
        (file size in bytes, hex sha256 of the file).

    Raises:
        ValueError: an array's byte count does not match its dtype and shape.
    """
    order = sorted(tensors, key=lambda t: (-DTYPE_SIZES[t[1]], t[0]))
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "mlx"}}
    offset = 0
    blobs = []
    for name, dtype, shape, data in order:
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        want = math.prod(shape) * DTYPE_SIZES[dtype]
        if raw.size != want:
            raise ValueError(f"{name}: {raw.size} bytes for {dtype}{list(shape)}, expected {want}")
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + raw.size]}
        offset += raw.size
        blobs.append(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (len(text).to_bytes(8, "little"), text, *blobs):
            view = memoryview(chunk)
            f.write(view)
            h.update(view)
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(text) + offset, h.hexdigest()


def is_packed_dir(path: str) -> bool:
    """Whether path is a directory holding a stream-convert manifest (any version)."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT_NAME
