"""Models where users keep them (issue 22): fake stores with the real layouts in a temp dir (an
HF hub cache that huggingface_hub's own scan_cache_dir reads, an Ollama manifest and blobs, an
LM Studio folder) around tiny models; each name resolves, opens and runs, nothing downloads,
and each bad case is one line naming what was asked and where it looked."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from stream_run.bench.synth import SynthSpec
from stream_run.bench.synth_gguf import synthesize_gguf
from stream_run.cli import run as cli_run
from stream_run.loaders import FormatError
from stream_run.loaders.stores import list_models, resolve
from stream_run.models import open_model
from tests.tiny_models import write_tiny_model

huggingface_hub = pytest.importorskip("huggingface_hub")
SPEC = SynthSpec(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
REV = "a" * 40
OLD_REV = "b" * 40


@pytest.fixture
def stores(tmp_path, monkeypatch):
    """HF_HUB_CACHE, OLLAMA_MODELS, LMSTUDIO_MODELS and XDG_CACHE_HOME under tmp_path."""
    roots = {name: tmp_path / name for name in ("hf", "ollama", "lmstudio", "xdg")}
    for r in roots.values():
        r.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(roots["hf"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OLLAMA_MODELS", str(roots["ollama"]))
    monkeypatch.setenv("LMSTUDIO_MODELS", str(roots["lmstudio"]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(roots["xdg"]))
    return roots


def hf_repo(cache, repo: str, files: dict[str, bytes], revision: str = REV,
            ref: str | None = "main"):
    """The hub cache layout: blobs by sha256, a snapshot of symlinks, refs/<ref>."""
    base = cache / f"models--{repo.replace('/', '--')}"
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        blob = base / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = base / "snapshots" / revision / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    if ref is not None:
        (base / "refs").mkdir(exist_ok=True)
        (base / "refs" / ref).write_text(revision)
    return base / "snapshots" / revision


def dir_files(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def gguf_bytes(tmp_path, quant: str) -> bytes:
    path = tmp_path / f"src-{quant}.gguf"
    synthesize_gguf(SPEC, quant, str(path))
    return path.read_bytes()


def ollama_model(root, name: str, tag: str, model: bytes, params: dict | None = None,
                 system: str | None = None, manifest_text: str | None = None):
    layers = []

    def blob(data: bytes, kind: str):
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs").mkdir(exist_ok=True)
        (root / "blobs" / f"sha256-{digest}").write_bytes(data)
        layers.append({"mediaType": f"application/vnd.ollama.image.{kind}",
                       "digest": f"sha256:{digest}", "size": len(data)})

    blob(model, "model")
    if params is not None:
        blob(json.dumps(params).encode(), "params")
    if system is not None:
        blob(system.encode(), "system")
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(manifest_text if manifest_text is not None else json.dumps(
        {"schemaVersion": 2, "config": {}, "layers": layers}))
    return manifest


def test_hf_cache_ids_resolve_through_huggingface_hub(stores, tmp_path):
    src = tmp_path / "src"
    write_tiny_model(src, "qwen3")
    snap = hf_repo(stores["hf"], "org/tiny", dir_files(src))
    info = huggingface_hub.scan_cache_dir(stores["hf"])  # the layout is the library's
    assert [r.repo_id for r in info.repos] == ["org/tiny"]
    assert resolve("org/tiny").path == str(snap)
    assert resolve(f"org/tiny@{REV}").path == str(snap)
    assert open_model("hf:org/tiny").index.spec.model_type == "qwen3"
    with pytest.raises(FormatError, match=r"org/tiny@" + OLD_REV + ": revision '" + OLD_REV
                       + "' is not in the Hugging Face cache .*hf download org/tiny --revision"):
        resolve(f"org/tiny@{OLD_REV}")
    with pytest.raises(FormatError, match=r"org/absent: no such file or directory, and not in "
                       r"the Hugging Face cache .*hf download org/absent"):
        resolve("org/absent")


def test_gguf_repos_pick_by_quantization_tag(stores, tmp_path):
    q8, q4 = gguf_bytes(tmp_path, "q8_0"), gguf_bytes(tmp_path, "q4_0")
    snap = hf_repo(stores["hf"], "org/tiny-GGUF",
                   {"tiny.Q8_0.gguf": q8, "tiny-Q4_0.gguf": q4, "README.md": b"x"})
    assert resolve("org/tiny-GGUF:Q8_0").path == str(snap / "tiny.Q8_0.gguf")
    assert resolve("org/tiny-GGUF:q4_0").path == str(snap / "tiny-Q4_0.gguf")
    with pytest.raises(FormatError, match=r"org/tiny-GGUF: 2 GGUF files in .*\(Q4_0, Q8_0\); "
                       r"pick one as org/tiny-GGUF:TAG"):
        resolve("org/tiny-GGUF")
    with pytest.raises(FormatError, match=r"no GGUF whose name carries 'Q5_K_M'"):
        resolve("org/tiny-GGUF:Q5_K_M")


def test_ollama_manifest_blob_params_and_system(stores, tmp_path):
    model = gguf_bytes(tmp_path, "q8_0")
    ollama_model(stores["ollama"], "tiny", "1b", model,
                 params={"temperature": 0.6, "top_k": 20, "stop": ["<|end|>", "END"]},
                 system="You are terse.")
    source = open_model("ollama:tiny:1b")
    assert source.origin == "ollama" and source.path.startswith(str(stores["ollama"]))
    assert source.sampling_defaults["temperature"] == 0.6
    assert source.sampling_defaults["top_k"] == 20
    assert source.stop == ("<|end|>", "END") and source.system_prompt == "You are terse."
    # the sha256 was checked once and remembered for this size and mtime
    assert (stores["xdg"] / "stream-run" / "ollama-verified.json").exists()
    with pytest.raises(FormatError, match=r"ollama:tiny:7b: no manifest .* `ollama pull "
                       r"tiny:7b`"):
        resolve("ollama:tiny:7b")


def test_ollama_bad_stores(stores, tmp_path):
    model = gguf_bytes(tmp_path, "q8_0")
    ollama_model(stores["ollama"], "broken", "latest", model, manifest_text="{not json")
    with pytest.raises(FormatError, match=r"ollama:broken: broken Ollama manifest .*latest"):
        resolve("ollama:broken")
    ollama_model(stores["ollama"], "nolayers", "latest", model,
                 manifest_text=json.dumps({"schemaVersion": 2}))
    with pytest.raises(FormatError, match=r"broken Ollama manifest .*KeyError"):
        resolve("ollama:nolayers")
    ollama_model(stores["ollama"], "tampered", "latest", model)
    blob = stores["ollama"] / "blobs" / f"sha256-{hashlib.sha256(model).hexdigest()}"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    blob.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"ollama:tampered: blob .* does not match its "
                       r"manifest \(sha256"):
        resolve("ollama:tampered")


def test_lmstudio_folder_and_list_models(stores, tmp_path, capsys):
    model = gguf_bytes(tmp_path, "q8_0")
    folder = stores["lmstudio"] / "pub" / "tiny-GGUF"
    folder.mkdir(parents=True)
    (folder / "tiny-Q8_0.gguf").write_bytes(model)
    assert resolve("lmstudio:pub/tiny-GGUF").path == str(folder / "tiny-Q8_0.gguf")
    assert resolve("pub/tiny-GGUF").origin == "lmstudio"  # not in the HF cache: LM Studio next
    ollama_model(stores["ollama"], "tiny", "1b", model)
    src = tmp_path / "src"
    write_tiny_model(src, "qwen3")
    hf_repo(stores["hf"], "org/tiny", dir_files(src))
    names = {(r["name"], r["store"], r["format"]) for r in list_models()}
    assert {("org/tiny", "hf", "hf"), ("ollama:tiny:1b", "ollama", "gguf"),
            ("lmstudio:pub/tiny-GGUF", "lmstudio", "gguf")} <= names
    assert cli_run.main(["--list-models"]) == 0
    out = capsys.readouterr().out
    assert "ollama:tiny:1b" in out and "Q8_0" in out and "org/tiny" in out


def test_cli_runs_store_names_and_refuses_missing_ones(stores, tmp_path, capsys):
    src = tmp_path / "src"
    write_tiny_model(src, "qwen3")
    hf_repo(stores["hf"], "org/tiny", dir_files(src))
    args = ["--prompt", "hello", "--max-tokens", "4", "--ignore-chat-template"]
    assert cli_run.main([str(src), *args]) == 0
    by_path = capsys.readouterr().out
    assert cli_run.main(["org/tiny", *args]) == 0
    assert capsys.readouterr().out == by_path
    assert cli_run.main(["ollama:nothing", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ollama pull nothing:latest" in err[0]
    shutil.rmtree(stores["hf"])  # no cache at all: still one line
    assert cli_run.main(["org/tiny", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hf download org/tiny" in err[0]
