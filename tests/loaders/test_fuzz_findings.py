"""What the header fuzzer (bench/fuzz_headers.py) found in manifest.json, config.json and the
tokenizer files, one case each: every one is now a FormatError (ChatTemplateError for a chat
template) naming the file and field, where it was another exception before."""

from __future__ import annotations

import json
import time

import pytest

from stream_run.bench.fuzz_headers import _gguf_tokenizer_metadata, _write_tokenizer
from stream_run.engine.tokenizer import ChatTemplateError, Tokenizer
from stream_run.loaders import FormatError, hf, packed
from stream_run.loaders.tokenizer import load_tokenizer_dir, tokenizer_from_gguf
from stream_run.models import REGISTRY

DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError in json's decoder


@pytest.fixture
def tok_dir(tmp_path):
    _write_tokenizer(tmp_path)
    return tmp_path


def _edit(path, **fields) -> None:
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("fields, match", [
    ({"chat_template": [{"name": ["x"], "template": "hi"}]}, "chat_template must be"),  # TypeError
    ({"chat_template": [{"name": "default", "template": [1]}]}, "chat_template must be"),  # jinja
    ({"eos_token": "\udcff"}, "unpaired surrogate"),  # UnicodeEncodeError
], ids=["unhashable-template-name", "template-not-a-string", "lone-surrogate"])
def test_bad_tokenizer_config_fields(tok_dir, fields, match):
    _edit(tok_dir / "tokenizer_config.json", **fields)
    with pytest.raises(FormatError, match=match) as exc:
        load_tokenizer_dir(str(tok_dir))
    assert "tokenizer_config.json" in str(exc.value)


def test_tokenizer_config_nested_too_deeply(tok_dir):
    (tok_dir / "tokenizer_config.json").write_text('{"bos_token": ' + DEEP + "}")
    with pytest.raises(FormatError, match="nested too deeply"):  # RecursionError
        load_tokenizer_dir(str(tok_dir))


def test_tokenizer_json_that_cannot_encode_is_refused_at_load(tok_dir):
    data = json.loads((tok_dir / "tokenizer.json").read_text())
    data["model"]["unk_token"] = "<no such token>"  # encode raised on the first request
    (tok_dir / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match="cannot encode text"):
        load_tokenizer_dir(str(tok_dir))


@pytest.mark.parametrize("key, value, match", [
    ("tokens", ["a", ["b"]], "tokens must be an array of strings"),  # TypeError, AttributeError
    ("token_type", ["1"] * 64, "token_type must be an array of integers"),  # TypeError
    ("token_type", [1] * 3, "token_type has 3 entries for 64 tokens"),
    ("merges", ["He"], "is not two tokens"),  # tokenizers' Exception
    ("merges", ["x y"], "does not make a tokenizer"),  # Exception: token out of vocabulary
    ("unknown_token_id", 99, "not a token id"),  # IndexError
    ("bos_token_id", "0", "must be an integer"),
    ("pre", ["smollm"], "pre must be a string"),  # TypeError: unhashable
], ids=lambda v: str(v)[:20])
def test_bad_gguf_tokenizer_metadata(key, value, match):
    meta = _gguf_tokenizer_metadata()
    meta[f"tokenizer.ggml.{key}"] = value
    with pytest.raises(FormatError, match=match):
        tokenizer_from_gguf(meta, "m.gguf")


def test_gguf_scores_must_match_the_tokens():
    meta = {**_gguf_tokenizer_metadata(), "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.scores": [0.0] * 3}
    del meta["tokenizer.ggml.merges"]
    with pytest.raises(FormatError, match="scores has 3 entries"):  # silently cut before
        tokenizer_from_gguf(meta, "m.gguf")


