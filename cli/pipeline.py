"""--pipeline N / --hostfile F: the command starts its ranks (N local ones itself; one per host
of F with mlx.launch), and each rank opens its stage of the model (engine/pipeline.py). Rank 0
does what one process does; ranks past 0 serve passes until rank 0 closes, then print one line
of their own memory.

A rank that loses a peer, or that the launcher stops because another rank failed, prints one
line naming itself and exits (no hang)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import sys
from typing import Any

from stream_run.cli.common import UsageError, memory_line
from stream_run.engine.config import format_size
from stream_run.engine.stats import peak_rss_bytes

RANK_ENV = "STREAM_RUN_PIPELINE"  # set in each rank's environment by launch()
FAILED_WARNINGS = (b"exited with code", b"was killed")
LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"


def add_pipeline_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipeline", type=int, default=None, metavar="N",
                   help="split the model's layers over N ranks on this machine (mx.distributed "
                   "ring backend on 127.0.0.1); each streams its layers under its own "
                   "--memory-budget; hidden states pass rank to rank")
    p.add_argument("--hostfile", default=None, metavar="FILE",
                   help="spread the pipeline's ranks over the hosts of FILE (mlx.launch's "
                   "JSON hostfile, one rank per host; the ring backend needs their ips)")
    p.add_argument("--pipeline-split", default=None, metavar="A,B,...",
                   help="layers per rank, in order (default: split by bytes, rank 0 also "
                   "holding the embedding and the head)")
    p.add_argument("--pipeline-timeout", type=float, default=600.0, metavar="S",
                   help="how long a rank waits for a peer inside a pass before it stops the "
                   "run (default 600)")
    p.add_argument("--pipeline-microbatches", type=int, default=None, metavar="K",
                   help="concurrent requests: keep up to K passes in flight around the ring, "
                   "each over part of the running requests, so the ranks work at once; a "
                   "streamed layer is then read once per pass (default: one per rank while "
                   "rank 0's layers are all resident, else 1)")


def wanted(args: argparse.Namespace) -> bool:
    return args.pipeline is not None or args.hostfile is not None


def in_rank() -> bool:
    return os.environ.get(RANK_ENV) == "1" and "MLX_RANK" in os.environ


def check_flags(args: argparse.Namespace) -> None:
    """Raises UsageError naming the flag."""
    if args.pipeline is not None and args.pipeline < 2:
        raise UsageError(f"--pipeline must be >= 2, got {args.pipeline}")
    if args.hostfile is not None:
        hosts = _hostfile_hosts(args.hostfile)
        if args.pipeline is not None and args.pipeline != hosts:
            raise UsageError(f"--pipeline {args.pipeline} but --hostfile {args.hostfile} has "
                             f"{hosts} hosts")
    if args.pipeline_timeout <= 0:
        raise UsageError(f"--pipeline-timeout must be > 0, got {args.pipeline_timeout}")
    if args.pipeline_microbatches is not None and args.pipeline_microbatches < 1:
        raise UsageError(f"--pipeline-microbatches must be >= 1, got "
                         f"{args.pipeline_microbatches}")
    split_counts(args)
    if getattr(args, "kv_cache_budget", "0") not in ("0", None) or \
            getattr(args, "prompt_cache_file", None):
        raise UsageError("--pipeline: --kv-cache-budget and --prompt-cache-file are not "
                         "supported with a pipeline (each rank holds its own layers' KV)")


def _hostfile_hosts(path: str) -> int:
    try:
        with open(path) as f:
            hosts = json.load(f)
        if not isinstance(hosts, list) or not hosts:
            raise ValueError("not a non-empty JSON list of hosts")
        if any(not isinstance(h, dict) or not h.get("ips") for h in hosts):
            raise ValueError('each host needs "ips" (the ring backend connects to them)')
    except (OSError, ValueError) as exc:
        raise UsageError(f"--hostfile {path}: {exc}") from None
    return len(hosts)


def split_counts(args: argparse.Namespace) -> list[int] | None:
    if args.pipeline_split is None:
        return None
    try:
        return [int(v) for v in args.pipeline_split.split(",")]
    except ValueError:
        raise UsageError(f"--pipeline-split {args.pipeline_split!r}: give layer counts per "
                         "rank, comma-separated (e.g. 10,14)") from None


def launch(args: argparse.Namespace, module: str, argv: list[str]) -> int:
    """Run `python -m module argv` as the pipeline's ranks; their exit status. --hostfile:
    under mlx.launch (ssh to each host). --pipeline N alone: N local ranks started here
    (launch_local), as mlx.launch would start them, without its output-forwarding loop, which
    spins a core (select on its ranks' always-writable stdin) that the ranks need."""
    if args.hostfile is None:
        return launch_local(args.pipeline, [sys.executable, "-m", module, *argv])
    return launch_mlx(args, module, argv)


def launch_local(ranks: int, command: list[str], poll_s: float = 0.2) -> int:
    """Start `command` as ranks 0..ranks-1 on 127.0.0.1 (MLX_RANK, and MLX_HOSTFILE naming a
    ring of free ports); when one exits with an error, SIGTERM the others (each prints its
    line); Ctrl-C or SIGTERM here stops them all. Returns 0, or the first failure's status."""
    import subprocess
    import tempfile
    import time

    port = _free_ports(ranks)
    fd, hostfile = tempfile.mkstemp(prefix="stream-run-ring-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump([[f"127.0.0.1:{port + i}"] for i in range(ranks)], f)
    got: list[int] = []
    procs: list[subprocess.Popen] = []

    def stop_all(signum: int = signal.SIGTERM, frame: Any = None) -> None:
        if frame is not None or signum != signal.SIGTERM:
            got.append(signum)
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        for rank in range(ranks):
            env = {**os.environ, RANK_ENV: "1", "MLX_RANK": str(rank),
                   "MLX_HOSTFILE": hostfile}
            procs.append(subprocess.Popen(command, env=env,
                                          stdin=None if rank == 0 else subprocess.DEVNULL))
        while not status:
            running = [p.poll() is None for p in procs]
            failed = [(r, p.returncode) for r, p in enumerate(procs)
                      if p.returncode not in (None, 0)]
            if failed:
                rank, rc = failed[0]
                status = 1
                print(f"stream-run: pipeline rank {rank} exited with status {rc}"
                      + ("; stopping the others" if any(running) else ""), file=sys.stderr,
                      flush=True)
                stop_all()
            elif not any(running):
                break
            time.sleep(poll_s)
    finally:
        stop_all()
        for p in procs:
            p.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.unlink(hostfile)
    return 128 + got[0] if got else status


def launch_mlx(args: argparse.Namespace, module: str, argv: list[str]) -> int:
    """The ranks under mlx.launch (ring backend, --hostfile); mlx.launch ends every rank when
    one exits with an error."""
    import subprocess

    cmd = [sys.executable, "-c", LAUNCH, "--backend", "ring"]
    if args.hostfile is not None:
        cmd += ["--hostfile", args.hostfile]
    else:
        cmd += ["-n", str(args.pipeline)]
    cmd += ["--starting-port", str(_free_ports(args.pipeline or 2)),
            "--env", f"{RANK_ENV}=1"]
    if os.environ.get("PYTHONPATH"):
        cmd += ["--env", f"PYTHONPATH={os.environ['PYTHONPATH']}"]
    cmd += ["--", sys.executable, "-m", module, *argv]
    failed = False
    got: list[int] = []
    # its own session: Ctrl-C or SIGTERM here stops mlx.launch and the local ranks together
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, start_new_session=True)

    def stop(signum: int, frame: Any) -> None:
        got.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    assert proc.stderr is not None
    for line in proc.stderr:  # mlx.launch exits 0 whatever its ranks did: its warnings
        failed = failed or any(w in line for w in FAILED_WARNINGS)
        sys.stderr.buffer.write(line)
        sys.stderr.flush()
    proc.wait()
    if got:
        return 128 + got[0]
    return proc.returncode or (1 if failed else 0)


def _free_ports(n: int) -> int:
    """A first port p with p..p+n-1 free on 127.0.0.1 (the ring's listening ports)."""
    for _ in range(50):
        base = random.randrange(20000, 60000)
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    return 45000


def on_sigterm(rank: int) -> None:
    """mlx.launch stops the other ranks with SIGTERM when one fails: say so in one line and
    exit at once (a rank blocked in a receive would not unwind)."""

    def handler(signum: int, frame: Any) -> None:
        print(f"stream-run: pipeline rank {rank}: stopped (another rank failed or the run "
              "was interrupted)", file=sys.stderr, flush=True)
        os._exit(143)

    signal.signal(signal.SIGTERM, handler)


async def open_rank(args: argparse.Namespace, model: str, config: Any) -> Any:
    """This rank's PipelineEngine (group joined within --pipeline-timeout)."""
    from stream_run.engine.pipeline import Link, PipelineEngine, init_group

    rank = int(os.environ["MLX_RANK"])
    on_sigterm(rank)
    link = Link(init_group(args.pipeline_timeout), args.pipeline_timeout)
    try:
        engine = await PipelineEngine.open_stage(model, config, link, split_counts(args),
                                                 args.pipeline_microbatches)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.verbose or rank == 0:
        print(f"stream-run: pipeline {engine.stage.describe}; split "
              f"{[b - a for a, b in engine.stage_ranges]} layers per rank", file=sys.stderr,
              flush=True)
    return engine


async def serve_rank(engine: Any) -> int:
    """Ranks past 0: serve passes until rank 0 closes, then one memory line."""
    try:
        await engine.serve()
        budget = engine.cache.compute.budget_bytes
        stage = engine.stage
        kv = engine.runner.kv_bytes(engine.served_positions) * (stage.stop - stage.start) \
            // max(1, engine.spec.num_hidden_layers)  # this rank's layers' share
        print(f"[rank {stage.rank}] layers {stage.start}..{stage.stop - 1}, read "
              f"{format_size(engine.served_bytes_read)}: " + memory_line(
                  peak_rss_bytes(), engine.runner.baseline_rss_bytes, budget, kv),
              file=sys.stderr, flush=True)
    finally:
        engine.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """python -m stream_run.cli.pipeline N COMMAND...: COMMAND as N local ranks (launch_local)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or not args[0].isdigit():
        print("usage: python -m stream_run.cli.pipeline N COMMAND...", file=sys.stderr)
        return 2
    return launch_local(int(args[0]), args[1:])


if __name__ == "__main__":
    sys.exit(main())
