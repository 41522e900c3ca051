"""A full-length GGUF with a corrupt header (issue 17 item 10): each message names the file and
the tensor or key and what is wrong, says "corrupt" rather than "truncated", and never wraps
an internal exception (UnicodeDecodeError, numpy's reshape, gguf-py's enum ValueError)."""

from __future__ import annotations

import random
import struct

import gguf
import pytest

from stream_run.bench.synth import SynthSpec
from stream_run.bench.synth_gguf import synthesize_gguf
from stream_run.loaders import FormatError, MissingTensorError
from stream_run.models import open_model

SPEC = SynthSpec(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
INTERNAL = ("UnicodeDecodeError", "np.uint", "reshape", "unpack", "Error:", "Traceback")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "src.gguf"
    synthesize_gguf(SPEC, "q8_0", str(path))
    reader = gguf.GGUFReader(str(path))
    infos = {t.name: t.field.offset for t in reader.tensors}
    data_start = min(t.data_offset for t in reader.tensors)
    del reader
    return path.read_bytes(), infos, data_start


def info_fields(data: bytes, at: int) -> dict[str, int]:
    """Byte offsets of one tensor info's fields."""
    n = struct.unpack_from("<Q", data, at)[0]
    n_dims_at = at + 8 + n
    n_dims = struct.unpack_from("<I", data, n_dims_at)[0]
    return {"name": at + 8, "n_dims": n_dims_at, "dims": n_dims_at + 4,
            "type": n_dims_at + 4 + 8 * n_dims, "offset": n_dims_at + 8 + 8 * n_dims}


def opened(tmp_path, data: bytes) -> str:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(FormatError) as exc:
        open_model(str(path))
    msg = str(exc.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    assert not any(s in msg for s in INTERNAL), msg
    assert "the file is truncated" not in msg, msg
    return msg


CASES = {
    "type": (lambda f: (f["type"], struct.pack("<I", 999)),
             r"tensor 'blk\.0\.attn_k\.weight' has type 999, not a GGML type"),
    "name": (lambda f: (f["name"] + 2, b"\xff"), r"a tensor name is not valid UTF-8"),
    "n_dims": (lambda f: (f["n_dims"], struct.pack("<I", 7)),
               r"tensor 'blk\.0\.attn_k\.weight' has 7 dimensions \(GGUF: 1 to 4\)"),
    "row": (lambda f: (f["dims"], struct.pack("<Q", 63)),
            r"tensor 'blk\.0\.attn_k\.weight' of type Q8_0 has rows of 63 values, not a "
            r"multiple of its block of 32"),
    "rows": (lambda f: (f["dims"] + 8, struct.pack("<Q", 64)),
             r"share data bytes .* a shape or offset is wrong"),
    "offset": (lambda f: (f["offset"], struct.pack("<Q", 3 << 20)),
               r"tensor 'blk\.0\.attn_k\.weight' .* starts \d+ bytes after .* its offset or "
               r"shape is wrong"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_corrupt_field_is_named(tmp_path, source, case):
    data, infos, _ = source
    edit, pattern = CASES[case]
    at, patch = edit(info_fields(data, infos["blk.0.attn_k.weight"]))
    bad = bytearray(data)
    bad[at:at + len(patch)] = patch
    assert __import__("re").search(pattern, opened(tmp_path, bytes(bad)))


def test_version_and_key(tmp_path, source):
    data, _, _ = source
    bad = bytearray(data)
    bad[4:8] = struct.pack("<I", 99)
    assert "GGUF version 99 (byte 4)" in opened(tmp_path, bytes(bad))
    key_at = 24 + 8  # the first metadata key's bytes
    bad = bytearray(data)
    bad[key_at + 1] = 0x01
    assert "a metadata key 'g\\x01neral" in opened(tmp_path, bytes(bad))


def test_random_header_bytes_never_wrap_internal_errors(tmp_path, source):
    """200 files with 1-4 header bytes changed: each opens, or fails with one line naming the
    file and no internal exception (the fuzz in bench/fuzz_headers.py runs 100k+)."""
    data, _, data_start = source
    rng = random.Random(5)
    failed = 0
    for _ in range(200):
        bad = bytearray(data)
        for _ in range(rng.choice([1, 2, 4])):
            bad[rng.randrange(4, data_start)] = rng.randrange(256)
        path = tmp_path / "fuzz.gguf"
        path.write_bytes(bytes(bad))
        try:
            open_model(str(path))
        except (FormatError, MissingTensorError) as exc:
            failed += 1
            msg = str(exc)
            assert msg.startswith(str(path)) and "\n" not in msg
            assert not any(s in msg for s in INTERNAL), msg
    assert failed > 100
