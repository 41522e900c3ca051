"""The memory budget is a promise (DESIGN.md): peak RSS <= baseline + budget + KV cache + 64 MiB.

Checked the hard way: stream-run runs in a fresh memory cgroup whose limit is exactly that sum,
on an f16 HF model and a Q4_0 GGUF, at budgets of 25 % and 50 % of the model, with buffered
and with O_DIRECT reads, and once with a prompt long enough that a prefill chunk's activations
(~70 MB here) exceed the margin. It must exit 0 without an OOM kill, and its own peak RSS
(VmHWM, the "Memory:" line) must be within the sum. The baseline is the child's RSS once the
engine has opened (imports, tokenizer, kernels loaded by a warm-up on tiny weights), before any
weight is read; a short run of each model without a limit measures it for the limits. The KV
cache is float32 for prompt + generated tokens (a token is at least a byte of the prompt with
the synthetic byte-level tokenizer). Needs root and a writable memory cgroup (v1, or v2 with
the memory controller delegated to the root's children); skipped otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from stream_run.bench.synth import SynthSpec, synthesize
from stream_run.bench.synth_gguf import synthesize_gguf
from stream_run.engine.config import MARGIN_BYTES

STREAM_RUN = shutil.which("stream-run", path=os.path.dirname(sys.executable))
PROMPT = "The budget is a promise."
LONG_PROMPT = " ".join(["weights stream from disk through a budget"] * 16)  # 671 bytes
MAX_TOKENS = 4
# 1024 wide, 4096 MLP, 8192 vocab: f16 10 blocks = 335 MB; Q4_0 20 blocks = 181 MB
SHAPE = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=8192)
LAYERS = {"f16": 10, "q4_0": 20}
MEMORY_LINE = re.compile(
    r"Memory: peak RSS (?P<peak>[\d.]+) MB (<=|>) (?P<bound>[\d.]+) MB = baseline "
    r"(?P<baseline>[\d.]+) MB \+ budget (?P<budget>[\d.]+) MB \+ KV cache (?P<kv>[\d.]+) MB")


class Cgroup:
    """A fresh memory cgroup (v1 or v2) with a limit, removed on close."""

    def __init__(self, parent: Path, v2: bool, limit: int | None) -> None:
        self.v2 = v2
        self.path = parent / f"stream-run-test-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        if limit is not None:
            if v2:
                (self.path / "memory.max").write_text(str(limit))
                if (self.path / "memory.swap.max").exists():
                    (self.path / "memory.swap.max").write_text("0")
            else:
                (self.path / "memory.limit_in_bytes").write_text(str(limit))
                if (self.path / "memory.swappiness").exists():
                    (self.path / "memory.swappiness").write_text("0")

    def oom_kills(self) -> int:
        name = "memory.events" if self.v2 else "memory.oom_control"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def failcnt(self) -> int | None:
        """Times usage hit the limit (v1; reclaiming page cache counts too)."""
        f = self.path / "memory.failcnt"
        return None if self.v2 else int(f.read_text())

    def close(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def cgroup_parent() -> tuple[Path, bool] | str:
    """Where a test cgroup can be made: (dir, is_v2), or why not."""
    if sys.platform != "linux":
        return "memory cgroups are Linux only"
    if os.geteuid() != 0:
        return "making a memory cgroup needs root"
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError as exc:
        return f"/proc/self/cgroup: {exc}"
    root = Path("/sys/fs/cgroup")
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            parent = root / "memory" / path.lstrip("/")
            if os.access(parent, os.W_OK) and (parent / "memory.limit_in_bytes").exists():
                return parent, False
    subtree = root / "cgroup.subtree_control"
    if subtree.exists() and "memory" in subtree.read_text().split() and os.access(root,
                                                                                   os.W_OK):
        return root, True
    return "no writable memory cgroup (v1 memory controller or v2 root with memory delegated)"


PARENT = cgroup_parent()
pytestmark = pytest.mark.skipif(isinstance(PARENT, str) or STREAM_RUN is None,
                                reason=PARENT if isinstance(PARENT, str)
                                else "stream-run is not installed beside this python")


@dataclass
class Run:
    peak: int
    baseline: int
    budget: int
    kv: int
    oom_kills: int
    failcnt: int | None
    stderr: str

    @property
    def bound(self) -> int:
        return self.baseline + self.budget + self.kv + MARGIN_BYTES


def kv_bytes(name: str, prompt: str, extra_tokens: int = 2) -> int:
    """The KV cache of a run, at most: float32 keys and values for every position."""
    per_token = 2 * LAYERS[name] * SHAPE["num_key_value_heads"] * 4 * (
        SHAPE["hidden_size"] // SHAPE["num_attention_heads"])
    return per_token * (len(prompt.encode()) + extra_tokens + MAX_TOKENS)


def run_in_cgroup(model: str, budget: int | str, limit: int | None, direct: bool = False,
                  prompt: str = PROMPT) -> Run:
    """stream-run in a fresh cgroup: a shell writes its pid into cgroup.procs, then execs."""
    assert not isinstance(PARENT, str)
    parent, v2 = PARENT
    group = Cgroup(parent, v2, limit)
    try:
        cmd = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group.path),
               STREAM_RUN, model, "-p", prompt, "-m", str(MAX_TOKENS), "--ignore-chat-template",
               "--memory-budget", str(budget), *(["--direct-io"] if direct else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        kills, failcnt = group.oom_kills(), group.failcnt()
    finally:
        group.close()
    assert kills == 0 and proc.returncode == 0, (
        f"exit {proc.returncode}, {kills} OOM kills in a {limit} byte cgroup: "
        f"{proc.stderr[-2000:]}")
    m = MEMORY_LINE.search(proc.stderr)
    assert m, proc.stderr[-2000:]
    mb = {k: round(float(v) * 1e6) for k, v in m.groupdict().items()}
    return Run(mb["peak"], mb["baseline"], mb["budget"], mb["kv"], kills, failcnt, proc.stderr)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[str, int]]:
    """{name: (path, weight bytes on disk)}, written once."""
    root = tmp_path_factory.mktemp("promise")
    f16, q4 = root / "f16", root / "q4_0.gguf"
    synthesize(SynthSpec(num_hidden_layers=LAYERS["f16"], dtype="f16", **SHAPE), str(f16))
    synthesize_gguf(SynthSpec(num_hidden_layers=LAYERS["q4_0"], **SHAPE), "q4_0", str(q4))
    f16_bytes = sum(p.stat().st_size for p in f16.glob("*.safetensors"))
    return {"f16": (str(f16), f16_bytes), "q4_0": (str(q4), q4.stat().st_size)}


@pytest.fixture(scope="module")
def baselines(models) -> dict[str, int]:
    """Each model's baseline, from a run without a limit."""
    return {name: run_in_cgroup(path, size // 2, None).baseline
            for name, (path, size) in models.items()}


def check(models, baselines, name: str, fraction: float, direct: bool, prompt: str,
          label: str) -> None:
    path, size = models[name]
    budget = int(size * fraction)
    limit = baselines[name] + budget + kv_bytes(name, prompt) + MARGIN_BYTES
    got = run_in_cgroup(path, budget, limit, direct, prompt)
    figures = (f"{label}: baseline {got.baseline / 1e6:.1f} MB, budget {budget / 1e6:.1f} MB, "
               f"KV {got.kv / 1e6:.1f} MB, peak {got.peak / 1e6:.1f} MB, bound "
               f"{got.bound / 1e6:.1f} MB, cgroup limit {limit / 1e6:.1f} MB, failcnt "
               f"{got.failcnt}")
    print(figures)
    assert got.budget == pytest.approx(budget, abs=1e5)
    assert got.kv <= kv_bytes(name, prompt) + 1e5
    assert got.peak <= got.bound, figures
    assert f"Generation: {MAX_TOKENS} tokens" in got.stderr, got.stderr[-2000:]


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
@pytest.mark.parametrize("fraction", [0.25, 0.5])
@pytest.mark.parametrize("name", ["f16", "q4_0"])
def test_peak_rss_within_baseline_budget_kv_and_margin_inside_that_cgroup_limit(
        models, baselines, name, fraction, direct):
    check(models, baselines, name, fraction, direct, PROMPT,
          f"{name} {fraction:.0%} {'direct' if direct else 'buffered'}")


def test_a_long_prefill_chunk_keeps_the_promise(models, baselines):
    """A 512-row prefill chunk's activations (~70 MB here, heads x rows x keys of attention
    scores, 3 x rows x 4096 of MLP) exceed the margin: the pass reserves them in the budget."""
    check(models, baselines, "f16", 0.5, False, LONG_PROMPT, "f16 50% buffered, long prompt")


def test_auto_budget_fits_the_cgroup_it_runs_in(models, baselines):
    """--memory-budget auto inside a limit of about half the model beyond the baseline: it
    picks less than the model (so it streams), and runs within the limit and its promise."""
    from stream_run.engine.config import RESERVE_MIN

    path, size = models["f16"]
    limit = (baselines["f16"] + size // 2 + kv_bytes("f16", PROMPT, 256) + MARGIN_BYTES
             + RESERVE_MIN)
    got = run_in_cgroup(path, "auto", limit)
    print(f"f16 auto: cgroup limit {limit / 1e6:.1f} MB, picked {got.budget / 1e6:.1f} MB, "
          f"peak {got.peak / 1e6:.1f} MB, bound {got.bound / 1e6:.1f} MB")
    assert "stream-run: memory budget auto: " in got.stderr and "cgroup limit" in got.stderr
    assert 0.25 * size < got.budget < size
    assert got.peak <= got.bound
