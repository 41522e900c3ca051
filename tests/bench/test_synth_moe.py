"""stream-bench synth --arch qwen3_moe|mixtral (issue 18): named MoE shapes as HF checkpoints and
as GGUF files laid out as llama.cpp's converter writes them (stacked ffn_*_exps, F32 router),
that the engine runs and HF transformers agrees with; and the skewed router (--router-skew)."""

from __future__ import annotations

import asyncio

import gguf
import numpy as np
import pytest

from stream_run.bench import synth_moe
from stream_run.bench.cli import main as bench_main
from stream_run.bench.synth import SynthSpec, synthesize
from stream_run.bench.synth_gguf import file_bytes, synthesize_gguf
from stream_run.engine import Engine, EngineConfig
from stream_run.models import moe
from tests.hf_reference import hf_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
PROMPT = [5, 17, 42, 99, 3, 250, 7, 11, 64, 128]


def engine_logits(path, ids):
    async def go():
        async with await Engine.open(str(path), EngineConfig(backend="numpy")) as eng:
            return await eng.logits(ids)
    return asyncio.run(go())


def test_named_shapes_have_the_published_sizes():
    big = SynthSpec.from_shape("qwen3-30b-a3b", arch="qwen3_moe")
    assert (big.num_experts, big.num_experts_per_tok, big.moe_intermediate_size,
            big.head_dim, big.num_hidden_layers) == (128, 8, 768, 128, 48)
    assert 17.0e9 < file_bytes(big, "q4_0") < 17.5e9  # the "about 17 GB" at 4 bits
    mix = SynthSpec.from_shape("mixtral-8x7b", arch="mixtral")
    assert (mix.num_experts, mix.num_experts_per_tok, mix.intermediate_size) == (8, 2, 14336)
    with pytest.raises(ValueError, match="--shape qwen3-30b-a3b is a qwen3_moe shape, got "
                                         "--arch mixtral"):
        SynthSpec.from_shape("qwen3-30b-a3b", arch="mixtral")
    with pytest.raises(ValueError, match="--arch qwen3_moe needs an MoE shape"):
        SynthSpec.from_shape("tiny", arch="qwen3_moe")


@pytest.mark.reference
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_hf_synth_runs_in_the_engine_as_in_transformers(tmp_path, arch):
    spec = SynthSpec.from_shape("tiny-moe", arch=arch, dtype="f32", router_skew=1.0)
    synthesize(spec, str(tmp_path / "m"))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "m"), dtype=torch.float32).eval()
    np.testing.assert_allclose(engine_logits(tmp_path / "m", PROMPT), hf_logits(model, PROMPT),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.reference
@pytest.mark.parametrize("arch,quant", [("qwen3_moe", "f32"), ("qwen3_moe", "q8_0"),
                                        ("mixtral", "f16")])
def test_gguf_synth_is_laid_out_as_llama_cpp_and_runs_as_in_transformers(tmp_path, arch, quant):
    """The stacked experts and metadata llama.cpp's qwen3moe / llama loaders read; HF on the
    weights gguf-py dequantizes the file to gives the engine's logits."""
    from tests.loaders.test_gguf_moe import set_weights

    spec = SynthSpec.from_shape("tiny-moe", arch=arch, router_skew=1.0)
    path = tmp_path / "m.gguf"
    synthesize_gguf(spec, quant, str(path))
    r = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    name = "llama" if arch == "mixtral" else "qwen3moe"
    assert meta["general.architecture"] == name
    assert (meta[f"{name}.expert_count"], meta[f"{name}.expert_used_count"]) == (16, 2)
    if arch == "qwen3_moe":
        assert meta["qwen3moe.expert_feed_forward_length"] == 64
        assert meta["qwen3moe.attention.key_length"] == 16
    tensors = {t.name: t for t in r.tensors}
    assert [int(d) for d in tensors["blk.0.ffn_gate_exps.weight"].shape] == [64, 64, 16]
    assert [int(d) for d in tensors["blk.0.ffn_down_exps.weight"].shape] == [64, 64, 16]
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    assert not any(".experts." in n or "ffn_gate.weight" in n for n in tensors)

    held = {}
    for t in r.tensors:
        shape = tuple(reversed([int(d) for d in t.shape]))
        held[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
    cfg = SynthSpec.from_shape("tiny-moe", arch=arch, dtype="f32").config()
    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items()
                                                  if k not in ("architectures",)})
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    set_weights(model, arch, held)
    np.testing.assert_allclose(engine_logits(path, PROMPT), hf_logits(model, PROMPT),
                               rtol=1e-4, atol=1e-4)


