"""Tokenizers from an HF model directory (tokenizer.json) or from GGUF metadata.

A GGUF has no tokenizer.json: it stores the vocabulary, merges and special ids under
llama.cpp's keys, and names its pre-tokenizer by `tokenizer.ggml.pre`. We rebuild the same
`tokenizers.Tokenizer` the model's own tokenizer.json describes.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from tokenizers import pre_tokenizers as pre

from stream_run.loaders.errors import FormatError


@dataclass
class TokenizerData:
    """A ready `tokenizers.Tokenizer` plus what the engine needs around it. Special tokens in
    text (e.g. "<|im_start|>") encode whole; BOS is added by the post-processor only when
    add_bos_token is set (GGUF) or tokenizer.json says so (HF)."""

    tokenizer: Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    add_bos_token: bool
    eos_token_ids: list[int]


# llama.cpp token_type values (llama_token_type)
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4

# The Split regexes of the HF tokenizer.json each pre type came from (llama.cpp's
# llama-vocab.cpp spells the same with (?i:...) expanded).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2() -> pre.PreTokenizer:
    return pre.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm() -> pre.PreTokenizer:
    # llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM: "\p{N}" then the GPT-2 regex
    return pre.Sequence([pre.Digits(individual_digits=True), _gpt2()])


def _split(regex: str) -> pre.PreTokenizer:
    return pre.Sequence([pre.Split(Regex(regex), behavior="isolated", invert=False),
                         pre.ByteLevel(add_prefix_space=False, use_regex=False)])


# tokenizer.ggml.pre -> (pre-tokenizer, normalizer, ignore_merges), as in the model's tokenizer.json
BPE_PRE_TYPES: dict[str, tuple[Any, Any, bool]] = {
    "default": (_gpt2, None, False),
    "gpt2": (_gpt2, None, False),
    "gpt-2": (_gpt2, None, False),
    "smollm": (_smollm, None, False),
    "llama-bpe": (lambda: _split(LLAMA3_SPLIT), None, True),
    "llama3": (lambda: _split(LLAMA3_SPLIT), None, True),
    "llama-v3": (lambda: _split(LLAMA3_SPLIT), None, True),
    "qwen2": (lambda: _split(QWEN2_SPLIT), normalizers.NFC, False),
}


def load_tokenizer_dir(model_dir: str) -> TokenizerData:
    """Load tokenizer.json plus tokenizer_config.json, chat_template.jinja, generation_config.json.

    Raises:
        FormatError: tokenizer.json is missing or unreadable, or a config is not valid JSON.
    """
    tok_path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(tok_path):
        raise FormatError(
            f"{model_dir}: no tokenizer.json (only fast tokenizers are supported); hint: create "
            "it with transformers: AutoTokenizer.from_pretrained(d).save_pretrained(d)"
        )
    with _tokenizers_errors(f"{tok_path}: cannot load tokenizer"):
        tok = Tokenizer.from_file(tok_path)
    # as transformers does: a file's truncation and padding apply only when a call asks
    tok.no_truncation()
    tok.no_padding()
    _check_encodes(tok, tok_path)
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    cfg = _read_json(cfg_path)
    template = _chat_template(cfg.get("chat_template"), cfg_path)
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.exists(jinja_path):
        try:
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise FormatError(f"{jinja_path}: cannot read chat template: {exc}") from None
    bos, eos = _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token"))
    add_bos = cfg.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = _post_processor_adds(tok, bos)
    eos_ids = _eos_ids(_read_json(os.path.join(model_dir, "generation_config.json")))
    if not eos_ids:
        eos_ids = _eos_ids(_read_json(os.path.join(model_dir, "config.json")))
    eos_id = tok.token_to_id(eos) if eos else None
    if eos_id is not None and eos_id not in eos_ids:
        eos_ids.append(eos_id)
    return TokenizerData(tok, template, bos, eos, add_bos, eos_ids)


def tokenizer_from_gguf(metadata: dict[str, Any], path: str) -> TokenizerData:
    """Build the tokenizer a GGUF file's tokenizer.* metadata describes.

    Raises:
        FormatError: no vocabulary, or an unsupported tokenizer.ggml.model / .pre type.
    """
    from stream_run.loaders.gguf_file import eos_token_ids

    metadata = _checked_gguf(metadata, path)
    tokens = metadata["tokenizer.ggml.tokens"]
    kind = metadata.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise FormatError(f"{path}: unsupported tokenizer.ggml.model {kind!r}; supported: "
                          "gpt2 (byte-level BPE), llama (SentencePiece BPE)")
    with _tokenizers_errors(f"{path}: the tokenizer.ggml.* metadata does not make a tokenizer"):
        tok = _byte_level_bpe(metadata, path) if kind == "gpt2" else _sentencepiece_bpe(metadata)
        _add_special_tokens(tok, tokens, metadata.get("tokenizer.ggml.token_type"),
                            kind == "gpt2")

    def token(key: str) -> str | None:
        idx = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[idx] if isinstance(idx, int) and 0 <= idx < len(tokens) else None

    bos = token("bos_token_id")
    # llama.cpp adds BOS by default for SentencePiece and llama3 vocabularies
    default_bos = kind == "llama" or metadata.get("tokenizer.ggml.pre") in ("llama-bpe", "llama3")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", default_bos))
    if add_bos and bos is not None:
        with _tokenizers_errors(f"{path}: tokenizer.ggml.bos_token_id names {bos!r}, which "
                                "cannot be made to lead every prompt"):
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1",
                special_tokens=[(bos, metadata["tokenizer.ggml.bos_token_id"])])
    _check_encodes(tok, path)
    template = metadata.get("tokenizer.chat_template")
    return TokenizerData(tok, template if isinstance(template, str) else None, bos,
                         token("eos_token_id"), add_bos, eos_token_ids(metadata))


# tokenizer.ggml.* arrays: (element types, element name); a corrupt file can hold any type
_GGUF_ARRAYS = {"tokens": (str, "strings"), "token_type": (int, "integers"),
                "merges": (str, "strings"), "scores": ((int, float), "numbers")}
_GGUF_IDS = ("bos_token_id", "eos_token_id", "eot_token_id", "eom_token_id",
             "unknown_token_id")


def _checked_gguf(meta: dict[str, Any], path: str) -> dict[str, Any]:
    """The tokenizer.ggml.* values checked for type and range before any is used (corrupt
    files hold anything); returns meta.

    Raises:
        FormatError: naming the key, what it should be and what it is.
    """
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise FormatError(f"{path}: no tokenizer.ggml.tokens metadata; the GGUF has no tokenizer")
    for name, (kind, what) in _GGUF_ARRAYS.items():
        val = meta.get(f"tokenizer.ggml.{name}")
        if val is None:
            continue
        if not isinstance(val, list) or not all(isinstance(v, kind) and not isinstance(v, bool)
                                                for v in val):
            raise FormatError(f"{path}: tokenizer.ggml.{name} must be an array of {what}, got "
                              f"{_describe(val)}")
        if name in ("token_type", "scores") and len(val) != len(tokens):
            raise FormatError(f"{path}: tokenizer.ggml.{name} has {len(val)} entries for "
                              f"{len(tokens)} tokens; expected one per token")
    if meta.get("tokenizer.ggml.model") == "llama" and "tokenizer.ggml.merges" not in meta \
            and "tokenizer.ggml.scores" not in meta:
        raise FormatError(f"{path}: a llama (SentencePiece) tokenizer needs "
                          "tokenizer.ggml.merges or tokenizer.ggml.scores; the file has neither")
    bad = next((m for m in meta.get("tokenizer.ggml.merges", ()) if " " not in m[1:-1]), None)
    if bad is not None:
        raise FormatError(f"{path}: tokenizer.ggml.merges entry {bad[:40]!r} is not two tokens "
                          "separated by a space")
    for name in _GGUF_IDS:
        val = meta.get(f"tokenizer.ggml.{name}")
        if val is not None and (isinstance(val, bool) or not isinstance(val, int)):
            raise FormatError(f"{path}: tokenizer.ggml.{name} must be an integer, got "
                              f"{_describe(val)}")
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    if unk is not None and not 0 <= unk < len(tokens):
        raise FormatError(f"{path}: tokenizer.ggml.unknown_token_id={unk} is not a token id "
                          f"(the vocabulary has {len(tokens)})")
    pre_type = meta.get("tokenizer.ggml.pre")
    if pre_type is not None and not isinstance(pre_type, str):
        raise FormatError(f"{path}: tokenizer.ggml.pre must be a string, got "
                          f"{_describe(pre_type)}")
    return meta


def _describe(value: Any) -> str:
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value})
        return f"an array of {'/'.join(kinds) or 'nothing'}"
    return f"{type(value).__name__} {repr(value)[:40]}"


PROBE = "Hello, world! 123 naïve 日本 🤖\n\t  <|im_start|>"


def _check_encodes(tok: Tokenizer, path: str) -> None:
    """Encode and decode a probe text once at load: a tokenizer that cannot (an unk token
    missing from its vocabulary, say) fails here, named, not on a user's first request."""
    with _tokenizers_errors(f"{path}: the tokenizer it describes cannot encode text"):
        tok.decode(tok.encode(PROBE, add_special_tokens=True).ids)


