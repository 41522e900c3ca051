"""stream-bench synth --arch gpt_oss --format gguf (issue 18): llama.cpp's gpt-oss layout with
MXFP4 experts, that the engine runs, and that llama.cpp (llama-cpp-python) runs to the same
greedy tokens: the independent check on the file's metadata."""

from __future__ import annotations

from dataclasses import replace

import gguf
import numpy as np
import pytest

from stream_run.bench.cli import main as bench_main
from stream_run.bench.synth import SynthSpec
from stream_run.bench.synth_gguf import file_bytes, plan, synthesize_gguf
from stream_run.models import gpt_oss, open_model
from tests.model_checks import run_engine

PROMPT = [5, 17, 42, 99, 3, 250, 7, 11, 64, 128]
N_NEW = 6
SPEC = SynthSpec.from_shape("tiny-moe", arch="gpt_oss")  # 4 layers, 16 experts of 64, top 2


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("goss") / "m.gguf")
    synthesize_gguf(SPEC, "q8_0", path)
    return path


def test_layout_and_metadata_are_llama_cpp_gpt_oss(q8_file):
    r = gguf.GGUFReader(q8_file)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert meta["general.architecture"] == "gpt-oss"
    want = {"gpt-oss.expert_count": 16, "gpt-oss.expert_used_count": 2,
            "gpt-oss.expert_feed_forward_length": 64, "gpt-oss.attention.sliding_window": 128,
            "gpt-oss.attention.key_length": 16, "gpt-oss.rope.scaling.type": "yarn",
            "gpt-oss.rope.scaling.original_context_length": 4096}
    assert {k: meta[k] for k in want} == want
    assert meta["gpt-oss.rope.freq_base"] == 150000.0
    assert meta["gpt-oss.rope.scaling.factor"] == 32.0
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types == {t.name: t.qtype.name for t in plan(SPEC, "q8_0")}
    for i in range(SPEC.num_hidden_layers):
        for p in ("gate", "up", "down"):
            assert types[f"blk.{i}.ffn_{p}_exps.weight"] == "MXFP4"
            assert types[f"blk.{i}.ffn_{p}_exps.bias"] == "F32"
        assert types[f"blk.{i}.attn_q.weight"] == "Q8_0"
        assert types[f"blk.{i}.attn_sinks.weight"] == "F32"
        assert types[f"blk.{i}.ffn_gate_inp.weight"] == "F32"
    assert not any("ffn_gate_up" in n or "ffn_norm" in n for n in types)
    shapes = {t.name: [int(d) for d in t.shape] for t in r.tensors}
    assert shapes["blk.0.ffn_gate_exps.weight"] == [64, 64, 16]  # ggml order: cols, rows, E
    assert shapes["blk.0.ffn_gate_exps.bias"] == [64, 16]
    # the engine's loader takes every tensor it requires from the file, each expert a byte
    # range of the stacked MXFP4 tensors
    index = open_model(q8_file).index
    unit = index.units[gpt_oss.expert_key(1, 5)]
    assert sorted(unit.tensors) == ["down_proj", "down_proj_bias", "gate_proj",
                                    "gate_proj_bias", "up_proj", "up_proj_bias"]
    assert unit.tensors["gate_proj"].dtype == "MXFP4"
    assert unit.tensors["gate_proj"].nbytes == 64 * 64 // 32 * 17


def test_mxfp4_blocks_have_the_planned_std(q8_file):
    r = gguf.GGUFReader(q8_file)
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_down_exps.weight")
    vals = gguf.quants.dequantize(t.data, t.tensor_type)
    assert 0.125 / 1.5 < vals.std() < 0.125 * 1.5  # 1/sqrt(64), to within a power of two


def test_20b_shape_is_the_size_of_llama_cpp_s_file():
    big = SynthSpec.from_shape("gpt-oss-20b", arch="gpt_oss")
    assert 12.0e9 < file_bytes(big, "q8_0") < 12.2e9  # ggml-org/gpt-oss-20b-GGUF: 12.1 GB


def test_bad_flags_are_named(tmp_path, capsys):
    out = str(tmp_path / "x.gguf")
    assert bench_main(["synth", "--arch", "gpt_oss", "--shape", "tiny-moe", "--format", "gguf",
                       "--quant", "q8_0", "--router-skew", "1", "--out", out]) == 2
    assert "--router-skew is not supported for --arch gpt_oss" in capsys.readouterr().err
    spec = SynthSpec(arch="gpt_oss", hidden_size=64, intermediate_size=48, num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=48, vocab_size=320)
    with pytest.raises(ValueError, match="--expert-size must be multiples of 32, got 64 and 48"):
        plan(spec, "q8_0")


