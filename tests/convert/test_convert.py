"""stream-convert on tiny models: HF (float32, bf16), MLX-quantized, GGUF (K-quants and the
classic block types) and packed sources. The output is read back independently
(tests/packed_models.py: its own safetensors parser, bitstream unpacker and mlx-lm's reading of
the quantization section) and the engine's greedy tokens on it are compared with the numpy
reference model run on those dequantized weights."""

import asyncio
import json
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from stream_run.convert.convert import convert_model
from stream_run.engine import Engine, EngineConfig, GenerationParams
from stream_run.engine.errors import ConvertError
from stream_run.kernels.quant import quantize, quantize_search
from stream_run.loaders.tokenizer import load_tokenizer_dir
from stream_run.models import open_model
from tests.packed_models import (
    TYPES_BY_LAYER,
    as_array,
    load_packed,
    manifest_matches_files,
    raw_tensors,
    write_kquant_gguf,
)
from tests.reference_model import reference_greedy
from tests.tiny_models import write_mlx_quantized_model, write_tiny_model

PROMPT = [5, 17, 42, 99, 3, 250, 7, 11, 64, 128, 31]
N_STEPS = 32


async def _greedy(path, n: int, backend: str) -> list[int]:
    ids: list[int] = []
    async with await Engine.open(str(path), EngineConfig(backend=backend)) as engine:
        async for chunk in engine.generate(PROMPT, GenerationParams(max_tokens=n,
                                                                    ignore_eos=True)):
            ids += chunk.token_ids
    return ids


def greedy(path, n: int = N_STEPS, backend: str = "numpy") -> list[int]:
    return asyncio.run(_greedy(path, n, backend))


def logits(path, ids: list[int]) -> np.ndarray:
    async def run():
        async with await Engine.open(str(path), EngineConfig(backend="numpy")) as engine:
            return await engine.logits(ids)

    return asyncio.run(run())


QUANTIZE = {"rtn": quantize, "mse": quantize_search}  # what each --quantizer must write


def convert(src, out, **kw) -> dict:
    return convert_model(str(src), str(out), progress=False, **kw)


def unit_tensors(out, key: str) -> dict:
    return raw_tensors(out / f"model-{key}.safetensors")


# --- HF sources --------------------------------------------------------------------------

