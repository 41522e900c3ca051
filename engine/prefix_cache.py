"""The conversation's KV, kept between requests (issue 20, item 1; `--kv-cache-budget`).

A chat front-end sends the whole conversation each turn. A request that finishes leaves the KV
of the tokens it fed (prompt and answer) here; a new request whose prompt starts with some of
those tokens loads them into its own cache and feeds only the rest, so the second turn of a
conversation reads and computes only what is new.

Entries are kept least recently used first within a byte budget (numpy copies of the cache's
state, KVCache.state: on a GPU backend they sit in host memory). A lookup takes the longest
common prefix over the entries (a scan: entries are whole conversations, a few hundred at
most within any budget that fits in memory; numpy compares the ids). An entry that is a
prefix of a newer one is dropped when the newer one arrives.

Exactness: the loaded positions are the keys and values that pass computed, so the rest of the
prompt attends over what it would have attended over had it run as one request in chunks (the
difference to one pass over the whole prompt is float rounding, as between any two chunkings).
Sliding-window layers can reuse a prefix only where their ring still holds the window the next
position needs (Ring.first_needed), else the entry is not used. At least one prompt token is
always fed, since its logits give the first generated token.

This is also what prompt-cache files hold (Engine.save_prompt_cache, load_prompt_cache):
one entry, with the model's identity and the KV setting.
"""

from __future__ import annotations

import collections
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from stream_run.loaders import LayerIndex


@dataclass(eq=False)
class Entry:
    tokens: np.ndarray  # int64 ids whose KV states hold, in order
    states: list[dict[str, np.ndarray]]  # KVCache.state()

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for st in self.states for a in st.values()) + self.tokens.nbytes


class PrefixCache:
    """Entries of (token ids, KV state), LRU within budget_bytes."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"kv_cache_budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self._ids = 0
        self.nbytes = 0
        self.hits = 0
        self.tokens_reused = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: list[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with prompt, and that length (at most
        len(prompt) - 1: the last prompt token is always fed); (None, 0) when none shares
        one. Marks the entry used."""
        if not self._entries or len(prompt) < 2:
            return None, 0
        ids = np.asarray(prompt[:-1], dtype=np.int64)
        best, best_n = None, 0
        for key, entry in self._entries.items():
            n = common_prefix(entry.tokens, ids)
            if n > best_n:
                best, best_n, best_key = entry, n, key
        if best is not None:
            self._entries.move_to_end(best_key)
        return best, best_n

    def record_hit(self, n: int) -> None:
        self.hits += 1
        self.tokens_reused += n

    def put(self, tokens: list[int] | np.ndarray, states: list[dict[str, Any]]) -> bool:
        """Keep states for tokens (most recently used), evicting the least recently used
        entries to stay within the budget and dropping entries that are prefixes of tokens.
        False when the entry alone exceeds the budget (it is not kept)."""
        entry = Entry(np.asarray(tokens, dtype=np.int64).copy(), states)
        if entry.nbytes > self.budget_bytes or len(entry.tokens) == 0:
            return False
        for key, old in list(self._entries.items()):
            if len(old.tokens) <= len(entry.tokens) \
                    and common_prefix(old.tokens, entry.tokens) == len(old.tokens):
                self._drop(key)
        while self.nbytes + entry.nbytes > self.budget_bytes:
            self._drop(next(iter(self._entries)))
        self._ids += 1
        self._entries[self._ids] = entry
        self.nbytes += entry.nbytes
        return True

    def latest(self) -> Entry | None:
        """The entry used or added last."""
        return next(reversed(self._entries.values()), None)

    def longest(self, tokens: list[int]) -> Entry | None:
        """The entry whose tokens are the longest prefix of tokens (what a run leaves for
        its prompt-cache file)."""
        ids = np.asarray(tokens, dtype=np.int64)
        best = None
        for entry in self._entries.values():
            n = len(entry.tokens)
            if n <= len(ids) and common_prefix(entry.tokens, ids) == n \
                    and (best is None or n > len(best.tokens)):
                best = entry
        return best

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two id arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


