"""stream-convert's output directory: atomic (an interrupted convert leaves nothing), --force
replaces only a finished stream-convert output, paths that could lose data are refused; the
CLI's one-line errors; stream-run --verify against manifest.json."""

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import threading

import pytest

from stream_run.cli.convert import main
from stream_run.convert import convert as engine_convert
from stream_run.convert.convert import convert_model
from stream_run.engine import Engine, EngineConfig, GenerationParams, ReadError
from stream_run.engine.errors import ConvertError
from stream_run.loaders import LoaderConfig
from tests.tiny_models import write_tiny_model

BIN = os.path.dirname(sys.executable)


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "src"
    write_tiny_model(path, "llama")
    return path


def convert(src, out, **kw) -> dict:
    return convert_model(str(src), str(out), progress=False, **kw)


def snapshot(path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def fail_on_unit(monkeypatch, n: int, exc: BaseException) -> None:
    """Make the n-th unit file write raise exc (after it has started writing)."""
    real = engine_convert.write_safetensors
    calls = []

    def write(path, tensors, *args):
        calls.append(path)
        if len(calls) == n:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise exc
        return real(path, tensors, *args)

    monkeypatch.setattr(engine_convert, "write_safetensors", write)


# --- atomic output and --force -----------------------------------------------------------

@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_interrupted_convert_leaves_no_output_and_no_temp_dir(src, tmp_path, monkeypatch, exc):
    fail_on_unit(monkeypatch, 3, exc)
    with pytest.raises(type(exc)):
        convert(src, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_interrupted_force_convert_keeps_the_old_output(src, tmp_path, monkeypatch):
    convert(src, tmp_path / "out", bits=8)
    before = snapshot(tmp_path / "out")
    fail_on_unit(monkeypatch, 2, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        convert(src, tmp_path / "out", bits=4, force=True)
    assert snapshot(tmp_path / "out") == before
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_existing_output_needs_force_and_is_replaced_only_when_complete(src, tmp_path):
    out = tmp_path / "out"
    convert(src, out, bits=8)
    before = snapshot(out)
    with pytest.raises(ConvertError, match=r"out: already exists; hint: --force replaces it"):
        convert(src, out, bits=4)
    assert snapshot(out) == before
    manifest = convert(src, out, bits=4, force=True)
    assert manifest["quantization"]["bits"] == 4
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # no temp or old dir left


def test_force_never_replaces_what_stream_convert_did_not_write(src, tmp_path):
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ConvertError, match=r"precious: exists and is not a stream-convert "
                                           r"output .*refusing to replace it even with --force"):
        convert(src, other, force=True)
    assert (other / "notes.txt").read_text() == "keep me"
    afile = tmp_path / "file.bin"
    afile.write_bytes(b"x")
    with pytest.raises(ConvertError, match=r"file\.bin: exists and is not a directory"):
        convert(src, afile, force=True)
    assert afile.read_bytes() == b"x"
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(src, empty, force=True)  # an empty directory holds nothing to lose
    assert (empty / "manifest.json").exists()


def test_paths_that_could_lose_the_source_are_refused(src, tmp_path):
    with pytest.raises(ConvertError, match=r"OUT is SRC or inside it"):
        convert(src, src, force=True)
    with pytest.raises(ConvertError, match=r"OUT is SRC or inside it"):
        convert(src, src / "packed")
    packed = tmp_path / "packed"
    convert(src, packed)
    with pytest.raises(ConvertError, match=r"SRC .* lies inside OUT"):
        convert(packed / "model-head.safetensors", packed, force=True)
    with pytest.raises(ConvertError, match=r"the parent directory .*nowhere does not exist"):
        convert(src, tmp_path / "nowhere" / "out")


# --- the CLI -----------------------------------------------------------------------------

def one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("args, match", [
    (["{tmp}/missing", "{tmp}/out"], r"missing: no such file or directory"),
    (["{src}", "{src}"], r"OUT is SRC or inside it"),
    (["{src}", "{tmp}/out", "--group-size", "128"],
     r"tensor 'model\.embed_tokens\.weight' \[320, 64\]: input dimension 64 is not divisible"),
    (["{src}", "{tmp}/out", "--recipe", "fancy"], r"recipe 'fancy': not one of"),
    (["{tmp}/src/model.safetensors", "{tmp}/out"], r"expected a model directory or a \.gguf"),
])
def test_cli_errors_are_one_line_with_exit_2(src, tmp_path, capsys, args, match):
    argv = [a.format(tmp=tmp_path, src=src) for a in args]
    assert main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("stream-convert: error: ")
    assert re.search(match, line), line
    assert sorted(os.listdir(tmp_path)) == ["src"]


@pytest.mark.parametrize("flag, match", [(["--bits", "7"], r"argument --bits: invalid choice"),
                                         (["--group-size", "48"], r"argument --group-size"),
                                         (["--quantizer", "awq"], r"argument --quantizer")])
def test_cli_bad_flags(src, tmp_path, capsys, flag, match):
    with pytest.raises(SystemExit) as info:
        main([str(src), str(tmp_path / "out"), *flag])
    assert info.value.code == 2
    assert match in one_line(capsys.readouterr().err)


def test_console_script_converts_and_refuses_an_existing_output(src, tmp_path):
    cmd = [os.path.join(BIN, "stream-convert"), str(src), str(tmp_path / "out"), "--bits", "8",
           "--quantizer", "rtn"]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "stream-convert: wrote" in ok.stderr and "4 units" in ok.stderr
    assert "quantizer rtn" in ok.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["quantizer"] == "rtn"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert "already exists; hint: --force" in one_line(again.stderr)


# --- stream-run --verify -----------------------------------------------------------------

def flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # a tensor byte: the header still parses
    path.write_bytes(bytes(data))


async def generate(path, **loader) -> list[int]:
    ids: list[int] = []
    config = EngineConfig(backend="numpy", loader=LoaderConfig(**loader))
    async with await Engine.open(str(path), config) as eng:
        async for chunk in eng.generate([5, 6, 7], GenerationParams(max_tokens=4,
                                                                    ignore_eos=True)):
            ids += chunk.token_ids
    return ids


@pytest.mark.asyncio
async def test_verify_hashes_on_the_io_thread_and_detects_a_flipped_byte(src, tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "out"
    await asyncio.to_thread(convert, src, out)
    from stream_run.loaders import reader as loaders_reader

    threads = []
    real = loaders_reader.sha256_file

    def spy(path):
        threads.append((os.path.basename(path), threading.current_thread().name))
        return real(path)

    monkeypatch.setattr(loaders_reader, "sha256_file", spy)
    assert len(await generate(out, verify=True)) == 4
    assert sorted(name for name, _ in threads) == sorted(
        f"model-{k}.safetensors" for k in ("embed", "layers.0", "layers.1", "head"))
    assert all(t.startswith("stream-io") for _, t in threads)  # never the event loop's thread
    flip_byte(out / "model-layers.1.safetensors")
    assert len(await generate(out)) == 4  # unverified: the flip goes unnoticed
    with pytest.raises(ReadError, match=r"model-layers\.1\.safetensors: checksum mismatch for "
                                        r"unit 'layers\.1': sha256 .*manifest\.json expects"):
        await generate(out, verify=True)


def run_cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"}
    return subprocess.run([sys.executable, "-m", "stream_run.cli.run", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)


def test_verify_cli_one_line_errors(src, tmp_path):
    out = tmp_path / "out"
    convert(src, out)
    flip_byte(out / "model-layers.0.safetensors")
    r = run_cli(out, "--prompt", "hi", "--max-tokens", "2", "--verify")
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert "model-layers.0.safetensors: checksum mismatch for unit 'layers.0'" in line
    r = run_cli(src, "--prompt", "hi", "--max-tokens", "2", "--verify")
    assert r.returncode == 2
    assert "cannot verify checksums: the model has no manifest.json" in one_line(r.stderr)
