"""A full disk while stream-convert writes: one line naming the file, exit 2, no temp dir left
behind, and the previous output at OUT untouched. The failure is injected at a file write (any
user), and made real on a small tmpfs at every size the output passes through (root only).
The same for stream-run --prompt-cache-file, the other writer (a real full tmpfs)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pathlib
import subprocess
import sys

import pytest

from stream_run.cli import convert as cli
from stream_run.loaders import packed
from tests.packed_models import write_kquant_gguf
from tests.tiny_models import write_tiny_model


def digest(path: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def convert(capsys, src, out) -> tuple[int, str]:
    rc = cli.main([str(src), str(out), "--force", "--quiet"])
    return rc, capsys.readouterr().err


class FullAfter:
    """open() whose files take `room` bytes in all, then fail with ENOSPC (as write() does)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.paths: list[str] = []

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)  # noqa: SIM115 - returned wrapped
        if "w" not in mode:
            return f
        self.paths.append(str(path))
        full = self

        class File:
            def write(self, data) -> int:
                n = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
                if n > full.room:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                full.room -= n
                return f.write(data)

            def __getattr__(self, name):
                return getattr(f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

        return File()


@pytest.fixture
def previous(tmp_path):
    """A tiny model and a finished conversion of it at OUT."""
    src = tmp_path / "src"
    write_tiny_model(src, "llama", n_layers=4)
    out = tmp_path / "out"
    assert cli.main([str(src), str(out), "--quiet"]) == 0
    return src, out


def test_enospc_writing_a_unit_leaves_the_previous_output(previous, capsys, monkeypatch):
    src, out = previous
    before = digest(out)
    full = FullAfter(room=3 * os.path.getsize(out / "model-layers.0.safetensors") // 2)
    monkeypatch.setattr(packed, "open", full, raising=False)
    rc, err = convert(capsys, src, out)
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "No space left on device" in err and full.paths[-1] in err  # names the file
    assert os.path.basename(full.paths[-1]).startswith("model-layers.")
    assert sorted(p.name for p in out.parent.iterdir()) == ["out", "src"]  # no temp dir left
    assert digest(out) == before


def test_enospc_writing_the_manifest_leaves_the_previous_output(previous, capsys, monkeypatch):
    src, out = previous
    before = digest(out)
    from stream_run.convert import convert as library

    monkeypatch.setattr(library, "open", lambda path, mode="r", *a, **k: FullAfter(0)(
        path, mode, *a, **k) if str(path).endswith("manifest.json") else open(path, mode, *a, **k),
        raising=False)
    rc, err = convert(capsys, src, out)
    assert rc == 2 and err.count("\n") == 1
    assert "No space left on device" in err and "manifest.json" in err
    assert sorted(p.name for p in out.parent.iterdir()) == ["out", "src"]
    assert digest(out) == before


@contextlib.contextmanager
def tmpfs(path: pathlib.Path, size: str):
    path.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_real_full_disk_at_every_point_of_the_output(tmp_path, capsys):
    """A GGUF source, so the tokenizer is written by tokenizers' own (Rust) file code too."""
    src = tmp_path / "m.gguf"
    write_kquant_gguf(src)
    with tmpfs(tmp_path / "disk", "8m") as disk:
        out = disk / "out"
        assert cli.main([str(src), str(out), "--quiet"]) == 0
        capsys.readouterr()
        before = digest(out)
        page = os.statvfs(disk).f_frsize
        pages = {p.name: -(-os.path.getsize(p) // page) for p in out.iterdir()}
        need = sum(pages.values())
        # pages left free: a few steps through the units, then every page of the small files
        # written after them (config, index, tokenizer files, manifest)
        tail = sum(n for name, n in pages.items() if not name.startswith("model-"))
        failed_at = set()
        for free in sorted({*range(0, need, max(1, need // 6)), *range(need - tail - 1, need + 8)}):
            avail = os.statvfs(disk).f_bavail
            (disk / "filler").write_bytes(b"\0" * (avail - free) * page)
            rc, err = convert(capsys, src, out)
            (disk / "filler").unlink()
            assert rc in (0, 2), err
            assert sorted(p.name for p in disk.iterdir()) == ["out"], (free, err)
            if rc == 2:
                assert err.count("\n") == 1 and "No space left on device" in err, err
                assert digest(out) == before, (free, err)
                failed_at.add(err.split(".converting-")[1].split("/")[1].split("'")[0])
            else:
                assert digest(out).keys() == before.keys()
                break
        assert rc == 0  # with room for it, the same conversion goes through
        assert {"tokenizer.json", "manifest.json", "model-embed.safetensors"} <= failed_at


def test_full_disk_saving_a_prompt_cache_keeps_the_previous_file(tmp_path, capsys):
    from stream_run.cli import run as cli_run

    model = tmp_path / "m"
    write_tiny_model(model, "qwen3")
    args = [str(model), "--ignore-chat-template", "--max-tokens", "4"]
    with tmpfs(tmp_path / "disk", "1m") as disk:
        f = disk / "conv.safetensors"
        assert cli_run.main([*args, "--prompt", "hello world", "--prompt-cache-file",
                             str(f)]) == 0
        before = f.read_bytes()
        capsys.readouterr()
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # fill the disk
        try:
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        assert free < len(before)
        rc = cli_run.main([*args, "--prompt", "hello world " + "paris is the capital " * 20,
                           "--prompt-cache-file", str(f)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and "No space left on device" in err[-1], err
        assert f.read_bytes() == before  # the earlier file, whole
        assert sorted(p.name for p in disk.iterdir()) == ["conv.safetensors", "filler"]
