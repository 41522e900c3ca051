"""Streaming detokenization, stop strings and size parsing."""

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from stream_run.engine.config import parse_size
from stream_run.engine.engine import _StopFilter
from stream_run.engine.tokenizer import Tokenizer
from stream_run.loaders import TokenizerData


def byte_tokenizer() -> Tokenizer:
    """A byte-level BPE with no merges: one token per byte, so multi-byte chars span tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    data = TokenizerData(tokenizer=tok, chat_template=None, bos_token=None, eos_token=None,
                         add_bos_token=False, eos_token_ids=[])
    return Tokenizer(data)


def test_streaming_detokenizer_never_emits_broken_utf8():
    tok = byte_tokenizer()
    text = "naïve café 日本語 🤖 ok"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode())
    detok = tok.detokenizer()
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some ids completed no character yet


@pytest.mark.parametrize("chunks, stops, out, stopped", [
    (["Hello wor", "ld. END", " more"], ["END"], "Hello world. ", True),
    (["ab", "c"], ["abd"], "abc", False),
    (["x<", "/s", ">y"], ["</s>"], "x", True),
])
def test_stop_filter(chunks, stops, out, stopped):
    f = _StopFilter(stops)
    got, hit = "", False
    for c in chunks:
        text, hit = f.feed(c)
        got += text
        if hit:
            break
    if not hit:
        got += f.feed("", final=True)[0]
    assert (got, hit) == (out, stopped)


@pytest.mark.parametrize("text, n", [("4GB", 4_000_000_000), ("512MiB", 512 * 2**20),
                                     ("1.5G", 1_500_000_000), ("123", 123)])
def test_parse_size(text, n):
    assert parse_size(text) == n


def test_parse_size_rejects_garbage():
    with pytest.raises(ValueError, match="not a size: 'lots'"):
        parse_size("lots")
