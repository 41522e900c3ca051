"""Mutation fuzzing of the header parsers: GGUF, safetensors, config.json, stream-convert's
manifest.json, and the tokenizer files (tokenizer.json, tokenizer_config.json with its chat
template, a GGUF's tokenizer.ggml.* metadata).

    python -m stream_run.bench.fuzz_headers [--inputs 100000] [--seconds 0] [--seed 0]
                                            [--only manifest.json,tokenizer.json]
    python -m stream_run.bench.fuzz_headers --atheris DIR --only tokenizer.json

Each input is a valid tiny file with bytes flipped, cut or inserted (in the header, where the
parsers work) or, for the JSON files and the GGUF tokenizer metadata, with one value of the
parsed document swapped for another type, an edge value, a long or deeply nested one, or
deleted. A mutant whose outcome is new (error type and message shape) joins the corpus that
later mutants start from, so mutations stack past the first check that refuses them.

The only allowed outcome is one of the project's errors (FormatError, MissingTensorError,
ReadError; ChatTemplateError for the tokenizer targets, which also compile the chat template,
encode, decode and render a chat) or a clean open, within 2 s: anything else, or a slow input,
is reported with the first few examples and makes the exit code 1. A Python-level hang is cut
at 2 s (SIGALRM); a native one ends the run with a traceback dump after 60 s. --atheris runs
one parser under libFuzzer instead (coverage-guided; atheris is not a dependency).
tests/loaders/test_fuzz.py runs a short sweep; the closing notes report the long ones.
"""

from __future__ import annotations

import argparse
import collections
import copy
import faulthandler
import json
import math
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stream_run.engine.tokenizer import ChatTemplateError, Tokenizer
from stream_run.loaders import (
    FormatError,
    LoaderConfig,
    MissingTensorError,
    ReadError,
    UnitReader,
    hf,
    open_model,
    packed,
)
from stream_run.loaders.safetensors_file import read_safetensors_header
from stream_run.loaders.tokenizer import load_tokenizer_dir, tokenizer_from_gguf
from stream_run.models import REGISTRY

ALLOWED = (FormatError, MissingTensorError, ReadError)
TOKENIZER_ALLOWED = (*ALLOWED, ChatTemplateError)
SLOW_S = 2.0
NATIVE_HANG_S = 60.0
CORPUS_MAX = 64  # mutants kept per target for further mutation
E, INTER, HEADS, KV, LAYERS, VOCAB = 32, 64, 4, 2, 2, 64
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SAMPLE = "Hello, world! <|im_start|>user 123 naïve 日本 🤖\n\t "


class _Slow(BaseException):
    """Raised by SIGALRM in an input that runs past SLOW_S (a BaseException, so that the
    parsers' own `except Exception` cannot turn it into an allowed error)."""


@dataclass
class Target:
    """One parser under test: a valid file, where mutants go, and the call that parses it."""

    valid: bytes
    dest: Path
    span: int  # byte mutations land in the first `span` bytes (the header)
    call: Callable[[], object]
    structured: bool = False  # a JSON document: value-level mutations too
    allowed: tuple[type[BaseException], ...] = ALLOWED
    restore: bool = False  # write the valid file back after each input (a shared directory)
    corpus: list[bytes] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)


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


def _tokens() -> list[str]:
    """VOCAB byte-level tokens: the specials, single bytes, and a few merged pairs."""
    from tokenizers import pre_tokenizers

    needed = ["H", "e", "l", "o", "w", "r", "d", ",", "!", "Ġ"]
    pairs = ["He", "ll", "llo", "Ġw", "or", "ld"]
    fill = [c for c in sorted(pre_tokenizers.ByteLevel.alphabet()) if c not in needed]
    singles = needed + fill[:VOCAB - len(SPECIALS) - len(needed) - len(pairs)]
    return SPECIALS + singles + pairs


def _gguf_tokenizer_metadata() -> dict[str, Any]:
    tokens = _tokens()
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3] * len(SPECIALS) + [1] * (len(tokens) - 3),
            "tokenizer.ggml.merges": ["H e", "l l", "ll o", "Ġ w", "o r", "l d"],
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHATML}


