"""stream-bench synth --format gguf: synthetic GGUF files as llama.cpp writes them, that the
engine opens (and runs, for the types it computes), reproducible by seed."""

from __future__ import annotations

import asyncio

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from stream_run.bench import llamacpp, synth_quant
from stream_run.bench.cli import main as bench_main
from stream_run.bench.synth import SynthSpec, make_tokenizer, synthesize
from stream_run.bench.synth_gguf import plan, synthesize_gguf
from stream_run.bench.synth_quant import QUANTS, BlockPool, Q, tensor_type, use_more_bits
from stream_run.engine import Engine, EngineConfig, GenerationParams
from stream_run.models import open_model

# rows of 256 (K blocks fit), 8 layers (use_more_bits picks 0, 3, 6 and 7), GQA
SPEC = SynthSpec(hidden_size=256, intermediate_size=256, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
MORE_BITS = [0, 3, 6, 7]


def write(tmp_path, quant: str, spec: SynthSpec = SPEC, name: str = "m") -> str:
    path = str(tmp_path / f"{name}-{quant}.gguf")
    synthesize_gguf(spec, quant, path)
    return path


def types_of(path: str) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_metadata_is_complete_and_consistent(tmp_path):
    path = write(tmp_path, "q4_k_m")
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert meta["general.architecture"] == "llama" and meta["general.alignment"] == 32
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert meta["general.name"] and meta["general.quantization_version"] == 2
    want = {"context_length": 4096, "embedding_length": 256, "block_count": 8,
            "feed_forward_length": 256, "attention.head_count": 4,
            "attention.head_count_kv": 2, "rope.dimension_count": 64, "vocab_size": 300}
    for key, val in want.items():
        assert meta[f"llama.{key}"] == val, key
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert meta["llama.rope.freq_base"] == 10000.0
    # the HF synth's tokenizer, padded to the embedding's rows
    tok = make_tokenizer()
    tokens = meta["tokenizer.ggml.tokens"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(tokens) == 300
    assert tokens[:258] == sorted(tok.get_vocab(True), key=tok.get_vocab(True).get)
    assert tokens[256:258] == ["<s>", "</s>"] and tokens[299] == "[PAD299]"
    types = meta["tokenizer.ggml.token_type"]
    assert types[0] == 1 and types[256:258] == [3, 3] and set(types[258:]) == {5}
    assert meta["tokenizer.ggml.merges"] == []
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (256, 257)
    embd = next(t for t in r.tensors if t.name == "token_embd.weight")
    assert [int(d) for d in embd.shape] == [256, 300]  # ne order: (hidden, vocab)


@pytest.mark.parametrize("quant", ["q4_k_m", "q5_k_m"])
def test_k_m_mix_follows_llama_cpp(tmp_path, quant):
    base = QUANTS[quant][0].name
    types = types_of(write(tmp_path, quant))
    assert types["token_embd.weight"] == base and types["output.weight"] == "Q6_K"
    for i in range(8):
        more = "Q6_K" if i in MORE_BITS else base
        assert types[f"blk.{i}.attn_v.weight"] == more
        assert types[f"blk.{i}.ffn_down.weight"] == more
        for name in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert types[f"blk.{i}.{name}.weight"] == base
        assert types[f"blk.{i}.attn_norm.weight"] == types[f"blk.{i}.ffn_norm.weight"] == "F32"
    assert [i for i in range(32) if use_more_bits(i, 32)] == [
        0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


@pytest.mark.parametrize("quant,output", [("q4_0", "Q4_0"), ("q8_0", "Q8_0"), ("q6_k", "Q6_K"),
                                          ("q2_k", "Q6_K"), ("bf16", "BF16"), ("f32", "F32")])
def test_pure_mixes(tmp_path, quant, output):
    types = types_of(write(tmp_path, quant))
    main = QUANTS[quant][0].name
    assert types.pop("output.weight") == output
    assert {t for n, t in types.items() if "norm" not in n} == {main}
    assert {t for n, t in types.items() if "norm" in n} == {"F32"}


def test_fallbacks_for_rows_blocks_do_not_divide():
    # llama.cpp's tensor_type_fallback: K types on rows of 64 -> 32-blocks; odd rows -> F16
    assert tensor_type("q4_k_m", "blk.0.attn_q.weight", (64, 64), 0, 4, True) == Q.Q5_0
    assert tensor_type("q5_k", "blk.0.attn_q.weight", (64, 64), 0, 4, True) == Q.Q5_1
    assert tensor_type("q3_k", "blk.0.attn_q.weight", (64, 64), 0, 4, True) == Q.Q4_0
    assert tensor_type("q6_k", "output.weight", (320, 64), None, 4, True) == Q.Q8_0
    assert tensor_type("q4_0", "blk.0.attn_q.weight", (48, 48), 0, 4, True) == Q.F16
    # a 70B (80 layers, GQA): attn_v Q5_K where use_more_bits does not give Q6_K
    assert tensor_type("q4_k_m", "blk.11.attn_v.weight", (1024, 8192), 11, 80, True) == Q.Q5_K


@pytest.mark.parametrize("qtype", list(synth_quant.FILLERS))
def test_random_blocks_dequantize_to_the_asked_std(qtype):
    blocks = np.concatenate(list(BlockPool(1).chunks(qtype, 256 * 512, 0.02)))
    x = dequantize(blocks, qtype)
    assert x.size == 256 * 512
    # MXFP4's scale is a power of two: the nearest one to the std asked for
    assert x.std() == pytest.approx(0.02, rel=0.42 if qtype == Q.MXFP4 else 0.05)
    assert abs(x.mean()) < 0.02 * 0.02 and np.abs(x).max() < 6 * 0.02


def test_tensors_in_the_file_have_the_hf_synth_std(tmp_path):
    r = gguf.GGUFReader(write(tmp_path, "q4_k_m"))
    for t in r.tensors:
        x = dequantize(np.asarray(t.data), t.tensor_type)
        if "norm" in t.name:
            assert np.all(x == 1.0), t.name
            continue
        want = 1.0 if t.name == "token_embd.weight" else int(t.shape[0]) ** -0.5
        assert x.std() == pytest.approx(want, rel=0.05), t.name


@pytest.mark.parametrize("quant", list(QUANTS))
def test_every_quant_opens_in_the_engine_loader(tmp_path, quant):
    src = open_model(write(tmp_path, quant))
    spec = src.index.spec
    assert (spec.hidden_size, spec.num_hidden_layers, spec.vocab_size) == (256, 8, 300)
    assert spec.num_key_value_heads == 2 and not spec.tie_word_embeddings
    q = src.index.units["layers.0"].tensors["self_attn.q_proj.weight"]
    assert q.shape == (256, 256) and q.dtype == tensor_type(
        quant, "blk.0.attn_q.weight", (256, 256), 0, 8, True).name
    text = "hello, wörld"
    ids = src.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == make_tokenizer().encode(text).ids and src.tokenizer.add_bos_token


def _run(path: str):
    async def run():
        async with await Engine.open(path, EngineConfig(backend="numpy")) as eng:
            logits = await eng.logits([256, 71, 68, 75])
            n = 0
            async for chunk in eng.generate("hi", GenerationParams(max_tokens=4,
                                                                   ignore_eos=True)):
                n += len(chunk.token_ids)
            return np.asarray(logits), n

    return asyncio.run(run())


@pytest.mark.parametrize("quant", ["q4_0", "q8_0", "f16"])
def test_engine_runs_the_types_it_computes(tmp_path, quant):
    small = SynthSpec(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=260)
    logits, n = _run(write(tmp_path, quant, small))
    assert np.isfinite(logits).all() and logits.std() > 0 and n == 4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_float_gguf_holds_the_hf_synth_weights(tmp_path, arch):
    # same seed, same pool: the engine un-permutes attn_q/attn_k and gets the HF logits
    spec = SynthSpec(arch=arch, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=260, seed=3)
    synthesize(spec, str(tmp_path / "hf"))
    hf, _ = _run(str(tmp_path / "hf"))
    gg, _ = _run(write(tmp_path, "bf16", spec))
    np.testing.assert_allclose(gg, hf, rtol=1e-4, atol=1e-4)


def test_seed_reproduces_the_file(tmp_path):
    a, b = write(tmp_path, "q4_k_m", name="a"), write(tmp_path, "q4_k_m", name="b")
    other = SynthSpec(**{**SPEC.__dict__, "seed": 1})
    c = write(tmp_path, "q4_k_m", other, name="c")
    with open(a, "rb") as fa, open(b, "rb") as fb, open(c, "rb") as fc:
        da, db, dc = fa.read(), fb.read(), fc.read()
    assert da == db and len(dc) == len(da) and dc != da


def test_cli_writes_gguf_and_refuses_bad_flags(tmp_path, capsys):
    out = tmp_path / "t.gguf"
    assert bench_main(["synth", "--shape", "tiny", "--format", "gguf", "--quant", "q8_0",
                       "--out", str(out)]) == 0
    assert types_of(str(out))["blk.0.attn_q.weight"] == "Q8_0"
    assert not list(tmp_path.glob(".synth-*"))
    capsys.readouterr()
    for argv, match in [
        (["--format", "gguf", "--quant", "q9_9", "--out", str(tmp_path / "x.gguf")],
         "--quant must be one of"),
        (["--quant", "q4_0", "--out", str(tmp_path / "x")], "--quant needs --format gguf"),
        (["--format", "gguf", "--out", str(out)], "already exists"),
        (["--format", "gguf", "--out", str(tmp_path / "x")], "must be a .gguf file"),
        (["--format", "gguf", "--arch", "gemma2", "--out", str(tmp_path / "x.gguf")],
         "supports --arch"),
    ]:
        assert bench_main(["synth", "--shape", "tiny", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("stream-bench") and match in err, err
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x").exists()


def test_plan_streams_the_7b_shape_without_materialising():
    # a 7B q4_k_m plan is llama.cpp's: 193 Q4_K, 33 Q6_K, 65 F32 tensors, ~4.08 GB
    spec = SynthSpec.from_shape("7b")
    tensors = plan(spec, "q4_k_m")
    counts = {t: sum(x.qtype == t for x in tensors) for t in (Q.Q4_K, Q.Q6_K, Q.F32)}
    assert counts == {Q.Q4_K: 193, Q.Q6_K: 33, Q.F32: 65}
    assert sum(t.nbytes for t in tensors) == pytest.approx(4.08e9, rel=0.01)


def test_stream_skips_llama_cpp_rows_with_a_note(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, "f32", SynthSpec(hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, vocab_size=260))
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    log = tmp_path / "s.jsonl"
    assert bench_main(["stream", path, "--quick", "--budget", "1.0", "--prefetch-depth", "0",
                       "--tokens", "1", "--in-process", "--json", str(log)]) == 0
    assert "llama.cpp rows skipped: llama-cpp-python is not installed" in capsys.readouterr().out
    assert '"stream_llamacpp"' not in log.read_text()
