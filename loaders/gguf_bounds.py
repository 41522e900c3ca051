"""A GGUF header's lengths and counts checked against the file's size before gguf-py parses it.

gguf-py's reader walks an array element by element and reads past the end of the file as empty
arrays instead of failing: a token_type count corrupted to 3 million in a 66 KB file took it
40 s, and a count of 2**40 would never end. This walk reads only the lengths and counts (the
strings of a string array one by one, as their offsets depend on it: ~0.05 s for a 100k-token
vocabulary) and refuses the first that does not fit in the bytes left.
"""

from __future__ import annotations

import mmap
import struct

from stream_run.loaders.errors import FormatError

# GGUF value types (gguf-py GGUFValueType): scalar byte sizes, and the two variable ones
SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
# the fewest bytes a tensor info takes: name length, n_dims, one dim, type, offset
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8
MAX_DIMS = 4  # GGML_MAX_DIMS


class _Walk:
    def __init__(self, data: mmap.mmap | bytes, path: str, order: str) -> None:
        self.data, self.path, self.size = data, path, len(data)
        self.u32, self.u64 = struct.Struct(order + "I"), struct.Struct(order + "Q")

    def fail(self, what: str, offset: int) -> FormatError:
        return FormatError(f"{self.path}: {what} at byte {offset} does not fit in the file "
                           f"({self.size} bytes): its header is corrupt, or the file is "
                           "truncated; hint: re-download or re-convert it")

    def corrupt(self, what: str, offset: int) -> FormatError:
        return FormatError(f"{self.path}: the header is corrupt: {what} (byte {offset}); hint: "
                           "re-download or re-convert it")

    def text(self, start: int, end: int, what: str, printable: bool = False) -> str:
        """The UTF-8 string at [start, end); a key or name must also be printable."""
        try:
            s = bytes(self.data[start:end]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.corrupt(f"{what} is not valid UTF-8 ({exc.reason} at its byte "
                               f"{exc.start})", start) from None
        if printable and not s.isprintable():
            raise self.corrupt(f"{what} {s[:40]!r} has unprintable characters", start)
        return s

    def count(self, offset: int, unit: int, what: str, noun: str = "items"
              ) -> tuple[int, int]:
        """A u64 count at offset whose `unit`-byte items must fit after it: (count, end)."""
        if offset + 8 > self.size:
            raise self.fail(what, offset)
        n = self.u64.unpack_from(self.data, offset)[0]
        if n * unit > self.size - offset - 8:
            raise self.fail(f"{what} of {n} {noun}", offset)
        return n, offset + 8

    def string(self, offset: int, what: str) -> int:
        n, start = self.count(offset, 1, what, "bytes")
        return start + n

    def value(self, kind: int, offset: int, key: str) -> int:
        if kind in SCALAR_BYTES:
            if offset + SCALAR_BYTES[kind] > self.size:
                raise self.fail(f"the value of {key}", offset)
            return offset + SCALAR_BYTES[kind]
        if kind == STRING:
            end = self.string(offset, f"a string of {key}")
            self.text(offset + 8, end, f"a string of {key}")
            return end
        if kind != ARRAY or offset + 4 > self.size:
            raise self.corrupt(f"{key} has unknown GGUF value type {kind}", offset)
        item = self.u32.unpack_from(self.data, offset)[0]
        unit = SCALAR_BYTES.get(item, 8 if item == STRING else 12)
        n, offset = self.count(offset + 4, unit, f"the array {key}")
        if item in SCALAR_BYTES:
            return offset + n * unit
        for _ in range(n):
            offset = self.value(item, offset, key)
        return offset


def check_bounds(path: str) -> None:
    """Refuse a GGUF whose metadata or tensor-info counts and lengths overrun the file.

    Raises:
        FormatError: naming the key (or header field), its offset and the file size.
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size >= 24 else None
    except (OSError, ValueError):
        return  # gguf-py reports what it cannot read
    if data is None:
        raise FormatError(f"{path}: the file is truncated: {size} bytes, fewer than a GGUF "
                          "header's 24; hint: re-download it")
    try:
        version = struct.unpack_from("<I", data, 4)[0]
        order = "<" if version in (2, 3) else ">" if version in (2 << 24, 3 << 24) else None
        if order is None:
            raise FormatError(f"{path}: GGUF version {version} (byte 4); this reader takes "
                              "versions 2 and 3: the header is corrupt, or the file is from a "
                              "newer GGUF writer")
        walk = _Walk(data, path, order)
        n_tensors, offset = walk.count(8, 0, "the tensor count")
        n_kv, offset = walk.count(offset, 8 + 4 + 1, "the metadata key count")
        if n_tensors * MIN_TENSOR_INFO_BYTES > size - offset:
            raise walk.fail(f"the tensor count {n_tensors}", 8)
        alignment = 32  # GGUF's default
        for _ in range(n_kv):
            start = offset
            offset = walk.string(offset, "a metadata key")
            key = walk.text(start + 8, offset, "a metadata key", printable=True)
            if offset + 4 > size:
                raise walk.fail(f"the type of {key}", offset)
            kind = walk.u32.unpack_from(data, offset)[0]
            if key == "general.alignment" and kind == 4 and offset + 8 <= size:
                alignment = walk.u32.unpack_from(data, offset + 4)[0] or 32
            offset = walk.value(kind, offset + 4, key)
        _check_tensor_data(walk, n_tensors, offset, alignment)
    finally:
        data.close()


def _check_tensor_data(walk: _Walk, n_tensors: int, offset: int, alignment: int) -> None:
    """Each tensor info must be one a GGUF writer makes (a printable UTF-8 name, 1 to 4
    dimensions, none 0, a known type, an aligned offset) and its data must lie inside the file:
    a file cut short is named as truncated at the first tensor it cuts (gguf-py failed to
    reshape a short memory map, and the message was numpy's; a bad type or name was gguf-py's
    ValueError or UnicodeDecodeError)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    infos = []
    for _ in range(n_tensors):
        start = offset
        offset = walk.string(offset, "a tensor name")
        name = walk.text(start + 8, offset, "a tensor name", printable=True)
        if offset + 4 > walk.size:
            raise walk.fail(f"the dimensions of tensor {name!r}", offset)
        n_dims = walk.u32.unpack_from(walk.data, offset)[0]
        if not 1 <= n_dims <= MAX_DIMS:
            raise walk.corrupt(f"tensor {name!r} has {n_dims} dimensions (GGUF: 1 to "
                               f"{MAX_DIMS})", offset)
        if offset + 4 + 8 * n_dims + 12 > walk.size:
            raise walk.fail(f"the shape of tensor {name!r}", offset)
        dims = [walk.u64.unpack_from(walk.data, offset + 4 + 8 * i)[0] for i in range(n_dims)]
        if 0 in dims or any(d > walk.size * 8 for d in dims):
            raise walk.corrupt(f"tensor {name!r} has dimensions {dims}", offset + 4)
        offset += 4 + 8 * n_dims
        kind = walk.u32.unpack_from(walk.data, offset)[0]
        try:
            qtype = GGMLQuantizationType(kind)
            block = GGML_QUANT_SIZES[qtype][0]
        except (ValueError, KeyError):
            raise walk.corrupt(f"tensor {name!r} has type {kind}, not a GGML type",
                               offset) from None
        if dims[0] % block:
            raise walk.corrupt(f"tensor {name!r} of type {qtype.name} has rows of {dims[0]} "
                               f"values, not a multiple of its block of {block}",
                               offset - 8 * n_dims)
        start = walk.u64.unpack_from(walk.data, offset + 4)[0]
        if start % alignment:
            raise walk.corrupt(f"tensor {name!r} starts at data offset {start}, not a "
                               f"multiple of the alignment {alignment}", offset + 4)
        offset += 12
        infos.append((name, dims, kind, start))
    data_start = -(-offset // alignment) * alignment
    spans = []
    for name, dims, kind, start in infos:
        qtype = GGMLQuantizationType(kind)
        block, type_bytes = GGML_QUANT_SIZES[qtype]
        n = 1
        for d in dims:
            n *= d
        spans.append((start, start + n // block * type_bytes, name))
    # GGUF writers lay the tensors out one after another, each padded to the alignment: two
    # tensors sharing bytes means a corrupt shape or offset. A file cut short keeps the layout
    # and loses its end; a tensor past the end that starts well after the one before it ends
    # (more than the padding) has a corrupt offset or shape instead.
    spans.sort()
    prev_end, prev_name, gap_before = 0, "the start of the data", {}
    for start, end, name in spans:
        if start < prev_end:
            raise walk.corrupt(f"tensors {prev_name} and {name!r} share data bytes (one ends "
                               f"at data offset {prev_end}, the other starts at {start}): a "
                               "shape or offset is wrong", data_start)
        gap_before[name] = (start - prev_end, prev_name)
        prev_end, prev_name = end, repr(name)
    for name, dims, kind, start in infos:
        qtype = GGMLQuantizationType(kind)
        block, type_bytes = GGML_QUANT_SIZES[qtype]
        n = 1
        for d in dims:
            n *= d
        end = data_start + start + n // block * type_bytes
        if end > walk.size:
            shape = " x ".join(str(d) for d in reversed(dims))
            gap, before = gap_before[name]
            if gap >= alignment:
                raise walk.corrupt(
                    f"tensor {name!r} ({qtype.name}, {shape}) takes bytes {data_start + start} "
                    f"to {end} of a {walk.size}-byte file, and starts {gap} bytes after "
                    f"{before} ends, where GGUF writers pad under {alignment}: its offset or "
                    "shape is wrong", data_start)
            raise FormatError(
                f"{walk.path}: the file is truncated: tensor {name!r} ({qtype.name}, {shape}) "
                f"takes bytes {data_start + start} to {end}, the file has {walk.size}; hint: "
                "re-download it (compare its size with the source's)")