@contextlib.contextmanager
def _tokenizers_errors(what: str) -> Iterator[None]:
    """tokenizers' errors as FormatError(what: ...): it raises plain Exception, or panics (a
    pyo3 PanicException, which is a BaseException) on values its Rust code did not expect."""
    try:
        yield
    except FormatError:
        raise
    except Exception as exc:
        raise FormatError(f"{what}: {exc}") from None
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        raise FormatError(f"{what}: {exc}") from None


def _byte_level_bpe(meta: dict[str, Any], path: str) -> Tokenizer:
    pre_type = meta.get("tokenizer.ggml.pre", "default")
    if pre_type not in BPE_PRE_TYPES:
        raise FormatError(
            f"{path}: unsupported tokenizer.ggml.pre {pre_type!r} for a gpt2 (byte-level BPE) "
            f"tokenizer; supported: {', '.join(BPE_PRE_TYPES)}"
        )
    make_pre, make_norm, ignore_merges = BPE_PRE_TYPES[pre_type]
    alphabet = set(pre.ByteLevel.alphabet())
    spell = dict(zip(range(256), _byte_chars(), strict=True))
    # A token outside the byte alphabet is a mislabelled added token: spell its UTF-8 bytes
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode()): i
             for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False,
                               ignore_merges=ignore_merges))
    tok.pre_tokenizer = make_pre()
    if make_norm is not None:
        tok.normalizer = make_norm()
    tok.decoder = decoders.ByteLevel()
    return tok