RECIPES = {"8bit": {"bits": 8}, "mixed": {"recipe": "mixed"},
           "4bit-g32": {"bits": 4, "group_size": 32}}


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
@pytest.mark.parametrize("kind", RECIPES)
def test_converted_tiny_model_runs_like_the_reference_on_its_weights(tiny_model_dir, tmp_path,
                                                                      kind, backend):
    src, _, _ = tiny_model_dir("llama")
    out = tmp_path / "out"
    manifest = convert(src, out, **RECIPES[kind])
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "stream-run-packed" and manifest["version"] == 1
    assert manifest["quantizer"] == "rtn"  # the default
    assert manifest_matches_files(out)
    assert sorted(os.listdir(out)) == sorted(
        ["config.json", "manifest.json", "model.safetensors.index.json", "tokenizer.json",
         "tokenizer_config.json", "model-embed.safetensors", "model-layers.0.safetensors",
         "model-layers.1.safetensors", "model-head.safetensors"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {u["file"] for u in manifest["units"].values()}
    assert open_model(str(out)).index.checksums is not None
    cfg, weights = load_packed(out)
    assert greedy(out, backend=backend) == reference_greedy(cfg, weights, PROMPT, N_STEPS)


def test_recipes_set_bits_per_tensor_in_files_manifest_and_config(tiny_model_dir, tmp_path):
    src, _, _ = tiny_model_dir("llama")
    out = tmp_path / "out"
    manifest = convert(src, out, recipe="mixed", group_size=32)
    assert manifest["quantization"] == json.loads((out / "config.json").read_text())[
        "quantization"] == {"group_size": 32, "bits": 4,
                            "model.embed_tokens": {"group_size": 32, "bits": 8},
                            "lm_head": {"group_size": 32, "bits": 8}}
    layer = manifest["units"]["layers.0"]["tensors"]
    assert layer["model.layers.0.self_attn.q_proj.weight"] == {
        "dtype": "U32", "shape": [64, 64 * 4 // 32], "bits": 4, "group_size": 32}
    assert layer["model.layers.0.self_attn.q_proj.scales"]["dtype"] == "F16"
    assert layer["model.layers.0.input_layernorm.weight"] == {
        "dtype": "F32", "shape": [64], "bits": None, "group_size": None}
    head = manifest["units"]["head"]["tensors"]
    assert head["lm_head.weight"]["shape"] == [320, 64 * 8 // 32]


def test_8bit_logits_track_the_unconverted_model(tiny_model_dir, tmp_path):
    """Random tiny models are full of near ties (top-2 margins of 0.01-0.08 over 32 greedy
    steps, against a 0.2-0.5 logit change from 8-bit weights), so exact greedy equality is
    checked on SmolLM2 and on lossless conversions; here the logits along the unconverted
    model's greedy path stay within 5 % of its logit range."""
    src, _, _ = tiny_model_dir("llama")
    convert(src, tmp_path / "out", bits=8)
    ids = PROMPT + greedy(src)
    want, got = logits(src, ids), logits(tmp_path / "out", ids)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.9


def test_tied_model_with_biases_keeps_one_embedding(tiny_model_dir, tmp_path):
    src, _, _ = tiny_model_dir("qwen2")  # tied, with q/k/v biases
    out = tmp_path / "out"
    manifest = convert(src, out, recipe="mixed")
    names = [n for u in manifest["units"].values() for n in u["tensors"]]
    assert not any(n.startswith("lm_head") for n in names)
    assert manifest["quantization"] == {"group_size": 64, "bits": 4,
                                        "model.embed_tokens": {"group_size": 64, "bits": 8}}
    bias = manifest["units"]["layers.1"]["tensors"]["model.layers.1.self_attn.k_proj.bias"]
    assert bias == {"dtype": "F32", "shape": [32], "bits": None, "group_size": None}
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    cfg, weights = load_packed(out)
    assert greedy(out) == reference_greedy(cfg, weights, PROMPT, N_STEPS)


def test_recipe_file_leaves_modules_unquantized_in_a_quantized_model(tiny_model_dir, tmp_path):
    src, _, _ = tiny_model_dir("llama")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"rules": [
        {"pattern": "lm_head", "bits": None},
        {"pattern": "*.mlp.down_proj", "layers": [-1], "bits": 6, "group_size": 32}]}))
    out = tmp_path / "out"
    manifest = convert(src, out, recipe=str(recipe))
    assert manifest["quantization"] == {"group_size": 64, "bits": 4, "lm_head": False,
                                        "model.layers.1.mlp.down_proj": {"group_size": 32,
                                                                         "bits": 6}}
    head = unit_tensors(out, "head")
    assert head["lm_head.weight"][:2] == ("F32", (320, 64))
    source = raw_tensors(src / "model.safetensors")
    assert head["lm_head.weight"][2] == source["lm_head.weight"][2]  # copied byte for byte
    assert unit_tensors(out, "layers.1")["model.layers.1.mlp.down_proj.weight"][1] == (64, 24)
    cfg, weights = load_packed(out)
    assert greedy(out) == reference_greedy(cfg, weights, PROMPT, N_STEPS)


def test_none_recipe_copies_bf16_bytes(tmp_path):
    write_tiny_model(tmp_path / "src", "llama", dtype="bfloat16")
    out = tmp_path / "out"
    manifest = convert(tmp_path / "src", out, recipe="none")
    assert manifest["quantization"] is None
    assert "quantization" not in json.loads((out / "config.json").read_text())
    source = raw_tensors(tmp_path / "src" / "model.safetensors")
    got = {n: t for f in out.glob("model-*.safetensors") for n, t in raw_tensors(f).items()}
    assert got == source
    assert greedy(out) == greedy(tmp_path / "src")


# --- MLX and packed sources --------------------------------------------------------------

def test_mlx_source_is_copied_or_widened_losslessly(tmp_path):
    write_mlx_quantized_model(tmp_path / "mlx", "llama", bits=4, group_size=64)
    convert(tmp_path / "mlx", tmp_path / "same", bits=4, group_size=64)
    source = raw_tensors(tmp_path / "mlx" / "model.safetensors")
    got = {n: t for f in (tmp_path / "same").glob("model-*.safetensors")
           for n, t in raw_tensors(f).items()}
    assert got == source
    # 8 bits, group 32: the 4-bit codes in 8-bit fields, each scale and bias twice
    manifest = convert(tmp_path / "mlx", tmp_path / "wide", bits=8, group_size=32)
    assert manifest["source"]["format"] == "mlx"
    assert manifest["units"]["layers.0"]["tensors"]["model.layers.0.mlp.up_proj.weight"][
        "shape"] == [128, 64 * 8 // 32]
    _, mlx_weights = load_packed(tmp_path / "mlx")
    _, wide = load_packed(tmp_path / "wide")
    assert wide.keys() == mlx_weights.keys()
    for name, w in mlx_weights.items():
        np.testing.assert_array_equal(wide[name], w, err_msg=name)


@pytest.mark.parametrize("quantizer", ["mse", "rtn"])
def test_mlx_source_at_a_coarser_group_is_requantized(tmp_path, quantizer):
    write_mlx_quantized_model(tmp_path / "mlx", "llama", bits=4, group_size=32)
    manifest = convert(tmp_path / "mlx", tmp_path / "eight", bits=8, group_size=64,
                       quantizer=quantizer)
    assert manifest["quantizer"] == quantizer
    assert json.loads((tmp_path / "eight" / "manifest.json").read_text())[
        "quantizer"] == quantizer
    _, mlx_weights = load_packed(tmp_path / "mlx")
    layer = unit_tensors(tmp_path / "eight", "layers.0")
    prefix = "model.layers.0.mlp.up_proj"
    want = QUANTIZE[quantizer](mlx_weights[f"{prefix}.weight"], 8, 64)
    np.testing.assert_array_equal(as_array(*layer[f"{prefix}.weight"]), want.packed)
    np.testing.assert_array_equal(as_array(*layer[f"{prefix}.scales"]),
                                  want.scales.astype(np.float16))
    np.testing.assert_array_equal(as_array(*layer[f"{prefix}.biases"]),
                                  want.biases.astype(np.float16))


def test_rtn_quantizer_is_bit_exact_with_mx_quantize(tiny_model_dir, tmp_path):
    """--quantizer rtn writes what mx.quantize gives (scales and biases as float16)."""
    mx = pytest.importorskip("mlx.core")
    src, _, weights = tiny_model_dir("llama")
    convert(src, tmp_path / "out", bits=3, group_size=32, quantizer="rtn")
    files = {n: t for f in (tmp_path / "out").glob("model-*.safetensors")
             for n, t in raw_tensors(f).items()}
    for name in ("model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
        prefix = name.removesuffix(".weight")
        packed, scales, biases = mx.quantize(mx.array(weights[name]), group_size=32, bits=3,
                                              stream=mx.cpu)
        np.testing.assert_array_equal(as_array(*files[name]), np.array(packed), err_msg=name)
        for part, want in (("scales", scales), ("biases", biases)):
            np.testing.assert_array_equal(as_array(*files[f"{prefix}.{part}"]),
                                          np.array(want.astype(mx.float16)), err_msg=name)


def test_mse_quantizer_lowers_the_weight_error_of_every_requantized_tensor(tiny_model_dir,
                                                                            tmp_path):
    src, _, weights = tiny_model_dir("llama")
    errors = {}
    for quantizer in ("rtn", "mse"):
        out = tmp_path / quantizer
        manifest = convert(src, out, bits=3, quantizer=quantizer)
        assert manifest["quantizer"] == quantizer
        _, got = load_packed(out)
        errors[quantizer] = {n: float(np.sum((got[n] - w).astype(np.float64) ** 2))
                             for n, w in weights.items() if w.ndim == 2}
    assert errors["mse"].keys() == errors["rtn"].keys() and len(errors["mse"]) == 16
    for name, rtn in errors["rtn"].items():
        assert errors["mse"][name] < 0.95 * rtn, name


def test_unknown_quantizer_is_refused_before_writing(tiny_model_dir, tmp_path):
    src, _, _ = tiny_model_dir("llama")
    with pytest.raises(ConvertError, match=r"quantizer='awq' is not supported; expected one "
                                           r"of mse, rtn, gptq"):
        convert(src, tmp_path / "out", quantizer="awq")
    assert sorted(os.listdir(tmp_path)) == [src.name]


def test_packed_source_reconverts_to_identical_files(tiny_model_dir, tmp_path):
    src, _, _ = tiny_model_dir("llama")
    first = convert(src, tmp_path / "a", recipe="mixed")
    again = convert(tmp_path / "a", tmp_path / "b", recipe="mixed")
    assert again["source"]["format"] == "packed"
    assert [u["sha256"] for u in again["units"].values()] == [
        u["sha256"] for u in first["units"].values()]
    eight = convert(tmp_path / "a", tmp_path / "c", bits=8)
    assert eight["quantization"] == {"group_size": 64, "bits": 8}
    cfg, weights = load_packed(tmp_path / "c")
    assert greedy(tmp_path / "c", 8) == reference_greedy(cfg, weights, PROMPT, 8)


# --- GGUF sources ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kquant_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "kquant.gguf"
    return path, write_kquant_gguf(path)


def gguf_types() -> dict[str, QT]:
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    types = {"model.embed_tokens.weight": QT.Q6_K, "lm_head.weight": QT.Q8_0}
    for i, layer in enumerate(TYPES_BY_LAYER):
        types.update({f"model.layers.{i}.{names[k]}.weight": t for k, t in layer.items()})
    return types


@pytest.mark.parametrize("bits, group, lossless, quantizer", [
    (8, 32, {QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K}, "rtn"),
    (4, 32, {QT.Q4_0, QT.Q4_1, QT.Q4_K}, "mse"),
    (8, 64, set(), "mse"), (4, 64, set(), "rtn")])
def test_gguf_blocks_convert_in_hf_layout(kquant_gguf, tmp_path, bits, group, lossless,
                                          quantizer):
    """Each weight as gguf-py dequantizes it (q/k un-permuted to HF rows): the types that are
    affine over 32 elements (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K) at no more bits than a
    group-32 target are copied exactly; Q2_K/Q3_K/Q6_K and the rest are requantized by the
    quantizer asked for."""
    path, hf = kquant_gguf
    out = tmp_path / "out"
    manifest = convert(path, out, bits=bits, group_size=group, quantizer=quantizer)
    assert manifest["source"] == {"name": "kquant.gguf", "format": "gguf"}
    _, weights = load_packed(out)
    files = {n: t for f in out.glob("model-*.safetensors") for n, t in raw_tensors(f).items()}
    for name, qtype in gguf_types().items():
        prefix = name.removesuffix(".weight")
        if qtype in lossless:
            np.testing.assert_array_equal(weights[name], hf[name], err_msg=name)
            continue
        want = QUANTIZE[quantizer](hf[name], bits, group)
        np.testing.assert_array_equal(as_array(*files[name]), want.packed, err_msg=name)
        np.testing.assert_array_equal(as_array(*files[f"{prefix}.scales"]),
                                      want.scales.astype(np.float16), err_msg=name)
    for name in ("model.norm.weight", "model.layers.1.input_layernorm.weight"):
        np.testing.assert_array_equal(weights[name], hf[name])


def test_converted_gguf_runs_like_the_reference_and_keeps_the_tokenizer(kquant_gguf, tmp_path):
    path, _ = kquant_gguf
    out = tmp_path / "out"
    convert(path, out, bits=8, group_size=64)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 2
    assert cfg["tie_word_embeddings"] is False and cfg["head_dim"] == 64
    cfg, weights = load_packed(out)
    assert greedy(out, 16) == reference_greedy(cfg, weights, PROMPT, 16)
    source, packed = open_model(str(path)).tokenizer, load_tokenizer_dir(str(out))
    for text in ("hello world", "<|bos|>x<|eos|>", "  tabs\tand\nnewlines ünï"):
        assert packed.tokenizer.encode(text).ids == source.tokenizer.encode(text).ids
    assert (packed.bos_token, packed.eos_token, packed.eos_token_ids) == (
        source.bos_token, source.eos_token, source.eos_token_ids)


def test_gguf_blocks_at_their_own_bits_convert_losslessly_end_to_end(tmp_path):
    """Q4_0/Q4_1 linears at 4-bit group 32 and Q8_0 embedding/head at 8-bit group 32 (a
    recipe file): every weight is copied exactly, so the converted model computes what the
    GGUF's weights compute: its greedy tokens equal the float reference's on them, and its
    logits of the prompt equal the GGUF run's. (Greedy tokens of the GGUF run itself are not
    the reference: decoding on GGUF blocks rounds x to int8, llama.cpp's integer path, and
    parted from the float path at a near-tie at step 31 on one machine.)"""
    types = [{"attn_q": QT.Q4_0, "attn_k": QT.Q4_1, "attn_v": QT.Q4_0, "attn_output": QT.Q4_1,
              "ffn_gate": QT.Q4_1, "ffn_up": QT.Q4_0, "ffn_down": QT.Q4_1}] * 2
    hf = write_kquant_gguf(tmp_path / "q4.gguf", 1, types, QT.Q8_0, QT.Q8_0)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"bits": 4, "group_size": 32, "rules": [
        {"pattern": "model.embed_tokens", "bits": 8}, {"pattern": "lm_head", "bits": 8}]}))
    convert(tmp_path / "q4.gguf", tmp_path / "out", recipe=str(recipe))
    cfg, weights = load_packed(tmp_path / "out")
    assert weights.keys() == hf.keys()
    for name, w in hf.items():
        np.testing.assert_array_equal(weights[name], w, err_msg=name)
    assert greedy(tmp_path / "out", 16) == reference_greedy(cfg, weights, PROMPT, 16)
    np.testing.assert_allclose(logits(tmp_path / "out", PROMPT),
                               logits(tmp_path / "q4.gguf", PROMPT), rtol=0, atol=1e-3)


# --- bad input ---------------------------------------------------------------------------

def test_group_size_that_does_not_divide_names_the_tensor(tiny_model_dir, tmp_path):
    src, _, _ = tiny_model_dir("llama")  # hidden size 64
    with pytest.raises(ConvertError, match=r"tensor 'model\.embed_tokens\.weight' \[320, 64\]: "
                                           r"input dimension 64 is not divisible by group_size "
                                           r"128 .*hint: --group-size 64 divides it"):
        convert(src, tmp_path / "out", group_size=128)
    assert sorted(os.listdir(tmp_path)) == [src.name]


def test_nan_weight_is_named(tmp_path):
    from safetensors.numpy import save_file

    from tests.tiny_models import make_config, make_weights, write_tokenizer

    src = tmp_path / "src"
    src.mkdir()
    cfg = make_config("llama", 2)
    weights = make_weights(cfg, 0)
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(weights, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(src, cfg)
    with pytest.raises(ConvertError, match=r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight': "
                                           r"w: non-finite value nan at \[3, 5\]"):
        convert(src, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["src"]
    convert(src, tmp_path / "out", recipe="none")  # kept as it is: nothing to quantize
