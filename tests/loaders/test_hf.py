"""HF directory indexing and its boundary errors (STYLE.md F.35)."""

import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from stream_run.loaders import (
    EMBED,
    HEAD,
    FormatError,
    MissingTensorError,
    UnitReader,
    hf,
    layer_key,
)
from stream_run.models import REGISTRY, open_model
from tests.tiny_models import write_tiny_model


def open_hf_dir(path):
    return hf.open_hf_dir(path, REGISTRY)


def rewrite_weights(model_dir, edit):
    """Load model.safetensors, apply edit(dict), write it back (the test's own copy)."""
    from safetensors.numpy import load_file

    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_index_groups_tensors_into_units_without_reading_data(tmp_path):
    cfg, weights = write_tiny_model(tmp_path, "llama")
    index = open_hf_dir(str(tmp_path))
    assert list(index.units) == [EMBED, layer_key(0), layer_key(1), HEAD]
    assert "self_attn.q_proj.weight" in index.units[layer_key(0)].tensors
    assert index.units[HEAD].tensors.keys() == {"norm.weight", "lm_head.weight"}
    ref = index.units[layer_key(1)].tensors["mlp.down_proj.weight"]
    assert ref.shape == (cfg["hidden_size"], cfg["intermediate_size"])
    host = UnitReader(index).read(layer_key(1))["mlp.down_proj.weight"]
    got = host.data.view(np.float32).reshape(ref.shape)
    np.testing.assert_array_equal(got, weights["model.layers.1.mlp.down_proj.weight"])


def test_mmap_and_pread_read_the_same_bytes(tmp_path):
    write_tiny_model(tmp_path, "qwen3")
    index = open_hf_dir(str(tmp_path))
    from stream_run.loaders import LoaderConfig

    readers = [UnitReader(index, LoaderConfig(mode)) for mode in ("pread", "mmap")]
    try:
        a, b = (r.read(layer_key(0)) for r in readers)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name].data, b[name].data)
    finally:  # an open mmap reader keeps the process-wide SIGBUS guard installed
        for r in readers:
            r.close()


def test_missing_path(tmp_path):
    with pytest.raises(FormatError, match="no such file or directory"):
        open_model(str(tmp_path / "nope"))


def test_dir_without_weights(tmp_path):
    write_tiny_model(tmp_path, "llama")
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FormatError, match="no weights found"):
        open_model(str(tmp_path))


def test_unknown_model_type_lists_supported(tmp_path):
    write_tiny_model(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"unsupported model_type 'gpt_neox'; supported: llama"):
        open_model(str(tmp_path))


def test_truncated_header(tmp_path):
    write_tiny_model(tmp_path, "llama")
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:100])
    with pytest.raises(FormatError, match=r"model\.safetensors: corrupt safetensors header"):
        open_model(str(tmp_path))


def test_corrupt_header_json(tmp_path):
    write_tiny_model(tmp_path, "llama")
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:8 + n] = b"{" * n
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="invalid JSON"):
        open_model(str(tmp_path))


def test_truncated_tensor_data(tmp_path):
    write_tiny_model(tmp_path, "llama")
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-64])
    with pytest.raises(FormatError, match="the file is truncated"):
        open_model(str(tmp_path))


def test_missing_tensor_is_named(tmp_path):
    write_tiny_model(tmp_path, "llama")
    rewrite_weights(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MissingTensorError, match=r"unit 'layers\.1' is missing .*mlp\.up_proj"):
        open_model(str(tmp_path))


def test_wrong_shape_is_named(tmp_path):
    write_tiny_model(tmp_path, "llama")

    def edit(t):
        w = t["model.layers.0.self_attn.k_proj.weight"]
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((w.shape[0] + 1, w.shape[1]),
                                                               np.float32)
    rewrite_weights(tmp_path, edit)
    with pytest.raises(FormatError, match=r"'self_attn\.k_proj\.weight' of unit 'layers\.0' has "
                                          r"shape \[\d+, \d+\], expected"):
        open_model(str(tmp_path))


def test_unexpected_tensor_is_named(tmp_path):
    write_tiny_model(tmp_path, "llama")
    rewrite_weights(tmp_path, lambda t: t.update(
        {"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(FormatError, match=r"unexpected tensor\(s\) \['mlp\.extra\.weight'\]"):
        open_model(str(tmp_path))


def test_inputs_are_never_modified(tmp_path):
    write_tiny_model(tmp_path, "llama")
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()}
    index = open_hf_dir(str(tmp_path))
    reader = UnitReader(index)
    for key in index.units:
        reader.read(key)
    reader.close()
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()}
    assert before == after


def test_direct_io_reads_the_same_bytes(tmp_path):
    from stream_run.loaders import LoaderConfig

    write_tiny_model(tmp_path, "qwen2", sharded=True)
    index = open_hf_dir(str(tmp_path))
    direct = UnitReader(index, LoaderConfig(direct_io=True))
    plain = UnitReader(index)
    for key in index.units:
        a, b = direct.read(key), plain.read(key)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name].data, b[name].data)
    if not direct.direct:
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT (fallback tested below)")


def test_direct_io_refused_falls_back_with_one_notice(tmp_path, monkeypatch, caplog):
    import errno

    from stream_run.loaders import LoaderConfig
    from stream_run.loaders import reader as reader_mod

    write_tiny_model(tmp_path, "llama")
    index = open_hf_dir(str(tmp_path))
    real_open = os.open

    def refusing_open(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(reader_mod.os, "open", refusing_open)
    r = UnitReader(index, LoaderConfig(direct_io=True))
    got = {k: r.read(k) for k in index.units}
    want = {k: UnitReader(index).read(k) for k in index.units}
    for k in index.units:
        for name in got[k]:
            np.testing.assert_array_equal(got[k][name].data, want[k][name].data)
    notices = [m for m in caplog.messages if "refuses O_DIRECT" in m]
    assert len(notices) == 1 and "model.safetensors" in notices[0]


@pytest.mark.parametrize("bad", [1e999, 1.5, True, "8"])
def test_header_numbers_must_be_integers(tmp_path, bad):
    """Found by mutating headers: data_offsets of 1e999 raised OverflowError, and 1.5 was
    silently truncated; a safetensors header holds integers only."""
    import json

    write_tiny_model(tmp_path, "llama")
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] = bad
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    # keep the data where it was: the header's length changes, the offsets are relative
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(FormatError, match=rf"corrupt header entry for tensor '{name}'"):
        open_model(str(tmp_path))
