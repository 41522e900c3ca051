"""Models where users already keep them (issue 22): a Hugging Face cache id, an Ollama model, an
LM Studio model, resolved to a local path. Nothing is ever downloaded: a model that is not
there is an error that says where it looked and which command would fetch it.

    org/name[@revision][:TAG]   the Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub),
                                through huggingface_hub's own cache functions; TAG picks one
                                GGUF of several by its quantization (Q4_K_M), as llama.cpp -hf
    hf:org/name...              the same, never an LM Studio folder
    ollama:name[:tag]           Ollama's store (OLLAMA_MODELS, else ~/.ollama/models): the
                                manifest's model blob (a GGUF), its size and sha256 checked,
                                and its parameters (stop strings, sampling) as defaults
    lmstudio:pub/repo[:TAG]     LM Studio's models folder (LMSTUDIO_MODELS, else
                                ~/.lmstudio/models, else ~/.cache/lm-studio/models)

A bare org/name is looked up in the HF cache first, then in LM Studio's folder. A path that
exists always wins.

Ollama's chat template is a Go template, which this engine does not render; the GGUF's own
Jinja template (tokenizer.chat_template, which Ollama's importer starts from) is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from stream_run.loaders.errors import FormatError

PREFIXES = ("hf:", "ollama:", "lmstudio:")
_REPO = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# Ollama parameters that map onto GenerationParams / SamplingParams defaults
OLLAMA_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                   "min_p": "min_p", "repeat_penalty": "repetition_penalty", "seed": "seed"}
VERIFIED_FILE = "ollama-verified.json"  # blobs whose sha256 was checked: (size, mtime) -> ok


@dataclass
class Resolved:
    """Where a model name led: the path to open, and what the store adds."""

    path: str
    origin: str  # "path", "hf", "ollama", "lmstudio"
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    system: str | None = None


def is_store_name(name: str) -> bool:
    """Whether name reads as a store id rather than a path (and no such path exists)."""
    if os.path.exists(name):
        return False
    if name.endswith(".gguf") and not name.startswith(PREFIXES):  # a file that is not there
        return False
    return name.startswith(PREFIXES) or bool(_REPO.match(_split_tag(name)[0].split("@")[0]))


def resolve(name: str) -> Resolved:
    """The local path behind a model name (see the module doc).

    Raises:
        FormatError: one line naming what was asked and where it looked; not found,
            ambiguous, a broken manifest, a blob that does not match it.
    """
    if os.path.exists(name) or not is_store_name(name):
        return Resolved(name, "path")
    if name.startswith("ollama:"):
        return _ollama(name[len("ollama:"):])
    if name.startswith("lmstudio:"):
        found = _lmstudio(name[len("lmstudio:"):])
        if found is None:
            raise FormatError(f"{name}: not in LM Studio's models folder (looked in "
                              f"{', '.join(lmstudio_dirs())}); hint: download it in LM Studio")
        return found
    bare = name.removeprefix("hf:")
    hf = _hf(bare, name)
    if hf is not None:
        return hf
    if not name.startswith("hf:"):
        found = _lmstudio(bare)
        if found is not None:
            return found
    repo = _split_tag(bare)[0].split("@")[0]
    raise FormatError(f"{name}: no such file or directory, and not in the Hugging Face cache "
                      f"({hf_cache_dir()})"
                      + ("" if name.startswith("hf:") else
                         f" or LM Studio's models folder ({', '.join(lmstudio_dirs())})")
                      + f"; stream-run never downloads: run `hf download {repo}` first")


def _split_tag(name: str) -> tuple[str, str | None]:
    """'org/name:Q4_K_M' -> ('org/name', 'Q4_K_M')."""
    if ":" in name:
        base, tag = name.rsplit(":", 1)
        return base, tag or None
    return name, None


# -- Hugging Face cache ---------------------------------------------------------------------

def hf_cache_dir() -> str:
    """The hub cache as huggingface_hub finds it, read now (its constants are read at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def _hf(bare: str, asked: str) -> Resolved | None:
    """A snapshot in the HF cache, or None when the repo is not cached at all."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    base, tag = _split_tag(bare)
    repo, _, revision = base.partition("@")
    cache = hf_cache_dir()
    try:
        snapshot = snapshot_download(repo, revision=revision or None, cache_dir=cache,
                                     local_files_only=True)
    except LocalEntryNotFoundError:
        snapshots = _hf_snapshots(cache, repo)
        if not snapshots:
            return None
        if revision:
            raise FormatError(f"{asked}: revision {revision!r} is not in the Hugging Face cache "
                              f"({cache}; it holds {', '.join(sorted(snapshots))}); stream-run "
                              f"never downloads: run `hf download {repo} --revision {revision}`"
                              ) from None
        if len(snapshots) != 1:
            raise FormatError(f"{asked}: the Hugging Face cache holds revisions "
                              f"{', '.join(sorted(snapshots))} of {repo} and no 'main'; "
                              f"hint: pick one as {repo}@REVISION") from None
        snapshot = next(iter(snapshots.values()))
    except Exception as exc:  # noqa: BLE001 - huggingface_hub's validation (a bad repo id)
        raise FormatError(f"{asked}: {str(exc).splitlines()[0]}") from None
    return Resolved(_pick_gguf(snapshot, tag, asked), "hf")


def _hf_snapshots(cache: str, repo: str) -> dict[str, str]:
    """{revision hash: snapshot dir} of repo in the cache, as huggingface_hub scans it."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(cache)
    except Exception:  # noqa: BLE001 - no cache directory, or one it cannot read
        return {}
    return {rev.commit_hash: str(rev.snapshot_path) for r in info.repos
            if r.repo_id == repo and r.repo_type == "model" for rev in r.revisions}


def _pick_gguf(folder: str, tag: str | None, asked: str) -> str:
    """The model inside a folder: itself when it is an HF/MLX directory (config.json) and no
    tag asks for a GGUF; else the one GGUF, or the one whose name carries tag.

    Raises:
        FormatError: no GGUF matches tag, or several and no tag.
    """
    ggufs = sorted(os.path.relpath(os.path.join(d, f), folder)
                   for d, _, files in os.walk(folder) for f in files if f.endswith(".gguf"))
    if tag is None and os.path.exists(os.path.join(folder, "config.json")):
        return folder
    if tag is not None:
        want = tag.lower().replace("-", "_")
        ggufs = [g for g in ggufs
                 if want in re.split(r"[.\-/]", os.path.basename(g).lower().replace("-", "_"))
                 or want in os.path.basename(g).lower().replace("-", "_")]
    if len(ggufs) == 1:
        return os.path.join(folder, ggufs[0])
    if not ggufs:
        what = f"no GGUF whose name carries {tag!r}" if tag else "no config.json and no GGUF"
        raise FormatError(f"{asked}: {what} in {folder}")
    tags = ", ".join(_quant_tag(g) for g in ggufs)
    raise FormatError(f"{asked}: {len(ggufs)} GGUF files in {folder} ({tags}); pick one as "
                      f"{_split_tag(asked)[0]}:TAG, e.g. :{_quant_tag(ggufs[0])}")


def _quant_tag(filename: str) -> str:
    """The quantization tag in a GGUF file name (Q4_K_M, IQ2_XS, F16, BF16, ...), else the name."""
    m = re.search(r"(?i)(?:^|[.\-_])((?:I?Q\d[\w]*?)|BF16|F16|F32)(?:[.\-]|\.gguf$)",
                  os.path.basename(filename))
    return m.group(1).upper() if m else os.path.basename(filename)


# -- Ollama -----------------------------------------------------------------------------------

def ollama_dir() -> str:
    return os.path.expanduser(os.environ.get("OLLAMA_MODELS") or "~/.ollama/models")


def _ollama_manifest_path(root: str, name: str) -> tuple[str, str]:
    """(manifest path, model:tag) for an Ollama name: 'llama3.2:3b', 'user/model', or
    'host/ns/model:tag' (registry.ollama.ai/library by default, tag 'latest')."""
    base, tag = _split_tag(name)
    parts = base.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", *parts]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    return os.path.join(root, "manifests", *parts, tag or "latest"), f"{base}:{tag or 'latest'}"


def _ollama(name: str) -> Resolved:
    root = ollama_dir()
    path, full = _ollama_manifest_path(root, name)
    asked = f"ollama:{name}"
    if not os.path.isfile(path):
        raise FormatError(f"{asked}: no manifest {path} in Ollama's store ({root}); "
                          f"stream-run never downloads: run `ollama pull {full}` first")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        layers = manifest["layers"]
        if not isinstance(layers, list):
            raise TypeError("layers is not a list")
        by_type = {str(layer["mediaType"]).rsplit(".", 1)[-1]: layer for layer in layers}
        model = by_type["model"]
        digest, size = str(model["digest"]), int(model["size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{asked}: broken Ollama manifest {path} ({type(exc).__name__}: "
                          f"{exc}); hint: `ollama pull {full}` again") from None
    blob = _ollama_blob(root, digest, size, asked)
    out = Resolved(blob, "ollama")
    params = by_type.get("params")
    if params is not None:
        cfg = _read_json_blob(root, params, asked)
        for key, field_name in OLLAMA_SAMPLING.items():
            if isinstance(cfg.get(key), int | float) and not isinstance(cfg.get(key), bool):
                out.sampling_defaults[field_name] = float(cfg[key])
        stop = cfg.get("stop")
        out.stop = [stop] if isinstance(stop, str) else [s for s in stop or []
                                                        if isinstance(s, str) and s]
    system = by_type.get("system")
    if system is not None:
        out.system = _read_blob(root, system, asked).decode("utf-8", "replace")
    return out


def _blob_path(root: str, digest: str, asked: str) -> str:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexd):
        raise FormatError(f"{asked}: broken Ollama manifest: digest {digest!r} is not "
                          "sha256:<64 hex>")
    return os.path.join(root, "blobs", f"sha256-{hexd}")


def _ollama_blob(root: str, digest: str, size: int, asked: str) -> str:
    """The model blob, its size and (once per size and mtime, remembered) sha256 checked."""
    path = _blob_path(root, digest, asked)
    try:
        st = os.stat(path)
    except OSError:
        raise FormatError(f"{asked}: the manifest's model blob {path} is missing; hint: "
                          "`ollama pull` it again") from None
    if st.st_size != size:
        raise FormatError(f"{asked}: blob {path} has {st.st_size} bytes, its manifest says "
                          f"{size}; hint: `ollama pull` it again")
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    seen = _verified()
    if seen.get(key) != digest:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        if f"sha256:{h.hexdigest()}" != digest:
            raise FormatError(f"{asked}: blob {path} does not match its manifest (sha256 "
                              f"{h.hexdigest()[:12]}..., manifest {digest[7:19]}...); hint: "
                              "`ollama pull` it again")
        seen[key] = digest
        _remember(seen)
    return path


def _read_blob(root: str, layer: dict[str, Any], asked: str) -> bytes:
    path = _blob_path(root, str(layer.get("digest")), asked)
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError:
        raise FormatError(f"{asked}: the manifest's blob {path} is missing") from None
    return data


def _read_json_blob(root: str, layer: dict[str, Any], asked: str) -> dict[str, Any]:
    try:
        cfg = json.loads(_read_blob(root, layer, asked))
    except ValueError:
        raise FormatError(f"{asked}: the manifest's params blob is not JSON") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{asked}: the manifest's params blob is not a JSON object")
    return cfg


def _verified_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "stream-run", VERIFIED_FILE)


