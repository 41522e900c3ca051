"""Synthetic GGUF models: the HF synth's architectures, shapes and tokenizer as one .gguf file,
laid out as llama.cpp's convert_hf_to_gguf.py (and llama-quantize, for the quantized mixes)
writes it, so that the engine and llama.cpp can run the identical file.

Float types (f32/f16/bf16) hold exactly the HF synth's weights for the same seed (same random
pool, same order), with attn_q/attn_k rows permuted as the llama converter does; the engine
un-permutes them at read, so both files give the same logits (not gpt_oss: its GGUF splits
the fused gate_up and draws its own values; its experts are always MXFP4).
Quantized tensors are random
blocks made as bytes (bench.synth_quant); their rows are i.i.d., so they are not permuted (a
permutation of random rows is the same distribution). Tensors stream to the file chunk by
chunk: memory stays at a few pool slices (one whole q/k matrix for the float permutation).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
from gguf import GGML_QUANT_VERSION, GGUFValueType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize

from stream_run.bench import synth_moe
from stream_run.bench.synth import (
    POOL_VALUES,
    SynthSpec,
    _decode,
    _encode,
    _Pool,
    _std,
    make_tokenizer,
)
from stream_run.bench.synth_quant import (
    FLOATS,
    QUANTS,
    BlockPool,
    Q,
    block_elems,
    nbytes,
    tensor_type,
)
from stream_run.loaders import ModelSpec
from stream_run.models import ARCHITECTURES, REGISTRY, gpt_oss_layout

# Architectures written as GGUF: those whose llama.cpp metadata the llama.* keys cover (plus
# deepseek2's and gpt-oss's own keys). Gemma is not: llama.cpp stores its norms with +1 and
# needs sliding-window and softcap keys.
GGUF_ARCHS = ("llama", "qwen2", "qwen3", "phi3", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss")
# llama.cpp's stacked experts: one tensor (n_experts, rows, cols) per linear of a sparse layer
EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")
FLOAT_NAMES = {Q.F32: "f32", Q.F16: "f16", Q.BF16: "bf16"}
# embedding types that can hold the skewed router's [c, 0, ...] first block (gguf-py quantizes)
SKEW_EMBED = (*FLOATS, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
BOS_TOKEN, EOS_TOKEN = 256, 257  # as SynthSpec.config and make_tokenizer
MXFP4_ELEMS = block_elems(Q.MXFP4)


def gpt_oss_type(name: str, qtype: Q) -> Q:
    """gpt-oss as llama.cpp's converter writes it (ggml-org's GGUFs): experts MXFP4 as OpenAI
    ships them, every bias (the experts' are 2-D) F32; the rest keeps the --quant mix."""
    if name.endswith("_exps.weight"):
        return Q.MXFP4
    return Q.F32 if name.endswith(".bias") else qtype


@dataclass(frozen=True)
class GGUFTensor:
    name: str  # GGUF name (blk.N.attn_q.weight)
    shape: tuple[int, ...]  # numpy order: (rows, cols)
    std: float  # 0: a norm weight (ones)
    qtype: Q
    permute_heads: int | None  # rows permuted by this many heads (llama q/k, float types)

    @property
    def nbytes(self) -> int:
        return nbytes(self.qtype, math.prod(self.shape))


def check(spec: SynthSpec, quant: str) -> None:
    """Raises ValueError (one line) for a --quant or --arch GGUF synth cannot write."""
    if quant not in QUANTS:
        raise ValueError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    if spec.arch not in GGUF_ARCHS:
        raise ValueError(f"--format gguf supports --arch {', '.join(GGUF_ARCHS)}, "
                         f"got {spec.arch!r}")
    if spec.arch == "gpt_oss" and (spec.hidden_size % MXFP4_ELEMS
                                   or spec.moe_intermediate_size % MXFP4_ELEMS):
        raise ValueError(f"--arch gpt_oss --format gguf writes MXFP4 experts: --hidden-size and "
                         f"--expert-size must be multiples of {MXFP4_ELEMS}, got "
                         f"{spec.hidden_size} and {spec.moe_intermediate_size}")
    if spec.vocab_size < BOS_TOKEN + 2:
        raise ValueError(f"--vocab must be >= {BOS_TOKEN + 2} (the synthetic tokenizer's "
                         f"tokens), got {spec.vocab_size}")


def plan(spec: SynthSpec, quant: str) -> list[GGUFTensor]:
    """Every tensor of the file in write order (the HF synth's order), with its type."""
    check(spec, quant)
    desc = REGISTRY.for_model_type(spec.arch, "stream-bench synth")
    cfg = {**spec.config(), **desc.config_overrides}
    if spec.arch == "gpt_oss":
        cfg[gpt_oss_layout.GGUF_LAYOUT] = True  # the experts as GGUF holds them: gate, up apart
    mspec = ModelSpec.from_dict(cfg)
    gguf_of = {entry: name for name, entry in desc.gguf_names.items()}
    gqa = spec.num_key_value_heads != spec.num_attention_heads
    float_mix = QUANTS[quant][0] in FLOATS
    out = []

    def add(name: str, rel: str, shape: tuple[int, ...], layer: int | None) -> None:
        qtype = tensor_type(quant, name, shape, layer, spec.num_hidden_layers, gqa)
        if spec.arch == "gpt_oss":
            qtype = gpt_oss_type(name, qtype)
        if spec.router_skew and name == "token_embd.weight" and qtype not in SKEW_EMBED:
            qtype = Q.Q8_0  # its rows start with a [c, 0, ...] block gguf-py must quantize
        kind = desc.gguf_permuted.get(rel)
        heads = None
        if kind and float_mix:
            heads = spec.num_attention_heads if kind == "q" else spec.num_key_value_heads
        std = _std(rel, shape)
        if spec.arch == "gpt_oss" and name.endswith(".bias"):  # the experts' are 2-D
            std = 0.02
        elif spec.arch == "gpt_oss" and len(shape) == 3:  # stacked experts: fan-in is the last
            std = shape[-1] ** -0.5
        out.append(GGUFTensor(name, shape, std, qtype, heads))

    expected = desc.expected_shapes(mspec)
    for key, shapes in expected.items():
        if ".mlp.experts." in key:
            continue  # stacked into the layer's ffn_*_exps below
        layer = int(key.split(".")[1]) if key.startswith("layers.") else None
        unit = key if layer is None else "layers.{bid}"
        for rel, shape in shapes.items():
            add(gguf_of[(unit, rel)].replace("{bid}", str(layer)), rel, shape, layer)
        first = f"{key}.mlp.experts.0"
        if first not in expected:
            continue
        if spec.arch == "gpt_oss":  # names without .weight; the stacked biases too
            stacked = [(f"mlp.experts.{n}", n, s) for n, s in expected[first].items()]
        else:
            stacked = [(f"mlp.experts.{p}.weight", f"{p}.weight", expected[first][f"{p}.weight"])
                       for p in EXPERT_LINEARS]
        for rel, std_name, shape in stacked:
            add(gguf_of[(unit, rel)].replace("{bid}", str(layer)), std_name,
                (spec.num_experts, *shape), layer)
    return out


def file_bytes(spec: SynthSpec, quant: str) -> int:
    return sum(t.nbytes for t in plan(spec, quant))


def tokenizer_metadata(n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of the synth tokenizer, padded to n_vocab tokens with
    unused [PAD<id>] tokens as convert_hf_to_gguf pads a vocabulary to the embedding rows."""
    tok = make_tokenizer()
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    types = [TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m)
              for m in json.loads(tok.to_str())["model"]["merges"]]
    pad = range(len(tokens), n_vocab)
    return tokens + [f"[PAD{i}]" for i in pad], types + [TokenType.UNUSED] * len(pad), merges


class _Writer(GGUFWriter):
    """GGUFWriter that can write an empty array (the synth tokenizer has no merges, and
    llama.cpp requires tokenizer.ggml.merges to be present for a gpt2 vocabulary)."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None) -> bytes:
        if vtype == GGUFValueType.ARRAY and len(val) == 0 and sub_type is not None:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _add_metadata(w: GGUFWriter, spec: SynthSpec, quant: str, name: str) -> None:
    arch = ARCHITECTURES[spec.arch].gguf_arch
    if "phi3" in name.lower() or "phi-3" in name.lower():
        # llama.cpp gives a model *named* Phi-3 token attributes that need "<unk>" and
        # "<|endoftext|>" tokens, which the synth vocabulary lacks (it fails to load)
        raise ValueError(f"general.name {name!r} must not say phi3: llama.cpp keys on it")
    cfg = spec.config()
    w.add_type("model")
    w.add_name(name)
    w.add_custom_alignment(32)  # llama.cpp's default, written out
    # gpt-oss: llama.cpp's file type for MXFP4 experts (informational, as every file_type)
    w.add_file_type(int(LlamaFileType.MOSTLY_MXFP4_MOE if spec.arch == "gpt_oss"
                        else QUANTS[quant][1]))
    w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_string("stream_run.synthetic", json.dumps({**asdict(spec), "quant": quant}))
    head_dim = spec.head_dim or spec.hidden_size // spec.num_attention_heads
    keys = [("context_length", cfg["max_position_embeddings"]),
            ("embedding_length", spec.hidden_size),
            ("block_count", spec.num_hidden_layers),
            ("feed_forward_length", spec.intermediate_size),
            ("attention.head_count", spec.num_attention_heads),
            ("attention.head_count_kv", spec.num_key_value_heads),
            ("rope.dimension_count", head_dim),
            ("vocab_size", spec.vocab_size)]
    if spec.head_dim:
        keys += [("attention.key_length", head_dim), ("attention.value_length", head_dim)]
    if spec.num_experts:
        keys += [("expert_count", spec.num_experts),
                 ("expert_used_count", spec.num_experts_per_tok)]
        if spec.arch != "mixtral":
            keys.append(("expert_feed_forward_length", spec.moe_intermediate_size))
    others: dict[str, float | bool | str] = {}
    rope_theta = cfg["rope_theta"]
    if spec.arch == "gpt_oss":  # as convert_hf_to_gguf's GptOssModel writes them
        rope = cfg["rope_parameters"]
        rope_theta = rope["rope_theta"]
        keys += [("attention.sliding_window", cfg["sliding_window"]),
                 ("rope.scaling.original_context_length",
                  rope["original_max_position_embeddings"])]
        others = {"rope.scaling.type": "yarn", "rope.scaling.factor": rope["factor"]}
    elif spec.arch == "deepseek_v3":
        ints, others = synth_moe.deepseek_gguf_keys(spec)
        keys = [*((k, v) for k, v in keys if k not in ints), *ints.items()]
    for key, val in keys:
        w.add_uint32(f"{arch}.{key}", val)
    for key, other in others.items():
        if isinstance(other, bool):
            w.add_bool(f"{arch}.{key}", other)
        elif isinstance(other, str):
            w.add_string(f"{arch}.{key}", other)
        else:
            w.add_float32(f"{arch}.{key}", other)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    w.add_float32(f"{arch}.rope.freq_base", rope_theta)
    tokens, types, merges = tokenizer_metadata(spec.vocab_size)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "gpt-2")  # ByteLevel with the GPT-2 split regex
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [int(t) for t in types])
    w.add_key_value("tokenizer.ggml.merges", merges, GGUFValueType.ARRAY,
                    sub_type=GGUFValueType.STRING)
    w.add_uint32("tokenizer.ggml.bos_token_id", cfg["bos_token_id"])
    w.add_uint32("tokenizer.ggml.eos_token_id", cfg["eos_token_id"])
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_bool("tokenizer.ggml.add_eos_token", False)


