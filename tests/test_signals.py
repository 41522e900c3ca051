"""SIGINT and SIGTERM sent to stream-convert (mid-write), stream-serve (while the model loads,
and while it streams an answer) and stream-run (mid-generation): a clean exit with no
traceback, code 130 / 143, no half output and the previous output intact.

Each signal goes at a moment the test sees (a line on stderr, a unit file in the temp dir, the
first bytes of an answer), not after a blind sleep."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.tiny_models import write_tiny_model

CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
SIGNALS = pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])


class Child:
    """A CLI in a subprocess whose stderr (and stdout) lines are collected by threads."""

    def __init__(self, module: str, *args: object) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"}
        self.proc = subprocess.Popen([sys.executable, "-m", module, *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self.out: dict[str, list[str]] = {"stdout": [], "stderr": []}
        for name in self.out:
            threading.Thread(target=self._pump, args=(name,), daemon=True).start()

    def _pump(self, name: str) -> None:
        stream = getattr(self.proc, name)
        while chunk := stream.read1(4096) if name == "stdout" else stream.readline():
            text = chunk.decode(errors="replace")
            self.out[name].append(text)
            self.lines.put((name, text))

    def wait_for(self, text: str, stream: str = "stderr", timeout_s: float = 120) -> str:
        """Block until `text` appears on a stream (fails the test on exit or timeout)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if text in "".join(self.out[stream]):
                return "".join(self.out[stream])
            assert self.proc.poll() is None or not self.lines.empty(), \
                f"exited {self.proc.returncode} before {text!r}: {self.stderr}"
            try:
                self.lines.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                assert time.monotonic() < deadline, f"no {text!r} in {timeout_s} s: {self.stderr}"

    def stop(self, sig: int, timeout_s: float = 30) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    @property
    def stderr(self) -> str:
        return "".join(self.out["stderr"])


def assert_clean(child: Child, rc: int, sig: int) -> None:
    time.sleep(0.1)  # the pump threads read the last lines
    assert rc == CODES[sig], (rc, child.stderr)
    assert "Traceback" not in child.stderr, child.stderr
    assert "Error" not in child.stderr, child.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> pathlib.Path:
    # 256 positions, so a streamed answer runs long enough to be caught mid-way
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_model(path, "llama", n_layers=4)
    return path


# --- stream-serve -----------------------------------------------------------------------------


@SIGNALS
def test_serve_exits_cleanly_when_signalled_while_loading(tiny, sig):
    child = Child("stream_run.cli.serve", tiny, "--port", "0", "--backend", "numpy")
    child.wait_for("(loading the model)")
    rc = child.stop(sig)
    assert_clean(child, rc, sig)
    assert "ready" not in child.stderr  # the load was still running when the signal came


def _stream_request(port: int, max_tokens: int) -> socket.socket:
    body = json.dumps({"model": "tiny", "stream": True, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "hello"}]}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


@SIGNALS
def test_serve_exits_cleanly_when_signalled_while_streaming(tiny, sig):
    child = Child("stream_run.cli.serve", tiny, "--port", "0", "--backend", "numpy",
                  "--model-name", "tiny")
    port = int(child.wait_for("/v1 (loading").split("127.0.0.1:")[1].split("/")[0])
    child.wait_for("stream-serve: ready")
    sock = _stream_request(port, 200)
    seen = b""
    while b"data: " not in seen:  # the answer has started
        chunk = sock.recv(65536)
        assert chunk, seen
        seen += chunk
        assert not seen.startswith(b"HTTP/1.1 4"), seen
    t0 = time.monotonic()
    rc = child.stop(sig)
    assert time.monotonic() - t0 < 10  # in-flight streams do not hold the exit for long
    sock.close()
    assert_clean(child, rc, sig)


# --- stream-convert ---------------------------------------------------------------------------


def _tree_digest(path: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def big_tiny(tmp_path_factory) -> pathlib.Path:
    """A random model with enough layers that its conversion takes a while."""
    path = tmp_path_factory.mktemp("many-layers")
    write_tiny_model(path, "llama", n_layers=48,
                     config_overrides={"hidden_size": 256, "intermediate_size": 768})
    return path


@SIGNALS
def test_convert_signalled_mid_write_leaves_the_previous_output(big_tiny, tmp_path, sig):
    out = tmp_path / "out"
    out.mkdir()  # a previous stream-convert output (only its manifest's format is checked)
    (out / "manifest.json").write_text(json.dumps({"format": "stream-run-packed",
                                                   "version": 1, "units": {}}))
    (out / "model-embed.safetensors").write_bytes(os.urandom(4096))
    before = _tree_digest(out)
    child = Child("stream_run.cli.convert", big_tiny, out, "--force", "--quiet",
                  "--recipe", "none")
    deadline = time.monotonic() + 120
    while not any(tmp_path.glob("out.converting-*/model-layers.*.safetensors")):
        assert child.proc.poll() is None, child.stderr
        assert time.monotonic() < deadline
        time.sleep(0.005)
    rc = child.stop(sig)
    assert_clean(child, rc, sig)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left
    assert _tree_digest(out) == before
    assert "interrupted" in child.stderr


# --- stream-run (cli/run.py) --------------------------------------------------------------------


@SIGNALS
def test_run_exits_cleanly_when_signalled_mid_generation(tiny, sig):
    child = Child("stream_run.cli.run", tiny, "--prompt", "hello", "--max-tokens", "200",
                  "--ignore-chat-template", "--backend", "numpy")
    deadline = time.monotonic() + 120
    while not "".join(child.out["stdout"]).strip():  # tokens are coming out
        assert child.proc.poll() is None, child.stderr
        assert time.monotonic() < deadline
        time.sleep(0.005)
    rc = child.stop(sig)
    assert_clean(child, rc, sig)


def test_cancel_on_sigterm_unwinds_the_main_task():
    """The helper cli/common.py's run_main would use for stream-run (see the test above)."""
    import asyncio

    from stream_run.cli.signals import Terminated, cancel_on_sigterm, exit_status

    cleaned = []

    async def body():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(30)
        finally:
            cleaned.append(True)

    with pytest.raises(Terminated) as exc:
        asyncio.run(cancel_on_sigterm(body()))
    assert cleaned == [True] and exit_status(exc.value) == 143
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handed back
