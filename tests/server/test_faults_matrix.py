"""Faults while serving, in every read mode (issue 17): EIO from a read, short reads, the model
file truncated, the model file replaced. After each: the request gets the project's error
naming the file (or, where the fault is harmless, the right answer), /health reports the error
while it lasts, no bytes stay reserved in the budget, and once the file is good again the next
request is answered as before the fault.

Short reads apply to pread and O_DIRECT only: mmap mode makes no read calls (a page is mapped
whole, or faults: that is the truncated case). EIO in mmap mode is injected where the mapping
is made; a disk error while a mapped page is read in is a bus error (tests/test_faults_cli.py).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil

import pytest

from stream_run.engine import Engine, EngineConfig
from stream_run.loaders import LoaderConfig
from stream_run.server.app import ServerConfig
from tests.server.harness import ServerThread
from tests.tiny_models import write_tiny_model

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8,
        "temperature": 0}
MODES = {"pread": LoaderConfig(), "direct": LoaderConfig(direct_io=True),
         "mmap": LoaderConfig(read_mode="mmap")}
CASES = [(mode, fault) for mode in MODES for fault in ("eio", "short", "truncated", "replaced")
         if not (mode == "mmap" and fault == "short")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    src = tmp_path_factory.mktemp("faults") / "m"
    write_tiny_model(src, "llama", n_layers=4)
    probe = asyncio.run(Engine.open(str(src), EngineConfig(backend="numpy")))
    budget = probe.model_bytes // 2  # layers stream, so every request reads
    probe.close()
    return src, budget


@pytest.fixture(params=CASES, ids=[f"{m}-{f}" for m, f in CASES])
def case(request, model, tmp_path):
    mode, fault = request.param
    src, budget = model
    shutil.copytree(src, tmp_path / "m")
    srv = ServerThread.for_model(tmp_path / "m", ServerConfig("tiny", max_tokens_cap=32),
                                 memory_budget_bytes=budget, loader=MODES[mode])
    srv.wait_loaded()
    yield srv, mode, fault, tmp_path / "m" / "model.safetensors"
    srv.close()


class Fault:
    """Injects one fault into the model file's reads, and removes it ("the file is good
    again")."""

    def __init__(self, kind: str, mode: str, path, server: ServerThread,
                 monkeypatch: pytest.MonkeyPatch) -> None:
        self.kind, self.mode, self.path, self.server = kind, mode, str(path), server
        self.monkeypatch = monkeypatch
        self.backup = f"{path}.backup"
        self.short_reads = 0

    def inject(self) -> None:
        if self.kind == "eio" and self.mode == "mmap":
            self.server.engine.reader.fault_hook = self._eio_hook
        elif self.kind == "eio":
            self.monkeypatch.setattr(os, "preadv", self._eio_preadv)
        elif self.kind == "short":
            self.monkeypatch.setattr(os, "preadv", self._short_preadv)
        elif self.kind == "truncated":
            shutil.copy(self.path, self.backup)
            os.truncate(self.path, os.path.getsize(self.path) // 3)
        elif self.kind == "replaced":  # another file renamed over it: an update, a download
            shutil.copy(self.path, self.backup)
            junk = f"{self.path}.new"
            with open(junk, "wb") as f:
                f.write(b"\0" * 1000)
            os.rename(junk, self.path)

    def remove(self) -> None:
        self.server.engine.reader.fault_hook = None
        self.monkeypatch.undo()
        if self.kind in ("truncated", "replaced"):
            shutil.copy(self.backup, self.path)  # in place, as a user restores a file

    @property
    def is_error(self) -> bool:
        """Whether requests fail while it lasts (short reads and a renamed-over file do not:
        reads go on until done, and the engine reads the file it opened)."""
        return self.kind in ("eio", "truncated")

    def _eio_hook(self, path, offset, nbytes):
        raise OSError(errno.EIO, "Input/output error")

    @staticmethod
    def _eio_preadv(fd, buffers, offset):
        raise OSError(errno.EIO, "Input/output error")

    def _short_preadv(self, fd, buffers, offset, _preadv=os.preadv):
        # at most half of what was asked, in whole 4 KiB blocks as O_DIRECT returns them
        view = memoryview(buffers[0])
        want = max(4096, len(view) // 2 // 4096 * 4096)
        if want < len(view):
            self.short_reads += 1
        return _preadv(fd, [view[:want]], offset)


def answer(server: ServerThread, stream: bool = False):
    return server.request("POST", "/v1/chat/completions", {**BODY, "stream": stream})


def assert_settled(server: ServerThread) -> None:
    server.wait_idle()
    assert server.engine.cache.compute.reserved_bytes == 0
    assert server.engine.scheduler._inflight == {}


def test_fault_then_recovery(case, monkeypatch, caplog):
    server, mode, kind, path = case
    status, good = answer(server)
    assert status == 200
    server.wait_idle()  # nothing touches the file while it is changed
    fault = Fault(kind, mode, path, server, monkeypatch)
    fault.inject()
    caplog.set_level(logging.WARNING)
    try:
        for stream in (False, True):
            status, body = answer(server, stream)
            if not fault.is_error:
                assert status == 200
                if not stream:
                    assert body["choices"][0]["message"] == good["choices"][0]["message"]
                continue
            if stream and not (mode == "mmap" and kind == "truncated"):
                # the response had begun: the error is an event of the stream
                assert status == 200 and "model_read_error" in body and str(path) in body
            else:  # mmap: the files are checked before the request touches mapped pages
                assert status == 503 and body["error"]["code"] == "model_read_error"
                assert str(path) in body["error"]["message"]
            health_status, health = server.request("GET", "/health")
            assert health_status == 503 and health["status"] == "error"
            assert str(path) in health["message"]
            assert_settled(server)
    finally:
        fault.remove()
    if kind == "short":
        assert fault.short_reads > 0
    if kind == "replaced":
        assert any(f"{path}: the file was replaced" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.exc_info]  # one line each, no traceback
    status, again = answer(server)
    assert status == 200 and again["choices"][0]["message"] == good["choices"][0]["message"]
    assert server.request("GET", "/health") == (200, {"status": "ok", "model": "tiny",
                                                      "active": 0, "waiting": 0})
    assert_settled(server)
