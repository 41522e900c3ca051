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


class _Walk:
    def __init__(self, data: mmap.mmap | bytes, path: str, order: str) -> None:
        self.data, self.path, self.size = data, path, len(data)
        self.u32, self.u64 = struct.Struct(order + "I"), struct.Struct(order + "Q")

    def fail(self, what: str, offset: int) -> FormatError:
        return FormatError(f"{self.path}: {what} at byte {offset} does not fit in the file "
                           f"({self.size} bytes); it is truncated or corrupt; hint: re-download "
                           "or re-convert it")

    def count(self, offset: int, unit: int, what: str) -> tuple[int, int]:
        """A u64 count at offset whose `unit`-byte items must fit after it: (count, end)."""
        if offset + 8 > self.size:
            raise self.fail(what, offset)
        n = self.u64.unpack_from(self.data, offset)[0]
        if n * unit > self.size - offset - 8:
            raise self.fail(f"{what} of {n} items", offset)
        return n, offset + 8

    def string(self, offset: int, what: str) -> int:
        n, start = self.count(offset, 1, what)
        return start + n

    def value(self, kind: int, offset: int, key: str) -> int:
        if kind in SCALAR_BYTES:
            if offset + SCALAR_BYTES[kind] > self.size:
                raise self.fail(f"the value of {key}", offset)
            return offset + SCALAR_BYTES[kind]
        if kind == STRING:
            return self.string(offset, f"the string {key}")
        if kind != ARRAY or offset + 4 > self.size:
            raise FormatError(f"{self.path}: {key} has unknown GGUF value type {kind}")
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
            if size < 24:
                return  # gguf-py reports a header this short
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return  # gguf-py reports what it cannot read
    try:
        version = struct.unpack_from("<I", data, 4)[0]
        order = "<" if version in (2, 3) else ">" if version in (2 << 24, 3 << 24) else None
        if order is None:
            return  # gguf-py refuses the version
        walk = _Walk(data, path, order)
        n_tensors, offset = walk.count(8, 0, "the tensor count")
        n_kv, offset = walk.count(offset, 8 + 4 + 1, "the metadata key count")
        if n_tensors * MIN_TENSOR_INFO_BYTES > size - offset:
            raise walk.fail(f"the tensor count {n_tensors}", 8)
        alignment = 32  # GGUF's default
        for _ in range(n_kv):
            start = offset
            offset = walk.string(offset, "a metadata key")
            key = bytes(data[start + 8:offset]).decode(errors="replace")
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
    """Each tensor's data must lie inside the file: a file cut short is named as truncated at
    the first tensor it cuts (gguf-py failed to reshape a short memory map, and the message
    was numpy's). Tensor infos and types gguf-py cannot read are left to it."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    infos = []
    for _ in range(n_tensors):
        start = offset
        offset = walk.string(offset, "a tensor name")
        name = bytes(walk.data[start + 8:offset]).decode(errors="replace")
        if offset + 4 > walk.size:
            raise walk.fail(f"the dimensions of tensor {name!r}", offset)
        n_dims = walk.u32.unpack_from(walk.data, offset)[0]
        if n_dims > 8 or offset + 4 + 8 * n_dims + 12 > walk.size:
            return  # gguf-py names a bad dimension count
        dims = [walk.u64.unpack_from(walk.data, offset + 4 + 8 * i)[0] for i in range(n_dims)]
        offset += 4 + 8 * n_dims
        kind = walk.u32.unpack_from(walk.data, offset)[0]
        start = walk.u64.unpack_from(walk.data, offset + 4)[0]
        offset += 12
        infos.append((name, dims, kind, start))
    data_start = -(-offset // alignment) * alignment
    for name, dims, kind, start in infos:
        try:
            qtype = GGMLQuantizationType(kind)
            block, type_bytes = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            return  # gguf-py refuses the type; the loader names it
        n = 1
        for d in dims:
            n *= d
        end = data_start + start + n // block * type_bytes
        if end > walk.size:
            shape = " x ".join(str(d) for d in reversed(dims))
            raise FormatError(
                f"{walk.path}: the file is truncated: tensor {name!r} ({qtype.name}, {shape}) "
                f"takes bytes {data_start + start} to {end}, the file has {walk.size}; hint: "
                "re-download it (compare its size with the source's)")