def expert_picks(path, n_tokens: int = 96) -> np.ndarray:
    """(layers, experts) counts of the experts the router picks over a prompt of random
    tokens."""
    counts: dict[tuple[int, int], int] = {}
    original = moe.Model._experts

    def record(self, layer_idx, tile_rows, r, units):
        for e in r.idx.reshape(-1).tolist():
            counts[layer_idx, e] = counts.get((layer_idx, e), 0) + 1
        return original(self, layer_idx, tile_rows, r, units)

    ids = np.random.default_rng(0).integers(0, 256, n_tokens).tolist()
    moe.Model._experts = record
    try:
        engine_logits(path, ids)
    finally:
        moe.Model._experts = original
    n_layers, n_exp = 1 + max(k[0] for k in counts), 1 + max(k[1] for k in counts)
    return np.array([[counts.get((i, e), 0) for e in range(n_exp)] for i in range(n_layers)])


def test_router_skew_makes_some_experts_popular(tmp_path):
    shares = {}
    for skew in (0.0, 2.0):
        spec = SynthSpec.from_shape("tiny-moe", arch="qwen3_moe", router_skew=skew)
        synthesize_gguf(spec, "q8_0", str(tmp_path / f"{skew}.gguf"))
        counts = expert_picks(tmp_path / f"{skew}.gguf")
        shares[skew] = synth_moe.popularity(counts)["top10pct_share"]
        if skew:  # the most popular expert of each layer is the one ranked first
            top = [int(np.argmax(np.log(1e-9 + c))) for c in counts]
            first = [int(np.argmax(synth_moe.router_offsets(spec, i)))
                     for i in range(len(counts))]
            assert sum(a == b for a, b in zip(top, first, strict=True)) >= len(counts) - 1
    assert shares[0.0] < 0.2 < 0.3 < shares[2.0], shares


@pytest.mark.parametrize("argv,error", [
    (["--arch", "qwen3_moe", "--shape", "7b"], "--arch qwen3_moe needs an MoE shape"),
    (["--arch", "llama", "--shape", "tiny", "--router-skew", "1"],
     "--experts and --router-skew need --arch qwen3_moe or mixtral"),
    (["--arch", "qwen3_moe", "--shape", "tiny-moe", "--experts", "4"],
     "--experts needs --shape custom"),
    (["--arch", "qwen3_moe", "--shape", "tiny-moe", "--router-skew", "-1"],
     "--router-skew must be in 0..8"),
    (["--arch", "qwen2_moe", "--shape", "tiny-moe"], "--shape tiny-moe is a qwen3_moe/mixtral"),
])
def test_cli_refuses_bad_moe_flags(tmp_path, capsys, argv, error):
    assert bench_main(["synth", *argv, "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stream-bench: error:") and error in err and "\n" not in err


def test_cli_writes_a_custom_moe_gguf(tmp_path):
    out = tmp_path / "m.gguf"
    assert bench_main(["synth", "--arch", "qwen3_moe", "--shape", "custom", "--format", "gguf",
                       "--quant", "q4_0", "--hidden-size", "64", "--intermediate-size", "64",
                       "--layers", "2", "--heads", "4", "--kv-heads", "2", "--vocab", "300",
                       "--experts", "4", "--experts-per-tok", "2", "--expert-size", "32",
                       "--router-skew", "1", "--out", str(out)]) == 0
    logits = engine_logits(out, PROMPT)
    assert logits.shape == (len(PROMPT), 300) and np.isfinite(logits).all()


def test_moe_cache_bench_reports_hit_rates_and_the_formula(tmp_path, capsys):
    from stream_run.bench import moe_cache

    spec = SynthSpec.from_shape("tiny-moe", arch="qwen3_moe", router_skew=1.0)
    synthesize_gguf(spec, "q8_0", str(tmp_path / "m.gguf"))
    assert moe_cache.main([str(tmp_path / "m.gguf"), "--budgets", "50%", "--tokens", "4",
                           "--warmup", "2", "--replay", "8"]) == 0
    out = capsys.readouterr().out
    assert "replay: 64 picks over 8 tokens, 64 experts" in out
    rows = [r for r in map(str.split, out.splitlines()) if len(r) == 11 and r[2] in ("lru", "lfru")]
    assert [r[2] for r in rows] == ["lru", "lfru"]  # budget (value, unit), order, ...
    for r in rows:  # bytes/token measured over predicted from the hit rate
        assert abs(float(r[-2]) - 1.0) < 0.05, r
    assert moe_cache.main([str(tmp_path / "m.gguf"), "--orders", "lru,mru"]) == 2
    assert "--orders: unknown 'mru'" in capsys.readouterr().err
