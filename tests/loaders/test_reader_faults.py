"""UnitReader against a model file that changes after it was opened (issue 17): the messages
name the file, the unit and the sizes; mmap mode registers its files with the SIGBUS guard
only while they are open."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest

from stream_run.loaders import LoaderConfig, ReadError, UnitReader, layer_key, sigbus
from stream_run.models import open_model
from tests.tiny_models import write_tiny_model

MODES = {"pread": LoaderConfig(), "direct": LoaderConfig(direct_io=True),
         "mmap": LoaderConfig(read_mode="mmap")}


@pytest.fixture
def model(tmp_path):
    write_tiny_model(tmp_path / "m", "llama", n_layers=4)
    index = open_model(str(tmp_path / "m")).index
    return index, str(tmp_path / "m" / "model.safetensors")


def read_bytes(reader: UnitReader, key: str) -> dict[str, bytes]:
    return {n: t.data.tobytes() for n, t in reader.read(key).items()}


def test_mmap_truncated_file_is_a_read_error_before_mapping(model):
    index, path = model
    reader = UnitReader(index, LoaderConfig(read_mode="mmap"))
    try:
        reader.read(layer_key(0))
        size = os.path.getsize(path)
        os.truncate(path, size // 2)
        match = (rf"{path}: the file was truncated while the engine ran: it has {size // 2} "
                 rf"bytes, the model reads up to byte {size} \(reading unit 'layers\.0'\); "
                 "hint: restore the file")
        with pytest.raises(ReadError, match=match):
            reader.read(layer_key(0))  # its bytes are still there: the file is checked whole
        with pytest.raises(ReadError, match=rf"{path}: .* the model reads up to byte {size}; "):
            reader.check_files()
    finally:
        reader.close()


@pytest.mark.parametrize("mode", list(MODES))
def test_grown_file_is_a_read_error(model, mode):
    index, path = model
    reader = UnitReader(index, MODES[mode])
    try:
        reader.read(layer_key(0))
        size = os.path.getsize(path)
        with open(path, "ab") as f:
            f.write(b"\0" * 100)
        with pytest.raises(ReadError, match=rf"{path}: the file changed while the engine ran: "
                           rf"it has {size + 100} bytes, {size} when it was opened"):
            reader.read(layer_key(1))
        with pytest.raises(ReadError, match="the file changed"):
            reader.check_files()
        os.truncate(path, size)  # as it was: reads go on
        reader.check_files()
        assert read_bytes(reader, layer_key(1))
    finally:
        reader.close()


@pytest.mark.parametrize("mode", list(MODES))
def test_replaced_file_is_read_as_opened_with_one_warning(model, mode, caplog):
    index, path = model
    reader = UnitReader(index, MODES[mode])
    try:
        before = read_bytes(reader, layer_key(1))
        shutil.move(path, path + ".old")
        with open(path, "wb") as f:
            f.write(b"\0" * 64)
        caplog.set_level(logging.WARNING)
        assert read_bytes(reader, layer_key(1)) == before
        assert read_bytes(reader, layer_key(1)) == before
        reader.check_files()
        warnings = [r.getMessage() for r in caplog.records if "was replaced" in r.getMessage()]
        assert warnings == [f"{path}: the file was replaced or removed after the engine opened "
                            "it; still reading the file as it was opened (restart to load the "
                            "new one)"]
    finally:
        reader.close()


def test_mmap_files_guarded_only_while_open(model):
    index, _ = model
    assert not sigbus.installed()
    reader = UnitReader(index, LoaderConfig(read_mode="mmap"))
    data = reader.read(layer_key(0))
    assert sigbus.installed()
    assert np.asarray(next(iter(data.values())).data).size
    reader.close()
    assert not sigbus.installed()
    pread = UnitReader(index, LoaderConfig())
    pread.read(layer_key(0))
    assert not sigbus.installed()  # pread mode maps nothing
    pread.close()
