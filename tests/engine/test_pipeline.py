"""Pipeline stages over mx.distributed (issue 21): ranks on 127.0.0.1 (mlx.launch, ring backend)
give the tokens one process gives, each rank within its budget's promise; a killed or missing
rank ends the run with one line per surviving rank, no hang."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from stream_run.cli.common import MARGIN_BYTES
from stream_run.cli.pipeline import LAUNCH, RANK_ENV, _free_ports
from stream_run.engine.config import EngineConfig
from stream_run.engine.engine import Engine
from stream_run.engine.pipeline import Stage, StageModel, layer_of, split_layers
from stream_run.engine.pipeline_link import Watchdog
from tests.engine.pipeline_rank import PROMPTS, SHORT
from tests.tiny_models import write_tiny_model

mx = pytest.importorskip("mlx.core")
pytestmark = pytest.mark.skipif(not mx.distributed.is_available(),
                                reason="this MLX build has no distributed backend")
HELPER = os.path.join(os.path.dirname(__file__), "pipeline_rank.py")


def launch(ranks: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(_launch_cmd(ranks, HELPER, *args), capture_output=True, text=True,
                          timeout=timeout)


def _launch_cmd(ranks: int, *command: str, mlx_launch: bool = False) -> list[str]:
    """The ranks started as stream-run --pipeline N starts them (cli.pipeline.launch_local),
    or under mlx.launch (what --hostfile uses)."""
    if not mlx_launch:
        return [sys.executable, "-m", "stream_run.cli.pipeline", str(ranks), sys.executable,
                *command]
    return [sys.executable, "-c", LAUNCH, "--backend", "ring", "-n", str(ranks),
            "--starting-port", str(_free_ports(ranks)), "--env", f"{RANK_ENV}=1", "--",
            sys.executable, *command]


def one_process(model: str, n: int, budget: int | None, streams: int = 2,
                alone: bool = False, prompts: list[list[int]] = PROMPTS) -> list[list[int]]:
    """The first `streams` of pipeline_rank.PROMPTS at once in one process (alone: each
    request on its own, one after another)."""
    async def go() -> list[list[int]]:
        config = EngineConfig(memory_budget_bytes=budget)
        async with await Engine.open(model, config) as engine:
            params = engine.make_params(max_tokens=n, ignore_eos=True)
            if alone:
                return [(await engine.complete(p, params)).token_ids
                        for p in prompts[:streams]]
            outs = await asyncio.gather(*(engine.complete(p, params)
                                          for p in prompts[:streams]))
            return [o.token_ids for o in outs]

    return asyncio.run(go())


def check_run(proc: subprocess.CompletedProcess, ranks: int, want: list[list[int]]) -> list:
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    assert results == [want]
    mem = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("MEMORY ")]
    assert sorted(m["rank"] for m in mem) == list(range(ranks))
    for m in mem:  # each rank within its own budget's promise
        if m["budget"] is not None:
            bound = m["baseline"] + m["budget"] + m["kv"] + MARGIN_BYTES
            assert m["peak"] <= bound, m
    return mem


def test_split_layers_by_bytes_and_counts():
    # rank 0 carries the embedding and head (fixed): it gets fewer layers
    assert split_layers([10] * 8, 40, 2) == [(0, 2), (2, 8)]
    assert split_layers([10] * 6, 0, 3) == [(0, 2), (2, 4), (4, 6)]
    # every rank past 0 keeps at least one layer, even when rank 0's share is all
    assert split_layers([1, 1, 1], 1000, 3) == [(0, 0), (0, 1), (1, 3)]
    assert split_layers([5] * 4, 0, 2, [1, 3]) == [(0, 1), (1, 4)]
    with pytest.raises(ValueError, match="--pipeline-split"):
        split_layers([5] * 4, 0, 2, [2, 3])
    with pytest.raises(ValueError, match="--pipeline-split"):
        split_layers([5] * 4, 0, 2, [4, 0])
    with pytest.raises(ValueError, match="pipeline ranks"):
        split_layers([5] * 2, 0, 4)


def test_stage_owns_its_units(tmp_path):
    write_tiny_model(tmp_path, "llama_tied", n_layers=4)

    async def go() -> None:
        async with await Engine.open(str(tmp_path)) as engine:
            units = engine.model.units()
            first = StageModel(engine.model, Stage(0, 2, 0, 1)).units()
            second = StageModel(engine.model, Stage(1, 2, 1, 4)).units()
            assert first == [units[0], units[1], units[-1]]  # embed, layer 0, head (tied)
            assert second == units[2:5]

    asyncio.run(go())
    assert layer_of("layers.3.experts.5") == 3 and layer_of("embed") is None


@pytest.mark.parametrize(("variant", "ranks", "split"), [("llama", 2, "none"),
                                                         ("qwen2", 3, "none"),
                                                         ("llama", 3, "0,2,2")])
def test_ranks_match_one_process_tiny(tmp_path, variant, ranks, split):
    """Untied head (llama) and tied (qwen2); rank 0 with no layers of its own (0,2,2); two
    concurrent requests share each pass; a budget of one block makes every rank stream."""
    write_tiny_model(tmp_path, variant, n_layers=4)
    budget = 200_000
    want = one_process(str(tmp_path), 12, budget)
    check_run(launch(ranks, str(tmp_path), "12", str(budget), split), ranks, want)


def overlapped(proc: subprocess.CompletedProcess) -> int:
    return sum(int(line.split()[1]) for line in proc.stdout.splitlines()
               if line.startswith("OVERLAPPED "))


@pytest.mark.parametrize(("variant", "ranks", "budget", "microbatches", "overlap"), [
    ("llama", 2, None, "auto", True),  # all resident: auto micro-batches
    ("qwen2", 3, 200_000, "2", True),  # streaming, micro-batches asked for
    ("llama", 2, 200_000, "auto", False),  # streaming: auto keeps one pass at a time
])
def test_microbatched_streams_match_one_process_tiny(tmp_path, variant, ranks, budget,
                                                     microbatches, overlap):
    """Four concurrent greedy streams, cut into micro-batches kept in flight around the ring,
    each give the tokens one process gives it alone (and batched together); passes did
    overlap where micro-batching is on."""
    write_tiny_model(tmp_path, variant, n_layers=4)
    want = one_process(str(tmp_path), 12, budget, streams=4, alone=True)
    assert one_process(str(tmp_path), 12, budget, streams=4) == want
    proc = launch(ranks, str(tmp_path), "12", str(budget).lower(), "none", "streams=4",
                  f"microbatches={microbatches}" if microbatches != "auto" else "")
    check_run(proc, ranks, want)
    assert (overlapped(proc) > 0) == overlap


@pytest.mark.slow
@pytest.mark.parametrize(("ranks", "budget", "split"), [(2, 40_000_000, "none"),
                                                        (3, 36_000_000, "6,12,12")])
def test_ranks_match_one_process_smollm2(smollm2_gguf, ranks, budget, split):
    want = one_process(smollm2_gguf, 6, 80_000_000)
    mem = check_run(launch(ranks, smollm2_gguf, "6", str(budget), split), ranks, want)
    assert all(m["budget"] == budget for m in mem)


def test_microbatched_speculative_streams_match_one_process(tmp_path):
    """Prompt-lookup drafts in micro-batched passes: the last rank sends back each sequence's
    draft rows too (n_logits), and greedy tokens stay those of plain decoding in one
    process."""
    write_tiny_model(tmp_path, "llama", n_layers=4)
    want = one_process(str(tmp_path), 24, None, streams=4, alone=True)
    proc = launch(2, str(tmp_path), "24", "none", "none", "streams=4", "spec")
    check_run(proc, 2, want)
    assert overlapped(proc) > 0
    assert sum(int(line.split()[1]) for line in proc.stdout.splitlines()
               if line.startswith("DRAFTED ")) > 0


def test_microbatched_stream_cancelled_mid_flight(tmp_path):
    """A stream that leaves while its micro-batch is on the ring: the others still get one
    process's tokens, and so does the next round of all four (the ring stayed in step)."""
    write_tiny_model(tmp_path, "llama", n_layers=4)
    want = one_process(str(tmp_path), 12, None, streams=4, alone=True)
    proc = launch(2, str(tmp_path), "12", "none", "none", "streams=4", "cancel")
    check_run(proc, 2, want)
    kept = [json.loads(line[5:]) for line in proc.stdout.splitlines()
            if line.startswith("KEPT ")]
    assert kept == [want[1:]]