@pytest.mark.parametrize("template", [
    "{{ 1/0 }}",  # ZeroDivisionError
    "{{ messages[0]['content'] + 1 }}",  # TypeError
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",  # RecursionError
    "{{ strftime_now(none) }}",  # TypeError in a global
])
def test_chat_template_errors_at_render_are_chat_template_errors(tok_dir, template):
    _edit(tok_dir / "tokenizer_config.json", chat_template=template)
    tok = Tokenizer(load_tokenizer_dir(str(tok_dir)))
    with pytest.raises(ChatTemplateError, match="failed to render"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_nested_too_deeply_is_a_chat_template_error(tok_dir):
    _edit(tok_dir / "tokenizer_config.json", chat_template="{{ " + "(" * 3000 + " }}")
    with pytest.raises(ChatTemplateError, match="nested too deeply"):  # RecursionError
        Tokenizer(load_tokenizer_dir(str(tok_dir)))


@pytest.fixture
def packed_dir(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({
        "format": packed.FORMAT_NAME, "version": 1,
        "units": {"embed": {"file": "model-embed.safetensors", "sha256": "0" * 64}}}))
    return tmp_path


@pytest.mark.parametrize("unit, match", [
    ({"file": "../../etc/passwd", "sha256": "0" * 64}, "'file' must name a file"),
    ({"file": ["x"], "sha256": "0" * 64}, "'file' must name a file"),  # TypeError
    ({"file": "model-embed.safetensors", "sha256": {"a": 1}}, "'sha256' must be 64 hex"),
    (["file"], "'file' must name a file"),
], ids=["path-outside", "file-a-list", "sha-an-object", "unit-a-list"])
def test_bad_manifest_units(packed_dir, unit, match):
    _edit(packed_dir / "manifest.json", units={"embed": unit})
    with pytest.raises(FormatError, match=match):
        packed.file_checksums(str(packed_dir))


def test_manifest_version_true_is_not_version_1(packed_dir):
    _edit(packed_dir / "manifest.json", version=True)
    with pytest.raises(FormatError, match="version True is not supported"):
        packed.read_manifest(str(packed_dir))


def test_manifest_and_config_nested_too_deeply(packed_dir):
    text = json.dumps({"format": packed.FORMAT_NAME, "version": 1, "units": "@"})
    (packed_dir / "manifest.json").write_text(text.replace('"@"', DEEP))
    assert not packed.is_packed_dir(str(packed_dir))  # RecursionError before
    with pytest.raises(FormatError, match="nested too deeply"):
        packed.read_manifest(str(packed_dir))
    (packed_dir / "config.json").write_text('{"model_type": ' + DEEP + "}")
    with pytest.raises(FormatError, match="nested too deeply"):
        hf.open_hf_dir(str(packed_dir), REGISTRY)


def test_tokenizer_json_that_panics_is_a_format_error(tok_dir):
    data = json.loads((tok_dir / "tokenizer.json").read_text())
    data["model"]["continuing_subword_prefix"] = "x" * 20  # a Rust panic (a BaseException)
    (tok_dir / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match="range end index"):
        load_tokenizer_dir(str(tok_dir))


def test_tokenizer_json_truncation_and_padding_are_not_applied(tok_dir):
    data = json.loads((tok_dir / "tokenizer.json").read_text())
    data["truncation"] = {"direction": "Right", "max_length": 13, "strategy": "LongestFirst",
                          "stride": 20}  # encode panicked; a valid one cut every prompt
    data["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None,
                       "pad_id": 0, "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    (tok_dir / "tokenizer.json").write_text(json.dumps(data))
    tok = load_tokenizer_dir(str(tok_dir)).tokenizer
    assert len(tok.encode("Hello, world! " * 10).ids) > 13
    assert 0 not in tok.encode("Hello").ids  # no padding ids


def test_gguf_array_count_past_the_end_is_refused_at_once(tmp_path):
    from stream_run.bench.fuzz_headers import _gguf, _weights
    from stream_run.loaders import open_model

    path = tmp_path / "m.gguf"
    _gguf(path, _weights())
    data = bytearray(path.read_bytes())
    at = data.index(b"tokenizer.ggml.token_type") + len("tokenizer.ggml.token_type") + 8
    data[at:at + 8] = (3_342_400).to_bytes(8, "little")  # gguf-py walked it for ~40 s
    data += bytes(-(len(data) - at - 8) % 4)  # its reads past the end: empty, not an error
    path.write_bytes(bytes(data))
    t0 = time.monotonic()
    with pytest.raises(FormatError, match="the array tokenizer.ggml.token_type of 3342400 "
                       "items at byte"):
        open_model(str(path), REGISTRY)
    assert time.monotonic() - t0 < 1


@pytest.mark.parametrize("template", [
    "{{ 'a' * 99999999 }}",  # a 100 MB string (libFuzzer: out of memory)
    "{{ messages * 99999999 }}",
    "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}",
    "{{ 10 ** 99999999 }}",
])
def test_chat_template_that_builds_too_much_is_refused_at_once(tok_dir, template):
    _edit(tok_dir / "tokenizer_config.json", chat_template=template)
    tok = Tokenizer(load_tokenizer_dir(str(tok_dir)))
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError, match="builds more than|raises to the power"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 1
    _edit(tok_dir / "tokenizer_config.json", chat_template="{{ '=' * 8 }}{{ 2 ** 10 }}")
    assert Tokenizer(load_tokenizer_dir(str(tok_dir))).apply_chat_template([]) == "========1024"


def test_gguf_bos_token_that_cannot_lead_a_template():
    meta = _gguf_tokenizer_metadata()
    meta["tokenizer.ggml.tokens"][0] = "Ġw <s>"  # ValueError from TemplateProcessing before
    meta["tokenizer.ggml.add_bos_token"] = True
    with pytest.raises(FormatError, match="cannot be made to lead every prompt"):
        tokenizer_from_gguf(meta, "m.gguf")
