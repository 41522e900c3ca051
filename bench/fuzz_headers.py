"""Mutation fuzzing of the header parsers: GGUF, safetensors and config.json.

    python -m stream_run.bench.fuzz_headers [--inputs 100000] [--seconds 0] [--seed 0]

Each input is a valid tiny file with bytes flipped, cut or inserted (in the header, where the
parsers work). The only allowed outcome is one of the loaders' errors (FormatError,
MissingTensorError, ReadError) or a clean open, within 2 s: anything else, or a slow input, is
reported with the first few examples and makes the exit code 1. tests/loaders/test_fuzz.py
runs a short sweep; the closing notes report the long ones.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from stream_run.loaders import FormatError, MissingTensorError, ReadError, gguf_file, hf
from stream_run.loaders.safetensors_file import read_safetensors_header
from stream_run.models import REGISTRY

ALLOWED = (FormatError, MissingTensorError, ReadError)
SLOW_S = 2.0
E, INTER, HEADS, KV, LAYERS, VOCAB = 32, 64, 4, 2, 2, 64


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    d, kvd = E // HEADS, KV * E // HEADS
    w = {"model.embed_tokens.weight": (VOCAB, E), "model.norm.weight": (E,),
         "lm_head.weight": (VOCAB, E)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": (E,), p + "post_attention_layernorm.weight": (E,),
                  p + "self_attn.q_proj.weight": (HEADS * d, E),
                  p + "self_attn.k_proj.weight": (kvd, E), p + "self_attn.v_proj.weight": (kvd, E),
                  p + "self_attn.o_proj.weight": (E, HEADS * d),
                  p + "mlp.gate_proj.weight": (INTER, E), p + "mlp.up_proj.weight": (INTER, E),
                  p + "mlp.down_proj.weight": (E, INTER)})
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in w.items()}


def _config() -> dict:
    return {"model_type": "llama", "hidden_size": E, "intermediate_size": INTER,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": KV, "vocab_size": VOCAB, "rms_norm_eps": 1e-5}


def _gguf(path: Path, weights: dict[str, np.ndarray]) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for key, val in {"block_count": LAYERS, "context_length": 256, "embedding_length": E,
                     "feed_forward_length": INTER, "attention.head_count": HEADS,
                     "attention.head_count_kv": KV}.items():
        w.add_uint32(f"llama.{key}", val)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, arr in weights.items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{names[rest.removesuffix('.weight')]}.weight"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight",
                     "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _mutate(data: bytes, rng: random.Random, span: int) -> bytes:
    b = bytearray(data)
    kind = rng.choice(("flip", "cut", "insert"))
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(min(len(b), span))] = rng.randrange(256)
    elif kind == "cut":
        del b[rng.randrange(len(b)):]
    else:
        at = rng.randrange(min(len(b), span))
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(b)


def make_targets(root: Path) -> dict[str, tuple[bytes, Path, int, Callable[[], object]]]:
    """parser -> (valid bytes, where a mutant is written, header span, the call to make)."""
    weights = _weights()
    from safetensors.numpy import save_file

    model = root / "model"
    model.mkdir()
    save_file(weights, str(model / "model.safetensors"))
    (model / "config.json").write_text(json.dumps(_config()))
    _gguf(root / "m.gguf", weights)
    st = (model / "model.safetensors").read_bytes()
    return {
        "gguf": ((root / "m.gguf").read_bytes(), root / "x.gguf", 2048,
                 lambda: gguf_file.open_gguf(str(root / "x.gguf"), REGISTRY)),
        "safetensors": (st, root / "x.safetensors", 8 + int.from_bytes(st[:8], "little"),
                        lambda: read_safetensors_header(str(root / "x.safetensors"))),
        "config.json": ((model / "config.json").read_bytes(), model / "config.json", 4096,
                        lambda: hf.open_hf_dir(str(model), REGISTRY)),
    }


def fuzz(inputs: int, seconds: float = 0.0, seed: int = 0) -> dict:
    """Run `inputs` mutants per parser (or for `seconds` in all, when set); returns counts and
    the first examples of each unexpected outcome."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        targets = make_targets(Path(tmp))
        counts = collections.Counter()
        bad: collections.Counter = collections.Counter()
        examples: dict = {}
        deadline = time.monotonic() + seconds if seconds else None
        while deadline is None and min(counts[n] for n in targets) < inputs or \
                deadline is not None and time.monotonic() < deadline:
            for name, (valid, dest, span, call) in targets.items():
                dest.write_bytes(_mutate(valid, rng, span))
                t0 = time.monotonic()
                try:
                    call()
                except ALLOWED:
                    pass
                except Exception as exc:  # noqa: BLE001 - the finding
                    key = (name, type(exc).__name__)
                    bad[key] += 1
                    examples.setdefault(key, traceback.format_exc(limit=-3))
                if time.monotonic() - t0 > SLOW_S:
                    bad[(name, "slow")] += 1
                counts[name] += 1
                if name == "config.json":  # the model directory is shared by every round
                    dest.write_bytes(valid)
    return {"inputs": dict(counts), "unexpected": {f"{a}: {b}": n for (a, b), n in bad.items()},
            "examples": {f"{a}: {b}": e for (a, b), e in examples.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream_run.bench.fuzz_headers",
                                description=__doc__.split("\n")[0])
    p.add_argument("--inputs", type=int, default=100_000, help="mutants per parser")
    p.add_argument("--seconds", type=float, default=0.0, help="run for this long instead")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.monotonic()
    result = fuzz(args.inputs, args.seconds, args.seed)
    print(json.dumps({"inputs": result["inputs"], "unexpected": result["unexpected"],
                      "seconds": round(time.monotonic() - t0, 1), "seed": args.seed}))
    for key, text in result["examples"].items():
        print(f"--- {key}\n{text}", file=sys.stderr)
    return 1 if result["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