def _byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode(): the printable stand-in character of each byte value."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _sentencepiece_bpe(meta: dict[str, Any]) -> Tokenizer:
    """SentencePiece BPE with byte fallback, as HF's LlamaTokenizer (legacy=False) builds it."""
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(vocab, dict(zip(tokens, meta["tokenizer.ggml.scores"],
                                                     strict=False)))
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                               unk_token=tokens[unk] if isinstance(unk, int) else None))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre.Metaspace(replacement="\u2581", split=False,
                                      prepend_scheme="first" if prefix else "never")
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SentencePiece has no merge list: every split of a token into two vocab pieces is a
    merge, ranked by the merged token's score (HF's generate_merges)."""
    merges = []
    for token, score in scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _add_special_tokens(tok: Tokenizer, tokens: list[str], types: list[int] | None,
                        byte_level: bool) -> None:
    """Control (and unknown) tokens become special and user-defined ones added tokens, so
    all stay whole in text, as llama.cpp matches them."""
    alphabet = set(pre.ByteLevel.alphabet()) if byte_level else None
    control, user = [], []
    for token, kind in zip(tokens, types or (), strict=False):
        if kind in (UNKNOWN, CONTROL) and (alphabet is None or set(token) <= alphabet):
            control.append(AddedToken(token, special=True, normalized=False))
        elif kind == USER_DEFINED and tok.token_to_id(token) is not None:
            user.append(AddedToken(token, special=False, normalized=False))
    tok.add_special_tokens(control)
    tok.add_tokens(user)


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:  # json's decoder recurses per nesting level
        raise FormatError(f"{path}: not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    try:  # "\udcff" is valid JSON but no text: it would fail in the tokenizer, later
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        raise FormatError(f"{path}: a string holds an unpaired surrogate "
                          f"({exc.object[exc.start:exc.end]!r}), which is not text") from None
    return data


def _chat_template(value: Any, path: str) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {name, template}.

    Raises:
        FormatError: any other shape (a template that is not a string, say).
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        named = {t["name"]: t["template"] for t in value}
        return named.get("default") or next(iter(named.values()), None)
    raise FormatError(f"{path}: chat_template must be a string or a list of {{\"name\": ..., "
                      f"\"template\": ...}} strings, got {_describe(value)}")


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _post_processor_adds(tok: Tokenizer, bos: str | None) -> bool:
    """Whether tokenizer.json's post-processor itself prepends BOS (e.g. Llama 3)."""
    bos_id = tok.token_to_id(bos) if bos else None
    ids = tok.encode("a", add_special_tokens=True).ids
    return bos_id is not None and bool(ids) and ids[0] == bos_id


def _eos_ids(cfg: dict[str, Any]) -> list[int]:
    val = cfg.get("eos_token_id")
    vals = val if isinstance(val, list) else [val]
    return [v for v in vals if isinstance(v, int) and not isinstance(v, bool)]
