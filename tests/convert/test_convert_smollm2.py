"""SmolLM2-135M-Instruct (Q4_1 GGUF with a Q8_0 embedding) through stream-convert.

Q4_1 -> 4-bit group 32 is lossless per tensor (the output, read back by tests/packed_models.py,
equals gguf-py's dequantization of every Q4_1 block); converted at 8 bits the engine's greedy
tokens equal tests/data/smollm2_reference.json (transformers on the dequantized GGUF, which the
unconverted engine matches in tests/engine/test_smollm2.py); the tokenizer round-trips.
"""

import asyncio
import json
import pathlib

import gguf
import numpy as np
import pytest

from stream_run.convert.convert import convert_model
from stream_run.engine import Engine, EngineConfig, GenerationParams
from stream_run.engine.tokenizer import Tokenizer
from stream_run.loaders import UnitReader
from stream_run.loaders.hf import full_name
from stream_run.loaders.tokenizer import load_tokenizer_dir
from stream_run.models import open_model
from tests.packed_models import load_weights, manifest_matches_files, raw_tensors

REFERENCE = json.loads(
    (pathlib.Path(__file__).parents[1] / "data" / "smollm2_reference.json").read_text())
N_STEPS = 32

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def packed(smollm2_gguf, tmp_path_factory):
    """Converts once per (bits, group_size) for the module."""
    done = {}

    def get(bits: int, group_size: int) -> pathlib.Path:
        if (bits, group_size) not in done:
            out = tmp_path_factory.mktemp("smollm2") / f"q{bits}g{group_size}"
            convert_model(smollm2_gguf, str(out), bits=bits, group_size=group_size,
                          progress=False)
            done[bits, group_size] = out
        return done[bits, group_size]

    return get


def test_q4_1_to_4bit_group_32_is_lossless(smollm2_gguf, packed):
    out = packed(4, 32)
    assert manifest_matches_files(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 32, "bits": 4}
    source = open_model(smollm2_gguf)
    reader = UnitReader(source.index)  # rows un-permuted to HF order, as the converter reads
    n_lossless = 0
    try:
        for key, unit in source.index.units.items():
            raw = reader.read(key)
            weights = load_weights(out / f"model-{key}.safetensors", cfg)
            for rel, ref in unit.tensors.items():
                name = full_name(key, rel)
                if ref.dtype == "Q4_1":
                    rows = raw[rel].data.reshape(ref.shape[0], -1)
                    want = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType.Q4_1)
                    np.testing.assert_array_equal(weights[name], want, err_msg=name)
                    n_lossless += 1
                elif ref.dtype == "F32":
                    np.testing.assert_array_equal(weights[name],
                                                  raw[rel].data.view("<f4").reshape(ref.shape))
                else:
                    assert ref.dtype == "Q8_0" and name == "model.embed_tokens.weight"
    finally:
        reader.close()
    assert n_lossless == 30 * 7
    scales = raw_tensors(out / "model-layers.0.safetensors")[
        "model.layers.0.mlp.down_proj.scales"]
    assert scales[0] == "F16"  # Q4_1's d and m are float16: no float32 needed


async def run_cases(path, fn) -> dict:
    async with await Engine.open(str(path), EngineConfig(backend="numpy")) as engine:
        return {case["name"]: await fn(engine, case) for case in REFERENCE["cases"]}


async def greedy(engine, case) -> list[int]:
    ids: list[int] = []
    params = GenerationParams(max_tokens=N_STEPS, ignore_eos=True)
    async for chunk in engine.generate(case["prompt_ids"], params):
        ids += chunk.token_ids
    return ids


def test_8bit_greedy_equals_the_unconverted_model(packed):
    """8 bits, group 32: the Q4_1 codes in 8-bit fields and the Q8_0 embedding as it is, so the
    converted weights are the source's exactly; the greedy tokens equal the reference's."""
    out = packed(8, 32)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"] == {"group_size": 32, "bits": 8}
    cfg = json.loads((out / "config.json").read_text())
    four = json.loads((packed(4, 32) / "config.json").read_text())
    for key in ("embed", "layers.7"):
        wide = load_weights(out / f"model-{key}.safetensors", cfg)
        if key == "embed":  # Q8_0 -> 8-bit group 32 is a copy; the 4-bit file requantized it
            continue
        same = load_weights(packed(4, 32) / f"model-{key}.safetensors", four)
        assert wide.keys() == same.keys()
        for name, w in same.items():
            np.testing.assert_array_equal(wide[name], w, err_msg=name)
    got = asyncio.run(run_cases(out, greedy))
    assert got == {c["name"]: c["greedy_ids"][:N_STEPS] for c in REFERENCE["cases"]}