# -- prompt-cache files ---------------------------------------------------------------------
FILE_FORMAT = "stream-run prompt cache"
FILE_VERSION = "1"


def model_identity(index: LayerIndex) -> str:
    """A fingerprint of the model as stored: every tensor's name, storage type, shape and size,
    and the first 4 KiB of the first tensor of three units (embed, a middle block, head), so
    two fine-tunes of one architecture and quantization differ."""
    h = hashlib.sha256()
    units = list(index.units.values())
    for unit in units:
        for name in sorted(unit.tensors):
            t = unit.tensors[name]
            h.update(f"{unit.key}/{name}:{t.dtype}:{t.shape}:{t.nbytes};".encode())
    for unit in (units[0], units[len(units) // 2], units[-1]):
        if unit.tensors:
            t = unit.tensors[min(unit.tensors)]
            with open(t.path, "rb") as f:
                h.update(os.pread(f.fileno(), min(4096, t.nbytes), t.offset))
    return h.hexdigest()[:32]


def save_file(path: str | os.PathLike[str], entry: Entry, metadata: dict[str, str]) -> None:
    """Write entry as safetensors: "tokens" and "layer.{i}.{name}" arrays, with metadata
    (format, version, model identity, KV setting). Written to a temporary file and renamed, so
    a failed write leaves no partial file at path."""
    tensors = {"tokens": entry.tokens}
    for i, st in enumerate(entry.states):
        tensors.update({f"layer.{i}.{k}": np.ascontiguousarray(v) for k, v in st.items()})
    meta = {"format": FILE_FORMAT, "version": FILE_VERSION, **metadata}
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        safetensors.numpy.save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except Exception as exc:  # noqa: BLE001 - safetensors wraps the OSError (a full disk)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OSError(f"prompt-cache file {path}: cannot be written ({first}); the earlier "
                      "file, if any, is left as it was") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_file(path: str | os.PathLike[str], expect: dict[str, str]) -> Entry:
    """Read a prompt-cache file, checking it was made for what expect says (model identity,
    KV setting).

    Raises:
        ValueError: one line naming the file: not a prompt cache, cut short or damaged, or
            made for another model or KV setting.
    """
    path = os.fspath(path)
    try:
        with safetensors.safe_open(path, framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FILE_FORMAT:
                raise ValueError(f"prompt-cache file {path}: not a stream-run prompt cache "
                                 "(no such format in its safetensors metadata)")
            if meta.get("version") != FILE_VERSION:
                raise ValueError(f"prompt-cache file {path}: version {meta.get('version')!r}, "
                                 f"this stream-run reads version {FILE_VERSION}")
            for key, want in expect.items():
                if meta.get(key) != want:
                    raise ValueError(
                        f"prompt-cache file {path}: made for {key} {meta.get(key)!r}, this "
                        f"engine has {want!r}; hint: use it with the model and --kv-bits "
                        "setting that made it, or delete it")
            arrays = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors' own errors: truncated, not a file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"prompt-cache file {path}: cannot be read ({first}); hint: it may be "
                         "cut short or damaged: delete it") from None
    tokens = arrays.pop("tokens", None)
    if tokens is None or tokens.ndim != 1:
        raise ValueError(f"prompt-cache file {path}: no 1-D 'tokens' tensor")
    states: dict[int, dict[str, np.ndarray]] = {}
    for name, a in arrays.items():
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "layer" or not parts[1].isdigit():
            raise ValueError(f"prompt-cache file {path}: unexpected tensor {name!r}")
        states.setdefault(int(parts[1]), {})[parts[2]] = a
    if sorted(states) != list(range(len(states))):
        raise ValueError(f"prompt-cache file {path}: layers {sorted(states)} are not 0..N-1")
    return Entry(tokens.astype(np.int64), [states[i] for i in range(len(states))])
