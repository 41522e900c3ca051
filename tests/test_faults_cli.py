"""stream-run with its model file truncated or replaced mid-generation, in every read mode (issue
17): one line on stderr naming the file and exit 2, never a bus error (exit 135 with no
message, as --read-mode mmap died before), never a traceback.

The file is changed from inside the run, right after the second chunk of the answer is handed
out (a wrapper around Engine.generate), so the next pass meets the fault at a known moment:
with an unlimited budget every unit is resident (mmap: mapped) and nothing is read again, so
the fault is met by touching the pages; with a small budget the next read meets it first."""

from __future__ import annotations

import asyncio
import http.client as http_client
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest

from stream_run.engine import Engine, EngineConfig
from tests.test_signals import Child
from tests.tiny_models import write_tiny_model

# Runs stream-run's main with Engine.generate wrapped: after the answer's second chunk the
# model file is truncated to CUT bytes, or (CUT == -1) replaced by renaming another file over it.
WRAPPER = r"""
import dataclasses, os, sys
from stream_run.cli import run as cli
from stream_run.engine.engine import Engine

path, cut = sys.argv[1], int(sys.argv[2])
generate = Engine.generate

async def faulty_generate(self, *args, **kwargs):
    n = 0
    async for chunk in generate(self, *args, **kwargs):
        yield chunk
        n += 1
        if n == 2:
            if cut >= 0:
                os.truncate(path, cut)
            else:
                os.rename(path + ".other", path)

make_config = cli.make_config

def no_eos(args):  # a fixed length: the run goes on past the fault
    config, params = make_config(args)
    return config, dataclasses.replace(params, ignore_eos=True)

Engine.generate = faulty_generate
cli.make_config = no_eos
sys.exit(cli.main(sys.argv[3:]))
"""