def _gguf(path: Path, weights: dict[str, np.ndarray]) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for key, val in {"block_count": LAYERS, "context_length": 256, "embedding_length": E,
                     "feed_forward_length": INTER, "attention.head_count": HEADS,
                     "attention.head_count_kv": KV}.items():
        w.add_uint32(f"llama.{key}", val)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    meta = _gguf_tokenizer_metadata()
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        w.add_string(key, meta[key])
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        w.add_array(key, meta[key])
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
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


def _write_tokenizer(model: Path) -> None:
    """tokenizer.json and tokenizer_config.json, built from the GGUF metadata's vocabulary."""
    data = tokenizer_from_gguf(_gguf_tokenizer_metadata(), "fuzz")
    data.tokenizer.save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": {"content": "<|im_end|>", "special": True},
        "add_bos_token": False, "chat_template": [{"name": "default", "template": CHATML}],
        "model_max_length": 256}))


# --- mutations --------------------------------------------------------------------------------


def _mutate(data: bytes, rng: random.Random, span: int) -> bytes:
    if not data:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
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


DEEP = "\u0000deep\u0000"  # stands for a deeply nested array, spliced in after json.dumps
JINJA_BITS = ["{{", "}}", "{%", "%}", "{#", "#}", "{% endfor %}", "{% if x %}", "{{ 1/0 }}",
              "{{ messages[0]['content'] + 1 }}", "{{ raise_exception('no') }}",
              "{% for i in range(99999999) %}{% for j in range(99999999) %}",
              "{{ '%s' % messages }}", "{{ messages.__class__ }}", "{{ x.y.z }}",
              "{% set x = [] %}{{ x[5] }}", "{{ 'a' * 99999999 }}", "{{ (1,2) | join }}",
              "{{ 10 ** 10 ** 10 }}", "{{ strftime_now(none) }}", "{{ message | tojson }}",
              "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "\x00", "\udcff",
              "{{ " + "(" * 3000, ")" * 3000 + " }}", "{% if a %}" * 3000]


EDGE_VALUES = [None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, -2**63, 10**400, 1e308, -1e308,
               0.5, math.nan, math.inf, "", "x", "ĠĠ", "<|im_end|>", "\udcff", "a b c", [], {},
               [1, "a"], [None], {"content": 5}, {"name": [], "template": 3},
               [{"name": None, "template": None}], [[1, 2], [3]], ["a"], [0, 0, 0],
               "llama", "gpt2", "smollm", "llama-bpe", "qwen2", "default", [0.5, -1.0]]


def _weird(rng: random.Random) -> Any:
    """A value of a random type, an edge value, or a large one."""
    choice = rng.randrange(20)
    if choice < 12:
        return copy.deepcopy(rng.choice(EDGE_VALUES))
    if choice == 12:
        return DEEP
    if choice == 13:
        return "x" * rng.choice([1000, 100_000, 1_000_000])
    if choice == 14:
        return [rng.randrange(-5, 2**40) for _ in range(rng.choice([1, 100, 10_000]))]
    if choice == 15:
        return ["".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randint(0, 4)))
                for _ in range(rng.choice([1, 100, 10_000]))]
    if choice == 16:
        return rng.choice(JINJA_BITS)
    if choice == 17:
        return rng.uniform(-1e6, 1e6)
    if choice == 18:
        return rng.randrange(-300, 70_000)
    return {str(rng.randrange(9)): _weird(rng) for _ in range(rng.randint(0, 3))}


def _slots(node: Any, out: list[tuple[Any, Any]], limit: int = 5000) -> None:
    """(container, key) of every value in a JSON document (up to `limit`)."""
    stack = [node]
    while stack and len(out) < limit:
        cur = stack.pop()
        items = cur.items() if isinstance(cur, dict) else enumerate(cur) \
            if isinstance(cur, list) else ()
        for key, value in items:
            out.append((cur, key))
            if isinstance(value, (dict, list)):
                stack.append(value)


def _mutate_string(text: str, rng: random.Random) -> str:
    at = rng.randrange(len(text) + 1)
    kind = rng.randrange(4)
    if kind == 0:
        return text[:at] + rng.choice(JINJA_BITS) + text[at:]
    if kind == 1:
        return text[:at] + text[at + rng.randint(1, 8):]
    if kind == 2:
        return text[:at] + chr(rng.randrange(0x110000)) + text[at:]
    return text * rng.randint(2, 4)


