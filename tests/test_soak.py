"""A short soak (bench/soak.py; the closing notes report the hour-long one): stream-serve in a
child process, 2 clients for ~20 s on a tiny model streamed under a memory budget, every kind
of request, then the report's invariants."""

from __future__ import annotations

import asyncio
import json
import signal

from stream_run.bench import soak
from tests.tiny_models import write_tiny_model


def test_short_soak_report(tmp_path, capsys):
    write_tiny_model(tmp_path / "m", "llama", n_layers=4)
    weights = (tmp_path / "m" / "model.safetensors").stat().st_size
    cfg = soak.SoakConfig(model=str(tmp_path / "m"), duration_s=15, warmup_s=4, clients=2,
                          max_tokens=8, greedy_tokens=16, memory_budget=str(weights // 2),
                          max_rss_growth_pct=5.0, serve_args=("--backend", "numpy"))
    r = asyncio.run(soak.run_soak(cfg))
    assert r.failures == [], r.failures
    assert r.served > 20 and r.requests > r.served
    assert {k: v for k, v in r.errors.items() if k != "expected_4xx"} == dict.fromkeys(
        soak.UNEXPECTED, 0)
    assert r.errors["expected_4xx"] > 0  # bad requests were sent, and refused
    kinds = {k.split(":")[0].split()[0] for k in r.outcomes}
    assert {"chat", "chat_stream", "completion", "completion_stream", "cancel_stream",
            "disconnect", "bad", "info"} <= kinds
    assert r.outcomes.get("cancel_stream: cancelled", 0) > 0
    assert r.answers_identical and r.answer_start
    assert 0 < r.rss_start_bytes <= r.rss_peak_bytes and r.rss_end_bytes > 0
    assert abs(r.rss_growth_pct) <= cfg.max_rss_growth_pct
    assert r.read_chars and r.read_chars > weights  # streamed: the weights were read again
    assert r.latency_p50_s is not None and r.latency_p50_s <= r.latency_p99_s
    assert r.server_exit == 128 + signal.SIGTERM and not r.server_traceback
    print(soak.format_report(r))
    table = capsys.readouterr().out
    assert "| RSS growth |" in table and "| result | ok |" in table
    json.dumps(r.to_json())  # --json writes it as it is


def test_soak_flags_and_exit_codes(tmp_path, monkeypatch, capsys):
    import argparse

    p = argparse.ArgumentParser()
    soak.add_arguments(p)
    args = p.parse_args([str(tmp_path), "--duration", "600", "--clients", "3",
                         "--memory-budget", "75MB", "--serve-arg=--verify", "--backend", "numpy"])
    cfg = soak.config_from_args(args)
    assert (cfg.duration_s, cfg.clients, cfg.memory_budget, cfg.warmup_s) == (600, 3, "75MB", 60)
    assert cfg.serve_args == ("--verify", "--backend", "numpy")

    async def failing(_cfg):
        return soak.SoakReport(config={**vars(cfg), "duration_s": 1.0, "warmup_s": 0.0,
                                       "model": "m", "clients": 1, "memory_budget": None},
                               failures=["RSS grew 3.00 % (limit 2 %)"])

    monkeypatch.setattr(soak, "run_soak", failing)
    assert soak.main_from_args(args) == 1
    assert "FAILED: RSS grew 3.00 %" in capsys.readouterr().out
    assert soak.main_from_args(p.parse_args([str(tmp_path), "--clients", "0"])) == 2