def test_engine_decodes_it(q8_file):
    logits, tokens, _, _ = run_engine(q8_file, PROMPT, N_NEW)
    assert np.isfinite(logits).all() and len(tokens) == N_NEW
    assert len(set(np.argmax(logits, -1).tolist())) > 3  # not a constant output


def llama_cpp_run(path: str, ids: list[int], n_new: int) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits of ids, and its greedy continuation of PROMPT (its logits' argmax)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(path, n_ctx=128, logits_all=True, verbose=False, n_threads=1,
                          n_threads_batch=1)
    llm.eval(ids)
    logits = np.array(llm.scores[:len(ids)])
    llm.reset()
    llm.eval(PROMPT)
    out: list[int] = []
    for _ in range(n_new):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return logits, out


# llama.cpp computes the MXFP4 experts (and the Q8_0 matrices) on Q8_0-quantized activations,
# the engine in float32: logits differ by ~0.05 on this shape (std 1). A top-1 whose margin
# over the runner-up is below TIE can go either way (a random model's logits are flat), and so
# can a router whose k-th and (k+1)-th expert logits are within ROUTER_TIE: that token then
# runs another expert in llama.cpp, and every later position attends to it. The comparison
# stops at the first such token (the engine's router logits, recorded while it runs).
TIE = 0.1
ROUTER_TIE = 0.01


def engine_run(path: str, ids: list[int], monkeypatch) -> tuple[np.ndarray, list[int], int]:
    """(the engine's logits of ids, its greedy tokens after PROMPT, the first position of ids
    at which a layer's router is within ROUTER_TIE of another pick)."""
    margins: list[np.ndarray] = []
    route = gpt_oss.Model._router

    def recorded(self, w, y):
        out = route(self, w, y)
        h = self.ops.rms_norm(y, w["post_attention_layernorm.weight"], self.spec.rms_norm_eps)
        lg = self.ops.to_numpy(self.ops.linear(h, w["mlp.router.weight"],
                                               w["mlp.router.bias"]))[0]
        s = -np.sort(-lg, axis=-1)
        margins.append(s[:, self.moe.top_k - 1] - s[:, self.moe.top_k])
        return out

    monkeypatch.setattr(gpt_oss.Model, "_router", recorded)
    logits, tokens, _, _ = run_engine(path, ids, 0)
    n = len(ids)
    first = np.stack(margins[:SPEC.num_hidden_layers])[:, :n].min(0)  # logits(ids * 3)'s pass
    ties = np.nonzero(first < ROUTER_TIE)[0]
    _, greedy, _, _ = run_engine(path, PROMPT, N_NEW)
    return logits[:n], greedy, int(ties[0]) if len(ties) else n


@pytest.mark.reference
# (f32 with seeds 0 and 1: router ties at positions 4 and 7, too early to compare greedy steps)
@pytest.mark.parametrize("quant,seed", [("q8_0", 0), ("f32", 2)])
def test_llama_cpp_runs_the_file_to_the_engine_s_tokens(tmp_path, quant, seed, monkeypatch):
    """llama.cpp on the same file, fed the prompt, the engine's greedy continuation and the
    prompt again: up to the first router near-tie, the same top-1 wherever the engine's is not
    a near-tie and logits within 0.1; its own greedy tokens agree with the engine's as far."""
    path = str(tmp_path / f"{quant}.gguf")
    synthesize_gguf(replace(SPEC, seed=seed), quant, path)
    _, tokens, _, _ = run_engine(path, PROMPT, N_NEW)
    ids = PROMPT + tokens + PROMPT
    logits, greedy, stop = engine_run(path, ids, monkeypatch)
    assert greedy == tokens
    assert stop > len(PROMPT), stop  # the prompt and a greedy step at least are compared
    want, want_tokens = llama_cpp_run(path, ids, N_NEW)
    logits, want = logits[:stop], want[:stop]
    top2 = np.sort(logits, -1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > TIE
    assert decisive.sum() >= stop // 2, decisive
    np.testing.assert_array_equal(np.argmax(want, -1)[decisive],
                                  np.argmax(logits, -1)[decisive])
    np.testing.assert_allclose(want, logits, atol=0.1, rtol=0)
    steps = decisive[len(PROMPT) - 1:stop - 1]  # the greedy steps before the router tie
    agree = len(steps) if steps.all() else int(np.argmin(steps))
    assert agree >= 1 and want_tokens[:agree] == tokens[:agree], (agree, want_tokens, tokens)