def _mutate_json(data: bytes, rng: random.Random) -> bytes | None:
    """One value-level change to a JSON document; None when data is not valid JSON."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    slots: list[tuple[Any, Any]] = []
    _slots(doc, slots)
    for _ in range(rng.randint(1, 3)):
        if not slots:
            doc = _weird(rng)
            break
        container, key = rng.choice(slots)
        value = container[key]
        kind = rng.randrange(10)
        if kind < 5:
            container[key] = _weird(rng)
        elif kind < 7 and isinstance(value, str):
            container[key] = _mutate_string(value, rng)
        elif kind < 8:
            if isinstance(container, dict):
                del container[key]
            else:
                container.pop(key)
            slots = []
            _slots(doc, slots)
        elif kind < 9 and isinstance(container, dict):
            container[rng.choice(list(container) + ["extra"]) + rng.choice(["", "_"])] = \
                _weird(rng)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            container[key] = rng.choice([value + 1, value - 1, -value, value * 1000, value // 2])
        else:
            container[key] = _weird(rng)
    text = json.dumps(doc, ensure_ascii=rng.random() < 0.5)
    depth = rng.choice([100, 10_000, 200_000])
    text = text.replace(json.dumps(DEEP), "[" * depth + "]" * depth)
    return text.encode("utf-8", "surrogatepass")


def _gguf_values(meta: Any) -> Any:
    """A JSON-decoded metadata dict as GGUF values (no null, no object) for the GGUF
    tokenizer target: what gguf-py's reader could hand over."""
    if isinstance(meta, dict):
        return [_gguf_values(v) for v in meta.values()]
    if isinstance(meta, list):
        return [_gguf_values(v) for v in meta]
    if isinstance(meta, str):  # gguf-py decodes strictly: no lone surrogates
        return meta.encode("utf-8", "replace").decode()
    return 0 if meta is None else meta


# --- targets ----------------------------------------------------------------------------------


def _use_tokenizer(data: Any) -> None:
    """What the engine does with a tokenizer at load and on a first chat request."""
    tok = Tokenizer(data)
    ids = tok.encode(SAMPLE)
    tok.decode(ids)
    detok = tok.detokenizer()
    for i in ids[:8]:
        detok.add(i)
    detok.flush()
    if tok.has_chat_template:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def make_targets(root: Path) -> dict[str, Target]:
    """parser name -> Target."""
    weights = _weights()
    from safetensors.numpy import save_file

    from stream_run.convert.convert import convert_model

    model = root / "model"
    model.mkdir()
    save_file(weights, str(model / "model.safetensors"))
    (model / "config.json").write_text(json.dumps(_config()))
    _write_tokenizer(model)
    _gguf(root / "m.gguf", weights)
    packed_dir = root / "packed"
    convert_model(str(model), str(packed_dir), recipe="none", progress=False)
    tok_dir = root / "tok"
    tok_dir.mkdir()
    _write_tokenizer(tok_dir)
    st = (model / "model.safetensors").read_bytes()
    gguf_bytes = (root / "m.gguf").read_bytes()
    meta_path = root / "meta.json"

    def manifest() -> None:
        packed.is_packed_dir(str(packed_dir))
        source = open_model(str(packed_dir), REGISTRY)
        reader = UnitReader(source.index, LoaderConfig(verify=True))
        try:
            reader.read("layers.0")
        finally:
            reader.close()

    def gguf_tokenizer() -> None:
        try:  # the JSON file only carries the metadata values: its own errors do not count
            meta = json.loads(meta_path.read_bytes())
        except (ValueError, RecursionError):
            return
        meta = {k: _gguf_values(v) for k, v in (meta.items() if isinstance(meta, dict) else ())
                if v is not None}
        _use_tokenizer(tokenizer_from_gguf(meta, str(meta_path)))

    return {
        "gguf": Target(gguf_bytes, root / "x.gguf", 8192,
                       lambda: open_model(str(root / "x.gguf"), REGISTRY)),
        "safetensors": Target(st, root / "x.safetensors", 8 + int.from_bytes(st[:8], "little"),
                              lambda: read_safetensors_header(str(root / "x.safetensors"))),
        "config.json": Target((model / "config.json").read_bytes(), model / "config.json", 4096,
                              lambda: hf.open_hf_dir(str(model), REGISTRY), structured=True,
                              restore=True),
        "manifest.json": Target((packed_dir / "manifest.json").read_bytes(),
                                packed_dir / "manifest.json", 1 << 20, manifest,
                                structured=True, restore=True),
        "tokenizer.json": Target((tok_dir / "tokenizer.json").read_bytes(),
                                 tok_dir / "tokenizer.json", 1 << 20,
                                 lambda: _use_tokenizer(load_tokenizer_dir(str(tok_dir))),
                                 structured=True, allowed=TOKENIZER_ALLOWED, restore=True),
        "tokenizer_config.json": Target(
            (tok_dir / "tokenizer_config.json").read_bytes(), tok_dir / "tokenizer_config.json",
            1 << 20, lambda: _use_tokenizer(load_tokenizer_dir(str(tok_dir))), structured=True,
            allowed=TOKENIZER_ALLOWED, restore=True),
        "gguf tokenizer.*": Target(json.dumps(_gguf_tokenizer_metadata()).encode(), meta_path,
                                   1 << 20, gguf_tokenizer, structured=True,
                                   allowed=TOKENIZER_ALLOWED),
    }