@pytest.mark.slow
def test_microbatched_streams_match_one_process_smollm2(smollm2_gguf):
    """The real model, resident, 4 greedy streams in 2 micro-batches over 2 ranks: each
    stream's tokens are those one process gives it alone. Prompts of 4 tokens: every pass
    stays within the few-row kernels, whose rows have the same bits in any batch (a prefill
    pass of more rows runs float BLAS, and may part from the one-request run at a near tie)."""
    want = one_process(smollm2_gguf, 8, None, streams=4, alone=True, prompts=SHORT)
    proc = launch(2, smollm2_gguf, "8", "none", "none", "streams=4", "microbatches=2", "short")
    check_run(proc, 2, want)
    assert overlapped(proc) > 0


@pytest.mark.parametrize("mlx_launch", [False, True])
def test_killed_rank_ends_the_run(tmp_path, mlx_launch):
    """SIGKILL rank 1 of 3 mid-generation: ranks 0 and 2 each print one line naming
    themselves, and the run ends (the launcher, the ring's lost socket) well within a minute."""
    write_tiny_model(tmp_path, "llama", n_layers=6)
    proc = subprocess.Popen(_launch_cmd(3, HELPER, str(tmp_path), "30", "none", "none",
                                        "forever", mlx_launch=mlx_launch),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim = _rank_process(proc.pid, 1)
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("RESULT ")  # the pipeline runs
        victim.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if not mlx_launch:  # mlx.launch exits 0 whatever its ranks did
        assert proc.returncode == 1
        assert re.search(r"stream-run: pipeline rank \d exited with status -?\d+", err), \
            err[-2000:]
    for rank in (0, 2):
        assert f"stream-run: pipeline rank {rank}:" in err, err[-2000:]


def test_stopped_rank_times_out_inside_a_pass(tmp_path):
    """SIGSTOP rank 1 (its sockets stay open): rank 0's wait inside a pass gives up after the
    link's timeout with one line naming rank 1, and the run ends."""
    write_tiny_model(tmp_path, "llama", n_layers=4)
    proc = subprocess.Popen(_launch_cmd(2, HELPER, str(tmp_path), "30", "none", "none",
                                        "forever", "timeout=3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = None
    try:
        victim = _rank_process(proc.pid, 1)
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("RESULT ")
        victim.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        assert proc.stderr is not None
        for line in proc.stderr:
            if "stream-run: pipeline rank 0: no answer from rank 1 within 3 s" in line:
                break
        else:
            raise AssertionError("no timeout line from rank 0")
        assert time.monotonic() - t0 < 30
    finally:
        if victim is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.send_signal(signal.SIGCONT)  # so the launcher's SIGTERM ends it
        try:
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 1


def test_watchdog_fires_only_when_armed_past_its_deadline():
    fired: list[str] = []
    dog = Watchdog(fired.append)
    dog.arm(0.5, "late")
    dog.disarm()
    time.sleep(0.8)
    assert fired == []  # disarmed in time
    dog.arm(30, "first")
    dog.arm(0.5, "second")  # a nearer deadline wakes the thread
    dog.disarm()
    dog.arm(0.1, "third")
    deadline = time.monotonic() + 10
    while not fired and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fired == ["third"]


def _rank_process(launcher: int, rank: int) -> psutil.Process:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for p in psutil.Process(launcher).children(recursive=True):
            try:
                if p.environ().get("MLX_RANK") == str(rank) and "python" in p.name():
                    return p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} did not start")


def test_dead_peer_ends_an_idle_wait(tmp_path):
    """Ranks started by hand (no launcher to stop the others): rank 2 of 3 dies while rank 1
    waits, without a timeout, for the next pass from rank 0. Rank 1 must not wait for ever:
    the socket to rank 2 wakes its select(), and it ends with one line."""
    write_tiny_model(tmp_path, "llama", n_layers=4)
    hosts = tmp_path / "ring.json"
    port = _free_ports(3)
    hosts.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(3)]))
    procs = [subprocess.Popen([sys.executable, HELPER, str(tmp_path), "4", "none", "none",
                               "idle"], env={**os.environ, "MLX_RANK": str(r),
                                             "MLX_HOSTFILE": str(hosts)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(3)]
    try:
        assert procs[0].stdout is not None
        assert procs[0].stdout.readline().startswith("RESULT ")  # the pipeline ran a request
        procs[2].kill()
        _, err = procs[1].communicate(timeout=60)
        assert procs[1].returncode == 1
        assert "stream-run: pipeline rank 1: lost" in err, err[-2000:]
    finally:
        for p in procs:
            p.kill()
            p.communicate()


def test_unreachable_rank_times_out(tmp_path):
    """A rank whose peers never start stops after --pipeline-timeout with one line."""
    write_tiny_model(tmp_path, "llama")
    hosts = tmp_path / "ring.json"
    port = _free_ports(2)
    hosts.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    env = {**os.environ, RANK_ENV: "1", "MLX_RANK": "1", "MLX_HOSTFILE": str(hosts)}
    proc = subprocess.run([sys.executable, "-m", "stream_run.cli.run", str(tmp_path),
                           "--pipeline", "2", "--pipeline-timeout", "3", "-m", "2"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "pipeline rank 1: could not reach the other ranks within 3 s" in proc.stderr


def test_cli_pipeline_same_output(tmp_path):
    write_tiny_model(tmp_path, "llama", n_layers=4)
    cmd = [sys.executable, "-m", "stream_run.cli.run", str(tmp_path), "-p", "the quick brown",
           "-m", "10", "--ignore-chat-template", "--memory-budget", "200KB"]
    one = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    two = subprocess.run([*cmd, "--pipeline", "2"], capture_output=True, text=True,
                         timeout=240)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout
    assert "pipeline rank 0/2: layers 0..0 + embedding and head" in two.stderr
    assert "Generation: 10 tokens" in two.stderr
    memory = [line for line in two.stderr.splitlines() if "Memory: peak RSS" in line]
    assert len(memory) == 2 and all(" <= " in line for line in memory), two.stderr


@pytest.mark.parametrize(("flags", "message"), [
    (["--pipeline", "1"], "--pipeline must be >= 2"),
    (["--pipeline", "2", "--pipeline-split", "a,b"], "--pipeline-split 'a,b'"),
    (["--hostfile", "/nonexistent/hosts.json"], "--hostfile /nonexistent/hosts.json"),
    (["--pipeline", "2", "--kv-cache-budget", "1MB"], "--kv-cache-budget"),
    (["--pipeline", "2", "--pipeline-microbatches", "0"], "--pipeline-microbatches must be"),
])
def test_bad_pipeline_flags(tmp_path, flags, message):
    write_tiny_model(tmp_path, "llama")
    proc = subprocess.run([sys.executable, "-m", "stream_run.cli.run", str(tmp_path), *flags],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _serve(model: str, port: int, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stream_run.cli.serve", model, "--port",
                             str(port), *flags], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


SERVE_PROMPTS = ["the quick brown", "one two", "a b c d e", "hello"]


def _complete(proc: subprocess.Popen, port: int) -> list[str]:
    """The answers to SERVE_PROMPTS, asked all at once."""
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    assert proc.stderr is not None
    for line in proc.stderr:  # "stream-serve: ready (...)" once the model is open
        if "ready" in line:
            break

    def ask(prompt: str) -> str:
        body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 8,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())["choices"][0]["text"]

    with ThreadPoolExecutor(len(SERVE_PROMPTS)) as pool:
        return list(pool.map(ask, SERVE_PROMPTS))


def test_serve_pipeline_same_answer_and_stops(tmp_path):
    """Four concurrent requests (micro-batched where they overlap: the tiny model is
    resident) get the answers one process gives; SIGTERM ends the launcher and the ranks."""
    model = tmp_path / "m"
    write_tiny_model(model, "llama", n_layers=4)
    answers = []
    for flags in ((), ("--pipeline", "2")):
        port = _free_ports(1)
        proc = _serve(str(model), port, *flags)
        try:
            answers.append(_complete(proc, port))
            launcher = psutil.Process(proc.pid)
            family = [launcher, *launcher.children(recursive=True)]
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            psutil.wait_procs(family, timeout=30)  # the ranks end with the launcher
            assert not [p for p in family if p.is_running() and p.status() != "zombie"]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert answers[0] == answers[1] and all(answers[0])