MODES = {"pread": [], "direct": ["--direct-io"], "mmap": ["--read-mode", "mmap"]}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny model and its smallest streaming budget (4 units: layers are read every pass)."""
    path = tmp_path_factory.mktemp("faults") / "m"
    write_tiny_model(path, "llama", n_layers=6)
    probe = asyncio.run(Engine.open(str(path), EngineConfig(backend="numpy")))
    budget = probe.min_budget_bytes * 4
    probe.close()
    return path, budget


def run_cli(model_dir: pathlib.Path, cut: int, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"}
    weights = model_dir / "model.safetensors"
    return subprocess.run(
        [sys.executable, "-c", WRAPPER, str(weights), str(cut), str(model_dir), "--backend",
         "numpy", "--prompt", "hello", "--ignore-chat-template", "--max-tokens", "24", *flags],
        capture_output=True, text=True, env=env, timeout=300)


def error_lines(stderr: str) -> list[str]:
    """stderr without the one-off notice of a first kernel compile."""
    return [line for line in stderr.splitlines() if line and "compiling them" not in line]


@pytest.mark.parametrize("budget", ["resident", "streamed"])
@pytest.mark.parametrize("mode", list(MODES))
def test_truncated_mid_run_is_one_line_and_exit_2(model, tmp_path, mode, budget):
    src, streamed_budget = model
    model_dir = tmp_path / "m"
    shutil.copytree(src, model_dir)
    weights = model_dir / "model.safetensors"
    flags = [*MODES[mode]]
    if budget == "streamed":
        flags += ["--memory-budget", str(streamed_budget)]
    proc = run_cli(model_dir, os.path.getsize(weights) // 3, *flags)
    lines = error_lines(proc.stderr)
    if mode != "mmap" and budget == "resident":
        # every unit was read into RAM before the fault: the answer completes, correctly
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("stream-run: error: ")
    assert str(weights) in lines[0]
    assert "truncated" in lines[0] or "end of file" in lines[0]
    assert proc.stdout  # the answer had begun


@pytest.mark.parametrize("mode", list(MODES))
def test_replaced_mid_run_keeps_reading_the_file_as_opened(model, tmp_path, mode):
    """A file renamed over the model's (an update, a re-download): the engine holds the file it
    opened, so the answer goes on from the same weights, and a warning names the file."""
    src, budget = model
    model_dir = tmp_path / "m"
    shutil.copytree(src, model_dir)
    weights = model_dir / "model.safetensors"
    baseline = run_cli(model_dir, os.path.getsize(weights), "--memory-budget", str(budget),
                       *MODES[mode])
    assert baseline.returncode == 0, baseline.stderr
    other = pathlib.Path(f"{weights}.other")
    other.write_bytes(b"\0" * 1000)  # not a model at all
    proc = run_cli(model_dir, -1, "--memory-budget", str(budget), *MODES[mode])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == baseline.stdout
    assert f"{weights}: the file was replaced or removed" in proc.stderr
    assert os.path.getsize(weights) == 1000


def http(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn = http_client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_serve_mmap_file_truncated_between_requests_is_a_503(model, tmp_path):
    """stream-serve --read-mode mmap, every unit resident (mapped): the file truncated between
    requests gets a 503 naming it, and /health an error, instead of a bus error that killed
    the server; restored in place, the next answer is the one before."""
    src, _ = model
    model_dir = tmp_path / "m"
    shutil.copytree(src, model_dir)
    weights = model_dir / "model.safetensors"
    backup = tmp_path / "backup.safetensors"
    shutil.copy(weights, backup)
    child = Child("stream_run.cli.serve", model_dir, "--port", "0", "--backend", "numpy",
                  "--model-name", "tiny", "--read-mode", "mmap")
    try:
        port = int(child.wait_for("/v1 (loading").split("127.0.0.1:")[1].split("/")[0])
        child.wait_for("stream-serve: ready")
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 8, "temperature": 0}
        status, good = http(port, "POST", "/v1/chat/completions", body)
        assert status == 200
        os.truncate(weights, os.path.getsize(weights) // 3)
        status, err = http(port, "POST", "/v1/chat/completions", body)
        assert status == 503 and err["error"]["code"] == "model_read_error"
        assert f"{weights}: the file was truncated" in err["error"]["message"]
        status, health = http(port, "GET", "/health")
        assert status == 503 and str(weights) in health["message"]
        shutil.copy(backup, weights)
        status, again = http(port, "POST", "/v1/chat/completions", body)
        assert status == 200 and again["choices"] == good["choices"]
        assert http(port, "GET", "/health")[1]["status"] == "ok"
        assert child.proc.poll() is None
    finally:
        child.stop(signal.SIGTERM)
    assert "Traceback" not in child.stderr, child.stderr


# A bus error no size check explains (a disk error while a mapped page is read in), raised in an
# engine that has mapped the model in mmap mode.
BUS_ERROR = r"""
import asyncio, os, signal, sys
from stream_run.engine import Engine, EngineConfig
from stream_run.loaders import LoaderConfig
from stream_run.loaders.sigbus import set_program

set_program("stream-run")

async def main():
    engine = await Engine.open(sys.argv[1], EngineConfig(
        backend="numpy", loader=LoaderConfig(read_mode="mmap")))
    await engine.complete("hello", max_tokens=2)
    print("answered", flush=True)
    os.kill(os.getpid(), signal.SIGBUS)

asyncio.run(main())
"""


def test_mmap_bus_error_without_a_shrunk_file_names_the_files(model):
    src, _ = model
    env = {k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"}
    proc = subprocess.run([sys.executable, "-c", BUS_ERROR, str(src)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stdout == "answered\n"
    lines = error_lines(proc.stderr)
    assert lines == [f"stream-run: error: a bus error (SIGBUS) reading the mapped pages of "
                     f"{src / 'model.safetensors'}: a disk I/O error, or a file changed under "
                     "its mapping (--read-mode mmap); hint: check the disk and the file "
                     "(--read-mode pread reports read errors per request)"]