def _outcome(exc: BaseException | None) -> str:
    """An outcome's shape: the error type and its message without numbers, paths or quotes."""
    if exc is None:
        return "ok"
    text = re.sub(r"/\S+|'[^']*'|\"[^\"]*\"|\d+", "_", str(exc))[:60]
    return f"{type(exc).__name__}: {text}"


def _next_input(target: Target, rng: random.Random) -> bytes:
    parent = rng.choice(target.corpus) if target.corpus and rng.random() < 0.5 else target.valid
    if target.structured and rng.random() < 0.7:
        mutant = _mutate_json(parent, rng)
        if mutant is not None:
            return mutant
    return _mutate(parent, rng, target.span)


def _where(exc: BaseException) -> str:
    """The innermost frame of the traceback inside stream_run (file:line), else the last."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "stream_run" in f.filename or "/loaders/" in f.filename
            or "/engine/" in f.filename]
    frame = (ours or frames)[-1]
    path = Path(frame.filename)
    return f"{path.parent.name}/{path.name}:{frame.lineno}"


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Slow(f"no result within {SLOW_S} s")


def fuzz(inputs: int, seconds: float = 0.0, seed: int = 0, only: list[str] | None = None
         ) -> dict:
    """Run `inputs` mutants per parser (or for `seconds` in all, when set); returns counts and
    the first examples of each unexpected outcome."""
    rng = random.Random(seed)
    # tokenizers' panics are expected outcomes here: a symbolized backtrace each takes seconds
    os.environ["RUST_BACKTRACE"] = "0"
    alarm = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGALRM, _on_alarm) if alarm else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            targets = make_targets(Path(tmp))
            if only:
                targets = {name: targets[name] for name in only}
            return _run(targets, rng, inputs, seconds, alarm)
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _run(targets: dict[str, Target], rng: random.Random, inputs: int, seconds: float,
         alarm: bool) -> dict:
    counts: collections.Counter = collections.Counter()
    bad: collections.Counter = collections.Counter()
    examples: dict = {}
    found: dict = {}  # the whole first input of each finding
    deadline = time.monotonic() + seconds if seconds else None
    while deadline is None and min(counts[n] for n in targets) < inputs or \
            deadline is not None and time.monotonic() < deadline:
        for name, target in targets.items():
            data = _next_input(target, rng)
            target.dest.write_bytes(data)
            faulthandler.dump_traceback_later(NATIVE_HANG_S, exit=True)
            t0 = time.monotonic()
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, SLOW_S)
            error: BaseException | None = None
            try:
                target.call()
            except target.allowed as exc:
                error = exc
            except _Slow:
                bad[(name, "slow")] += 1
                examples.setdefault((name, "slow"), data)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: BLE001 - the finding (a Rust panic, too)
                key = (name, f"{type(exc).__name__} at {_where(exc)}")
                bad[key] += 1
                examples.setdefault(key, traceback.format_exc(limit=-3)
                                    + f"input (first 500 bytes): {data[:500]!r}")
            finally:
                if alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                faulthandler.cancel_dump_traceback_later()
            if time.monotonic() - t0 > SLOW_S and (name, "slow") not in examples:
                bad[(name, "slow")] += 1
                examples[(name, "slow")] = data
            for key in bad:
                found.setdefault(key, data)
            shape = _outcome(error)
            if shape not in target.seen:  # a new outcome: worth mutating further
                target.seen.add(shape)
                if len(data) < 1 << 20:
                    target.corpus.append(data)
                    del target.corpus[:-CORPUS_MAX]
            counts[name] += 1
            if target.restore:  # a directory shared by every round
                target.dest.write_bytes(target.valid)
    return {"inputs": dict(counts), "unexpected": {f"{a}: {b}": n for (a, b), n in bad.items()},
            "examples": {f"{a}: {b}": e for (a, b), e in examples.items()},
            "found": {f"{a}: {b}": d for (a, b), d in found.items()},
            "outcomes": {name: len(t.seen) for name, t in targets.items()}}


def fuzz_atheris(name: str, inputs: int, seed: int, workdir: str) -> None:
    """Coverage-guided: libFuzzer (atheris) on one parser, the same rule; for the JSON
    documents half of the mutations are fuzz()'s value-level ones. Does not return: libFuzzer
    exits 0 after `inputs` runs, or non-zero on a finding, its input saved in workdir."""
    import atheris

    os.environ["RUST_BACKTRACE"] = "0"  # as in fuzz()
    targets = make_targets(Path(tempfile.mkdtemp(dir=workdir)))
    target = targets[name]
    corpus = Path(workdir) / f"corpus-{name.replace(' ', '_').replace('*', 'x')}"
    corpus.mkdir(exist_ok=True)
    (corpus / "valid").write_bytes(target.valid)

    def one(data: bytes) -> None:
        target.dest.write_bytes(data)
        try:
            target.call()
        except target.allowed:
            pass
        finally:
            if target.restore:
                target.dest.write_bytes(target.valid)

    def mutate(data: bytes, max_size: int, mutation_seed: int) -> bytes:
        rng = random.Random(mutation_seed)
        if target.structured and rng.random() < 0.5:
            mutant = _mutate_json(data, rng)
            if mutant is not None and len(mutant) <= max_size:
                return mutant
        return atheris.Mutate(data, max_size)

    atheris.instrument_all()
    atheris.Setup([sys.argv[0], f"-runs={inputs}", f"-seed={seed + 1}", f"-timeout={SLOW_S:g}",
                   f"-max_len={max(len(target.valid) * 4, 65536)}",
                   f"-artifact_prefix={workdir}/", "-print_final_stats=1", str(corpus)],
                  one, custom_mutator=mutate)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream_run.bench.fuzz_headers",
                                description=__doc__.split("\n")[0])
    p.add_argument("--inputs", type=int, default=100_000, help="mutants per parser")
    p.add_argument("--seconds", type=float, default=0.0, help="run for this long instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None,
                   help="comma-separated parsers (default all: gguf, safetensors, config.json, "
                   "manifest.json, tokenizer.json, tokenizer_config.json, gguf tokenizer.*)")
    p.add_argument("--save", metavar="DIR", default=None,
                   help="write the whole first input of each finding here")
    p.add_argument("--atheris", metavar="DIR", default=None,
                   help="coverage-guided instead (pip install atheris): libFuzzer on the one "
                   "--only parser, its corpus and findings in DIR")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    only = args.only.split(",") if args.only else None
    if args.atheris:
        if not only or len(only) != 1:
            p.error("--atheris fuzzes one parser: give it with --only")
        fuzz_atheris(only[0], args.inputs, args.seed, args.atheris)
    result = fuzz(args.inputs, args.seconds, args.seed, only)
    print(json.dumps({"inputs": result["inputs"], "unexpected": result["unexpected"],
                      "outcomes": result["outcomes"],
                      "seconds": round(time.monotonic() - t0, 1), "seed": args.seed}))
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        for key, data in result["found"].items():
            Path(args.save, re.sub(r"[^\w.-]+", "_", key)).write_bytes(data)
    for key, text in result["examples"].items():  # a slow input: its bytes, abridged
        print(f"--- {key}\n{text if isinstance(text, str) else repr(text[:2000])}",
              file=sys.stderr)
    return 1 if result["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
