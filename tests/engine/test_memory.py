"""Peak RSS under a memory budget: the process's own baseline + budget + KV cache + a fixed
working allowance (README, "Memory"). Each case runs in a fresh process so ru_maxrss is its own.
"""

import json
import os
import subprocess
import sys

import pytest

from stream_run.bench.synth import SynthSpec, synthesize

# Activations, logits, BLAS and numba scratch, allocator slack: the README's fixed allowance.
WORKING_BYTES = 48 * 2**20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A ~220 MB bf16 model (8 blocks of 26 MB) and a tiny one for the warm-up."""
    root = tmp_path_factory.mktemp("rss")
    big, tiny = str(root / "big"), str(root / "tiny")
    synthesize(SynthSpec(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=4096), big)
    synthesize(SynthSpec(), tiny)
    return big, tiny


def probe(big: str, tiny: str, budget: int | None, tokens: int = 6) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.engine.rss_probe", big, tiny, str(budget or "none"),
         str(tokens)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_peak_rss_stays_within_budget_plus_fixed_overhead(models, fraction):
    big, tiny = models
    model_bytes = probe(big, tiny, None, tokens=1)["model_bytes"]
    budget = int(model_bytes * fraction)
    got = probe(big, tiny, budget)
    assert got["cache_peak_bytes"] <= budget
    growth = got["peak_rss_bytes"] - got["base_rss_bytes"]
    assert growth <= budget + got["kv_bytes"] + WORKING_BYTES, got


def test_without_a_budget_the_whole_model_is_resident(models):
    """The measurement can fail: unbudgeted, RSS grows by about the model's size."""
    big, tiny = models
    got = probe(big, tiny, None)
    assert got["peak_rss_bytes"] - got["base_rss_bytes"] >= 0.9 * got["model_bytes"]


def test_peak_rss_is_the_child_own_not_inherited_from_a_large_parent():
    """ru_maxrss survives fork and exec: a probe started by a big pytest process would report
    the parent's size. peak_rss_bytes must report the child's own peak."""
    import numpy as np

    ballast = np.ones(400 * 2**20 // 8)  # this process is now > 400 MB
    proc = subprocess.run(
        [sys.executable, "-c",
         "from stream_run.engine.stats import peak_rss_bytes; print(peak_rss_bytes())"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) < 300 * 2**20
    del ballast