def _permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> GGUF q/k row order (convert_hf_to_gguf LlamaModel.permute)."""
    r = rows.shape[0]
    return rows.reshape(n_head, 2, r // n_head // 2, -1).swapaxes(1, 2).reshape(rows.shape)


def _float_chunks(pool: _Pool, t: GGUFTensor) -> Iterator[np.ndarray]:
    """A float tensor's values from the HF synth's pool, in the tensor's own type."""
    target = FLOAT_NAMES[t.qtype]
    left = math.prod(t.shape)
    while left:
        n = min(left, POOL_VALUES)
        data = pool.chunk(n, t.std)
        yield data if target == pool.dtype else _encode(_decode(data, pool.dtype), target)
        left -= n


def _tensor_chunks(t: GGUFTensor, pools: dict, spec: SynthSpec) -> Iterator[np.ndarray]:
    """The tensor's bytes in chunks, with --router-skew's edits (bench.synth_moe)."""
    floats = t.qtype in FLOATS
    embed = None
    if spec.router_skew and t.name == "token_embd.weight" and not floats:
        first = np.zeros((1, block_elems(t.qtype)), np.float32)
        first[0, 0] = math.sqrt(spec.hidden_size)
        embed = quantize(first, t.qtype).reshape(-1)
    edit = synth_moe.skew_edit(spec, t.name, t.shape, 1 if floats else block_elems(t.qtype),
                               embed)
    chunks = _raw_chunks(t, pools, spec.seed)
    if edit is None:
        yield from chunks
        return
    at, target = 0, FLOAT_NAMES.get(t.qtype)
    for chunk in chunks:
        yield edit(at, chunk) if not floats else _encode(
            edit(at, _decode(chunk, target).reshape(-1)), target)
        at += chunk.shape[0] if not floats else chunk.size


