"""stream-bench disk: the sweep's figures, the page-cache handling, the outputs."""

import numpy as np
import pytest

from stream_run.bench import disk
from stream_run.bench.cli import main as bench_main
from tests.bench.conftest import assert_meta, assert_one_line_error, assert_png, read_records

MiB = 2**20


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Two files of 6 and 3 MiB of random bytes."""
    root = tmp_path_factory.mktemp("disk")
    rng = np.random.default_rng(0)
    for name, n in (("a.bin", 6 * MiB), ("b.bin", 3 * MiB)):
        (root / name).write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    return root


def test_quick_sweep_figures_are_positive_and_consistent(data_dir, tmp_path, capsys):
    log, plots = tmp_path / "disk.jsonl", tmp_path / "plots"
    rc = bench_main(["disk", str(data_dir), "--quick", "--json", str(log), "--plot", str(plots)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| mode | pattern | block | QD | GB/s | IOPS | p50 | p99 |" in out
    rows = read_records(log, "disk")
    cfg = disk.QUICK
    assert len(rows) == len(cfg.points())
    assert {(r["mode"], r["pattern"]) for r in rows} == {
        (m, p) for m in disk.MODES for p in disk.PATTERNS}
    measured = [r for r in rows if not r["skipped"]]
    assert measured
    for r in measured:
        assert r["ops"] > 0 and r["gbs"] > 0 and r["iops"] > 0 and r["seconds"] > 0
        assert r["bytes_read"] == r["ops"] * r["block_bytes"]  # whole blocks only
        assert r["bytes_read"] <= min(cfg.bytes_per_point, 9 * MiB)  # capped, never wraps
        assert r["gbs"] == pytest.approx(r["bytes_read"] / r["seconds"] / 1e9)
        assert r["iops"] == pytest.approx(r["ops"] / r["seconds"])
        assert 0 < r["lat_p50_s"] <= r["lat_p99_s"]
        if r["mode"] == "direct":
            assert r["cache"] == "cold: O_DIRECT"
        else:
            assert r["cache"].startswith(("cold:", "warm:")), r["cache"]
        assert r["path"] == str(data_dir) and r["files"] == 2 and r["nbytes"] == 9 * MiB
        assert_meta(r["meta"])
    # a 16 MiB block fits in neither file: stated, not measured
    big = [r for r in rows if r["block_bytes"] == 16 * MiB]
    assert big and all("no file holds" in r["skipped"] for r in big)
    assert sorted(p.name for p in plots.iterdir()) == ["disk_block_size.png",
                                                       "disk_queue_depth.png"]
    for p in plots.iterdir():
        assert_png(p)


def test_eviction_is_measured_and_stated(data_dir):
    files = disk.list_files(str(data_dir))
    for f in files:  # read through the page cache
        with open(f, "rb") as fh:
            fh.read()
    frac = disk.cached_fraction(files)
    if frac is None:
        pytest.skip("mincore is not available here")
    assert frac > 0.5
    label, after = disk.evict(files)
    assert after == disk.cached_fraction(files)
    assert label.startswith("cold:" if after <= 0.01 else "warm:"), (label, after)
    assert f"{after:.1%} cached at start" in label


def test_warm_points_say_so(data_dir):
    files = disk.list_files(str(data_dir))
    p = disk.measure_point(files, "buffered", "seq", MiB, 1, 2 * MiB, 1.0, warm=True)
    assert p.cache.startswith("warm") and p.bytes_read == 2 * MiB


@pytest.mark.parametrize("mode", ["buffered", "mmap"])
def test_access_hints_change_nothing_but_the_kernel_advice(data_dir, mode):
    files = disk.list_files(str(data_dir))
    for pattern in disk.PATTERNS:
        p = disk.measure_point(files, mode, pattern, 64 * 1024, 2, 2 * MiB, 1.0, hints=True)
        assert p.bytes_read == 2 * MiB and p.ops == 32 and not p.skipped


def test_random_reads_never_read_a_block_twice(data_dir):
    files = disk.list_files(str(data_dir))
    p = disk.measure_point(files, "buffered", "rand", MiB, 4, 100 * MiB, 5.0)
    assert p.ops == 9 and p.bytes_read == 9 * MiB  # every block once, then the point ends


def test_rate_at_interpolates_in_log_block_size():
    pts = [{"mode": "direct", "pattern": "seq", "block_bytes": b, "threads": t, "gbs": g,
            "skipped": None} for b, t, g in ((MiB, 1, 1.0), (4 * MiB, 1, 2.0), (MiB, 4, 1.5),
                                              (4 * MiB, 4, 3.0))]
    assert disk.rate_at(pts, 2 * MiB, 1)["gbs"] == pytest.approx(1.5)
    best = disk.rate_at(pts, 2 * MiB, 8)
    assert best["gbs"] == pytest.approx(2.25) and best["threads"] == 4
    assert disk.rate_at(pts, 64 * MiB, 2)["gbs"] == pytest.approx(2.0)  # clamped, 1 thread
    assert disk.rate_at([{**p, "mode": "mmap"} for p in pts], MiB, 1) is None


@pytest.mark.parametrize("args, match", [
    (["disk", "/nonexistent/x"], "no such file or directory"),
    (["disk", "{dir}", "--blocks", "4XB"], "--blocks: not a size"),
    (["disk", "{dir}", "--blocks", "5000"], "multiples of 4 KiB"),
    (["disk", "{dir}", "--modes", "direct,floppy"], "--modes must be a list of"),
    (["disk", "{dir}", "--bytes-per-point", "lots"], "not a size"),
    (["disk", "{empty}"], "no non-empty files"),
])
def test_bad_input_is_one_line(data_dir, tmp_path, capsys, args, match):
    (tmp_path / "empty").mkdir()
    args = [a.format(dir=data_dir, empty=tmp_path / "empty") for a in args]
    assert bench_main(args) == 2
    assert_one_line_error(capsys, match)


def test_buffers_are_page_aligned():
    buf = disk.aligned_buffer(3 * 4096 + 5)
    assert buf.ctypes.data % 4096 == 0 and len(buf) >= 3 * 4096 + 5
