"""Parallel part reads (LoaderConfig.read_parts): a large span is read as parts at once, with
the same bytes as one pread after another, and a fault in any part is the project's read error
naming the file and the byte, after every part has finished."""

from __future__ import annotations

import errno
import os

import pytest

from stream_run.loaders import LoaderConfig, ReadError, UnitReader, layer_key
from stream_run.loaders import reader as reader_module
from stream_run.models import open_model
from tests.tiny_models import write_tiny_model

PART = 8192  # the tiny model's block spans are ~100 KB: a dozen parts each


@pytest.fixture
def model(tmp_path, monkeypatch):
    monkeypatch.setattr(reader_module, "_PART_BYTES", PART)
    write_tiny_model(tmp_path / "m", "llama", n_layers=2)
    index = open_model(str(tmp_path / "m")).index
    return index, str(tmp_path / "m" / "model.safetensors")


def read_all(index, config):
    reader = UnitReader(index, config)
    try:
        return {k: {n: t.data.tobytes() for n, t in reader.read(k).items()} for k in index.units}
    finally:
        reader.close()


@pytest.mark.parametrize("direct", [False, True])
def test_parts_read_the_same_bytes(model, direct):
    index, _ = model
    assert index.units[layer_key(0)].nbytes > 4 * PART
    one = read_all(index, LoaderConfig(direct_io=direct, read_parts=1))
    assert read_all(index, LoaderConfig(direct_io=direct, read_parts=4)) == one


def test_parts_are_read_at_once(model, monkeypatch):
    index, _ = model
    calls = []
    real = os.preadv

    def preadv(fd, buffers, offset):
        calls.append(offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(reader_module.os, "preadv", preadv)
    reader = UnitReader(index, LoaderConfig(read_parts=4))
    try:
        reader.read(layer_key(0))
        assert reader._parts is not None  # the part pool was used
    finally:
        reader.close()
    assert len(calls) > 4 and len(set(calls)) == len(calls)  # each part once, no overlap
    assert reader._parts is None  # close shut the pool down


def test_a_fault_in_a_later_part_names_the_file_and_byte(model, monkeypatch):
    index, path = model
    reader = UnitReader(index, LoaderConfig(read_parts=4))
    real = os.preadv
    bad: list[int] = []

    def preadv(fd, buffers, offset):
        if bad and offset == bad[0]:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(reader_module.os, "preadv", preadv)
    try:
        start = min(t.offset for t in index.units[layer_key(1)].tensors.values())
        bad.append(start + 2 * PART)  # the third part of the unit's one span
        with pytest.raises(ReadError, match=rf"{path}: read of unit 'layers\.1' failed at byte "
                                            rf"{start + 2 * PART}: Input/output error"):
            reader.read(layer_key(1))
        bad.clear()
        good = reader.read(layer_key(1))  # the next read is right
        ref = read_all(index, LoaderConfig(read_parts=1))[layer_key(1)]
        assert {n: t.data.tobytes() for n, t in good.items()} == ref
    finally:
        reader.close()


def test_a_file_truncated_inside_a_later_part(model):
    index, path = model
    start = min(t.offset for t in index.units[layer_key(1)].tensors.values())
    with open(path, "r+b") as f:
        f.truncate(start + 3 * PART + 100)
    reader = UnitReader(index, LoaderConfig(read_parts=4))
    try:
        with pytest.raises(ReadError, match=rf"{path}: unexpected end of file at byte "
                                            rf"{start + 3 * PART + 100} while reading unit "
                                            r"'layers\.1'"):
            reader.read(layer_key(1))
    finally:
        reader.close()