def test_8bit_group_64_tracks_the_reference_except_at_near_ties(packed):
    """8 bits, group 64 requantizes (a group spans two Q4_1 blocks): logits move by up to ~1,
    so along each reference path the argmax must match wherever the reference's own top-2
    margin is at least MARGIN (prompt2 flips at a 0.10 margin)."""
    MARGIN = 0.25

    async def argmax(engine, case) -> list[int]:
        ids = case["prompt_ids"] + case["greedy_ids"][:N_STEPS]
        logits = await engine.logits(ids)
        return logits[len(case["prompt_ids"]) - 1:-1].argmax(-1).tolist()

    got = asyncio.run(run_cases(packed(8, 64), argmax))
    for case in REFERENCE["cases"]:
        sure = [i for i, m in enumerate(case["top2_margins"][:N_STEPS]) if m >= MARGIN]
        assert len(sure) >= 20
        assert [got[case["name"]][i] for i in sure] == [case["greedy_ids"][i] for i in sure]


def test_tokenizer_of_the_converted_dir_gives_the_same_ids(smollm2_gguf, packed):
    source = Tokenizer(open_model(smollm2_gguf).tokenizer)
    converted = Tokenizer(load_tokenizer_dir(str(packed(4, 32))))
    texts = ["Hello, world!", "In 2024, 3.14 is pi; 1,000,000 people.",
             "naïve café 日本語 🤖", "  leading spaces\tand\ttabs\n\n\nnewlines  ",
             "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>text<repo_name>x", ""]
    for text in texts:
        assert converted.encode(text) == source.encode(text), text
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of France?"}]
    for msgs in (messages, messages[1:]):
        chat = source.apply_chat_template(msgs)
        assert converted.apply_chat_template(msgs) == chat
        assert converted.encode(chat, add_bos=False) == source.encode(chat, add_bos=False)
    assert converted.eos_token_ids == source.eos_token_ids
    assert converted.bos_token_id == source.bos_token_id
    case = next(c for c in REFERENCE["cases"] if "messages" in c)
    text = converted.apply_chat_template(case["messages"])
    assert converted.encode(text, add_bos=False) == case["prompt_ids"]


def test_bits_4_keeps_the_q4_1_group_size_and_the_answer(smollm2_gguf, tmp_path):
    """--bits 4 on a Q4_1 source (group 32) re-quantized it at group 64 before, and answered
    wrongly; without --group-size a block tensor at no more bits keeps its own group. With
    the mixed recipe (embedding 8-bit, as its Q8_0) the whole model is an exact copy."""
    import asyncio

    manifest = convert_model(smollm2_gguf, str(tmp_path / "q4"), bits=4, progress=False)
    assert manifest["tensors"] == {"copied_exactly": 210, "requantized": 1}  # the Q8_0 embed
    assert manifest["quantization"]["group_size"] == 32
    mixed = convert_model(smollm2_gguf, str(tmp_path / "mixed"), bits=4, recipe="mixed",
                          progress=False)
    assert mixed["tensors"] == {"copied_exactly": 211, "requantized": 0}

    case = next(c for c in REFERENCE["cases"] if "top5_ids" in c)

    async def logits_and_greedy(path):
        engine = await Engine.open(str(path), EngineConfig(backend="numpy"))
        try:
            logits = (await engine.logits(case["prompt_ids"]))[-1]
            done = await engine.complete(case["prompt_ids"], GenerationParams(
                max_tokens=8, ignore_eos=True))
            return logits, done.token_ids
        finally:
            engine.close()

    # the exact copy computes in float32 (the packed kernels keep x float, where the GGUF
    # kernels round it to int8 as llama.cpp does): transformers' logits on the dequantized
    # GGUF within float rounding, and its greedy tokens (their margins are >= 0.22 here)
    logits, ids = asyncio.run(logits_and_greedy(tmp_path / "mixed"))
    assert np.argsort(-logits)[:5].tolist() == case["top5_ids"]
    np.testing.assert_allclose(logits[case["top5_ids"]], case["top5_logits"], rtol=0, atol=2e-3)
    assert ids == case["greedy_ids"][:8]