def _verified() -> dict[str, str]:
    try:
        with open(_verified_path(), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(seen: dict[str, str]) -> None:
    path = _verified_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(seen, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the check runs again next time


# -- LM Studio --------------------------------------------------------------------------------

def lmstudio_dirs() -> list[str]:
    if os.environ.get("LMSTUDIO_MODELS"):
        return [os.path.expanduser(os.environ["LMSTUDIO_MODELS"])]
    return [os.path.expanduser(p) for p in ("~/.lmstudio/models", "~/.cache/lm-studio/models")]


def _lmstudio(name: str) -> Resolved | None:
    """pub/repo[:TAG], or pub/repo/file.gguf, under LM Studio's models folder."""
    base, tag = _split_tag(name)
    for root in lmstudio_dirs():
        path = os.path.join(root, base)
        if os.path.isfile(path):
            return Resolved(path, "lmstudio")
        if os.path.isdir(path):
            return Resolved(_pick_gguf(path, tag, f"lmstudio:{name}"), "lmstudio")
    return None


# -- what is there: --list-models -------------------------------------------------------------

def list_models() -> list[dict[str, Any]]:
    """Every model in the three stores: {"name", "store", "format", "quant", "bytes", "path"}."""
    rows: list[dict[str, Any]] = []
    for repo, snapshot in _hf_repos():
        rows += _folder_rows(snapshot, repo, "hf")
    root = ollama_dir()
    manifests = os.path.join(root, "manifests")
    for d, _, files in os.walk(manifests):
        for tag in files:
            parts = os.path.relpath(os.path.join(d, tag), manifests).split(os.sep)
            if len(parts) < 3:
                continue
            host, *name = parts[:-1]
            short = "/".join(name[1:] if host == "registry.ollama.ai" and name[0] == "library"
                             else name if host == "registry.ollama.ai" else [host, *name])
            label = f"ollama:{short}:{tag}"
            try:
                res = _ollama(f"{short}:{tag}")
                rows.append({"name": label, "store": "ollama", "format": "gguf",
                             "quant": _gguf_quant(res.path), "bytes": os.path.getsize(res.path),
                             "path": res.path})
            except FormatError as exc:
                rows.append({"name": label, "store": "ollama", "format": "broken",
                             "quant": "", "bytes": 0, "path": str(exc)})
    for root in lmstudio_dirs():
        if not os.path.isdir(root):
            continue
        for pub in sorted(os.listdir(root)):
            for repo in sorted(os.listdir(os.path.join(root, pub))) \
                    if os.path.isdir(os.path.join(root, pub)) else []:
                rows += _folder_rows(os.path.join(root, pub, repo), f"{pub}/{repo}", "lmstudio")
    return rows


def _hf_repos() -> list[tuple[str, str]]:
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(hf_cache_dir())
    except Exception:  # noqa: BLE001 - no cache
        return []
    out = []
    for r in sorted(info.repos, key=lambda r: r.repo_id):
        if r.repo_type != "model":
            continue
        for rev in r.revisions:
            out.append((r.repo_id if "main" in rev.refs or len(r.revisions) == 1
                        else f"{r.repo_id}@{rev.commit_hash[:12]}", str(rev.snapshot_path)))
    return out


def _folder_rows(folder: str, name: str, store: str) -> list[dict[str, Any]]:
    prefix = "lmstudio:" if store == "lmstudio" else ""
    rows = []
    if os.path.exists(os.path.join(folder, "config.json")):
        quant = ""
        try:
            with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
                q = json.load(f).get("quantization")
            if isinstance(q, dict) and "bits" in q:
                quant = f"{q['bits']}-bit"
        except (OSError, ValueError):
            pass
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder)
                   for f in fs if f.endswith((".safetensors", ".npz")))
        rows.append({"name": f"{prefix}{name}", "store": store,
                     "format": "mlx" if quant else "hf", "quant": quant or "16-bit",
                     "bytes": size, "path": folder})
    ggufs = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                   if f.endswith(".gguf"))
    for g in ggufs:
        label = f"{prefix}{name}" + (f":{_quant_tag(g)}" if len(ggufs) > 1 else "")
        rows.append({"name": label, "store": store, "format": "gguf", "quant": _quant_tag(g),
                     "bytes": os.path.getsize(g), "path": g})
    return rows


def _gguf_quant(path: str) -> str:
    """general.file_type of a GGUF as llama.cpp names it (Q4_K_M), from its header."""
    try:
        from gguf import GGUFReader, LlamaFileType

        field_ = GGUFReader(path).get_field("general.file_type")
        if field_ is None:
            return ""
        return LlamaFileType(int(field_.parts[field_.data[0]][0])).name.removeprefix(
            "MOSTLY_")
    except Exception:  # noqa: BLE001 - a listing shows what it can
        return ""
