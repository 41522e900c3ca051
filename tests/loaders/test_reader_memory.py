"""What a read holds in RAM: the bytes the budget counts for it (buffer_nbytes), q/k rows
un-permuted inside the read buffer, mmap reads whose pages leave RSS with the unit."""

import gc

import numpy as np
import pytest

from stream_run.bench.synth import SynthSpec, synthesize
from stream_run.loaders import LoaderConfig, UnitReader, gguf_file, layer_key
from stream_run.loaders.buffers import ALIGN
from stream_run.models import REGISTRY, open_model
from tests.loaders.test_gguf import N_HEAD, N_KV, read_ref, write_gguf


def rss_file_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.fixture(scope="module")
def big_layers(tmp_path_factory):
    """Two 17 MB f16 blocks."""
    path = tmp_path_factory.mktemp("reader") / "m"
    synthesize(SynthSpec(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=512,
                         dtype="f16"), str(path))
    return open_model(str(path)).index


@pytest.mark.parametrize("mode", ["pread", "direct", "mmap"])
def test_buffer_nbytes_is_what_a_read_holds_up_to_page_slack(big_layers, mode):
    config = LoaderConfig("mmap") if mode == "mmap" else LoaderConfig(direct_io=mode == "direct")
    reader = UnitReader(big_layers, config)
    key = layer_key(0)
    got = reader.buffer_nbytes(key)
    assert got == big_layers.units[key].nbytes  # safetensors: no gaps between tensors
    if mode != "mmap":
        taken = []
        take = reader.buffers.take
        reader.buffers.take = lambda n: taken.append(n) or take(n)  # type: ignore[method-assign]
        reader.read(key)
        assert got <= taken[0] <= got + 2 * ALIGN  # the read's buffer (O_DIRECT: page slack)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="Linux /proc")
def test_mmap_reads_leave_rss_when_the_unit_dies(big_layers):
    """One mapping of the whole file kept every page ever touched in RSS, outside the budget:
    each read now maps its own ranges, unmapped with the unit's last array."""
    reader = UnitReader(big_layers, LoaderConfig("mmap"))
    before = rss_file_bytes()
    for key in (layer_key(0), layer_key(1)):
        raw = reader.read(key)
        touched = sum(int(t.data.sum()) for t in raw.values())  # fault every page in
        assert touched >= 0
        assert rss_file_bytes() - before > 0.9 * big_layers.units[key].nbytes
        del raw
        gc.collect()
        assert rss_file_bytes() - before < 2**20, "the unit's pages stayed mapped"
    reader.close()


def test_gguf_q_k_rows_are_unpermuted_inside_the_read_buffer(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path)
    index, _ = gguf_file.open_gguf(str(path), REGISTRY)
    unit = index.units[layer_key(0)]
    readers = [UnitReader(index), UnitReader(index, LoaderConfig("mmap"))]
    raw, mapped = (r.read(layer_key(0)) for r in readers)
    for r in readers:  # an open mmap reader keeps the process-wide SIGBUS guard installed
        r.close()
    for name, heads in (("self_attn.q_proj.weight", N_HEAD), ("self_attn.k_proj.weight", N_KV)):
        ref = unit.tensors[name]
        assert ref.unpermute_heads == heads
        np.testing.assert_array_equal(raw[name].data, read_ref(ref))
        np.testing.assert_array_equal(mapped[name].data, read_ref(ref))
        # no copy beside the buffer: the tensor is a view of the same buffer as the others
        assert raw[name].data.base is raw["mlp.up_proj.weight"].data.base
