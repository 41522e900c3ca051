"""llama.cpp (through llama-cpp-python, when installed) timed the way bench.decode times the
engine, so `stream-bench tokens --backends numpy,llama.cpp` puts both in one table, same run.

ppN: one eval of N random ids from an empty context; tgN: one prompt token, then N single-token
evals. Like llama-bench, no sampling: the engine's tg also includes its (greedy) sampling.
llama-cpp-python compiles llama.cpp when it installs; on this project's VMs build it with AMX
off (the CPU lists AMX but the instructions fault), e.g.
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF".
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from stream_run.bench.decode import BackendResult, Trial
from stream_run.bench.env import load_average

NAME = "llama.cpp"


def available() -> bool:
    """Whether llama-cpp-python is installed (found, not imported: see bench_llama_cpp)."""
    return importlib.util.find_spec("llama_cpp") is not None


def check(model: str) -> None:
    """Raises ValueError (one line) when llama.cpp cannot run this model here."""
    if not available():
        raise ValueError("--backends llama.cpp needs llama-cpp-python (pip install "
                         "llama-cpp-python; see bench/llamacpp.py for the build flags)")
    if not (os.path.isfile(model) and model.endswith(".gguf")):
        raise ValueError(f"--backends llama.cpp needs a .gguf model file, got {model!r}")


def bench_llama_cpp(model: str, tests: Sequence[tuple[str, int]], reps: int, threads: int,
                    seed: int = 0, on_trial: Callable[[Trial], None] | None = None
                    ) -> BackendResult:
    """Warm up once per test, then `reps` timed runs; tests as for bench.decode.bench_model.

    Runs in a child process: loading llama.cpp's libraries into the engine's process changed
    how the engine's OpenMP threads wait (its prefill fell from ~450 to ~55 tok/s there). The
    child does not inherit the OMP_WAIT_POLICY=passive that kernels/numba_kernels.py sets for
    the engine: with it, llama.cpp decoded at ~45 tok/s instead of ~160.
    """
    check(model)
    cmd = [sys.executable, "-m", "stream_run.bench.llamacpp", model, "--reps", str(reps),
           "--threads", str(threads), "--seed", str(seed),
           "--tests", ",".join(f"{k}{n}" for k, n in tests)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"llama.cpp run failed: {last}")
    result = BackendResult(NAME, os.path.getsize(model))
    for line in proc.stdout.splitlines():
        d = json.loads(line)
        d.pop("kind")
        trial = Trial(**d)
        result.trials.append(trial)
        if on_trial is not None:
            on_trial(trial)
    return result


def _measure(model: str, tests: Sequence[tuple[str, int]], reps: int, threads: int,
             seed: int) -> None:
    """The child's side: print one JSON line per timed trial."""
    import llama_cpp

    n_ctx = max([n + 8 for _, n in tests] + [64])
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        llm = llama_cpp.Llama(model, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                              n_batch=512, verbose=False)
    rng = np.random.default_rng(seed)
    vocab = llm.n_vocab()
    for kind, n in tests:
        if n <= 0:
            continue
        for rep in range(-1, reps):  # rep -1: the warm-up
            seconds = _run(llm, kind, n, rng, vocab)
            if rep >= 0:
                trial = Trial(NAME, f"{kind}{n}", n, seconds, n / seconds, 0, 0.0, 0, rep,
                              load_average())
                print(json.dumps(trial.to_dict()), flush=True)


def _run(llm, kind: str, n: int, rng: np.random.Generator, vocab: int) -> float:
    llm.reset()
    if kind == "pp":
        ids = rng.integers(0, vocab, n).tolist()
        t0 = time.perf_counter()
        llm.eval(ids)
        return time.perf_counter() - t0
    llm.eval([int(rng.integers(0, vocab))])
    ids = rng.integers(0, vocab, n).tolist()
    t0 = time.perf_counter()
    for token in ids:
        llm.eval([token])
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream_run.bench.llamacpp")
    p.add_argument("model")
    p.add_argument("--tests", required=True, help="e.g. pp100,tg128")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tests = [(t[:2], int(t[2:])) for t in args.tests.split(",")]
    _measure(args.model, tests, args.reps, args.threads, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