def _raw_chunks(t: GGUFTensor, pools: dict, seed: int) -> Iterator[np.ndarray]:
    if t.qtype not in FLOATS:
        if "blocks" not in pools:
            pools["blocks"] = BlockPool(seed)
        yield from pools["blocks"].chunks(t.qtype, math.prod(t.shape), t.std)
        return
    if "floats" not in pools:
        pools["floats"] = _Pool("f32", seed)  # quantized mixes: norms, biases, F16 fallbacks
    chunks = _float_chunks(pools["floats"], t)
    if t.permute_heads is None:
        yield from chunks
    else:
        yield _permute(np.concatenate(list(chunks)).reshape(t.shape), t.permute_heads)


def synthesize_gguf(spec: SynthSpec, quant: str, out: str, name: str | None = None,
                    progress: Callable[[int], None] = lambda n: None) -> None:
    """Write the model as one GGUF file: into a temp file beside `out`, then renamed.

    Raises:
        FileExistsError: out exists (never overwritten).
        ValueError: a --quant, --arch or vocabulary size GGUF synth cannot write.
    """
    tensors = plan(spec, quant)
    if os.path.exists(out):
        raise FileExistsError(f"{out}: already exists; choose a new --out file")
    fd, tmp = tempfile.mkstemp(prefix=".synth-", suffix=".gguf",
                               dir=os.path.dirname(os.path.abspath(out)))
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the model is an ordinary file
    # float mixes draw from the HF synth's pool (same seed -> the same weights)
    pools: dict = {}
    if QUANTS[quant][0] in FLOATS:
        pools["floats"] = _Pool(quant, spec.seed)
    w = _Writer(tmp, ARCHITECTURES[spec.arch].gguf_arch)
    try:
        _add_metadata(w, spec, quant, name or f"synth-{quant}")
        for t in tensors:
            # a float dtype keeps `shape` as the logical shape (uint8 would mean byte shape)
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        w.write_padding(fout, fout.tell())
        for t in tensors:
            written = 0
            for chunk in _tensor_chunks(t, pools, spec):
                fout.write(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8).data)
                written += chunk.nbytes
                progress(chunk.nbytes)
            assert written == t.nbytes, (t.name, written, t.nbytes)
            w.write_padding(fout, t.nbytes)
        w.close()
        os.rename(tmp, out)
    except BaseException:
        w.close()
        os.unlink(tmp)
        raise
