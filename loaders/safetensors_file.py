"""Safetensors header parsing: tensor name -> (offset, nbytes, dtype, shape), no data read."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

from stream_run.loaders.errors import FormatError

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4,
    "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class SafetensorsEntry:
    name: str
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: str) -> dict[str, SafetensorsEntry]:
    """Parse and validate a safetensors header.

    Raises:
        FormatError: unreadable file, truncated or corrupt header, or tensor bytes past EOF.
    """
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: truncated safetensors file ({file_size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER_BYTES, file_size - 8):
                raise FormatError(
                    f"{path}: corrupt safetensors header: header length {header_len} "
                    f"exceeds file size {file_size}; the file is truncated or not safetensors"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: corrupt safetensors header (invalid JSON: {exc})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + header_len
    entries: dict[str, SafetensorsEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, base, file_size)
    return entries


def _entry(path: str, name: str, info: object, base: int, file_size: int) -> SafetensorsEntry:
    try:
        dtype = info["dtype"]  # type: ignore[index]
        shape = tuple(_int(d) for d in info["shape"])  # type: ignore[index]
        start, end = (_int(o) for o in info["data_offsets"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        raise FormatError(f"{path}: corrupt header entry for tensor {name!r}: {info!r}"[:400]
                          ) from None
    if dtype not in DTYPE_SIZES:
        raise FormatError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - start != expected or start < 0:
        raise FormatError(
            f"{path}: tensor {name!r}: byte range {start}..{end} does not match "
            f"{dtype}{list(shape)} ({expected} bytes)"
        )
    if base + end > file_size:
        raise FormatError(
            f"{path}: tensor {name!r} ends at byte {base + end} but the file has {file_size} "
            "bytes; the file is truncated (re-download or re-convert it)"
        )
    return SafetensorsEntry(name, base + start, expected, dtype, shape)


def _int(value: object) -> int:
    """A header integer: an int, not 1.5 or 1e999 (JSON numbers json.loads makes floats)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"not an integer: {value!r}")
    return value
