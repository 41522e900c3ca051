"""Perplexity of a model over a text with a sliding window, streamed like generation (any
memory budget): the library half of stream-eval.

The text is tokenized whole, as plain text (no chat template; BOS only if the tokenizer adds
one to plain text, as stream-run does for a raw prompt). Windows of ctx tokens advance by
stride; each starts from a fresh KV cache and scores only the tokens the previous window did
not (the HF "perplexity of fixed-length models" scheme), so every token after the first is
scored exactly once. log-softmax runs in float64.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_run.engine.config import EngineConfig
from stream_run.engine.engine import Engine
from stream_run.loaders import LayerIndex

log = logging.getLogger(__name__)


DEFAULT_CTX = 512



_ROWS = 64  # log-softmax rows per float64 block: bounds the temporary to 64 x vocab



@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go through the model; tokens [first_target, end) are scored."""

    begin: int
    end: int
    first_target: int



@dataclass
class EvalResult:
    model: str
    file_bytes: int  # the model's weight files on disk
    backend: str
    ctx: int
    stride: int
    n_tokens: int  # tokens of the text evaluated
    starts_with_bos: bool
    n_windows: int = 0
    n_scored: int = 0
    n_forwarded: int = 0  # tokens run through the model (windows overlap by ctx - stride)
    nll_sum: float = 0.0  # nats
    forward_s: float = 0.0  # wall time of the forward passes
    bytes_read: int = 0

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood, nats per scored token."""
        return self.nll_sum / self.n_scored

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def tokens_per_s(self) -> float:
        return self.n_scored / self.forward_s if self.forward_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "file_bytes": self.file_bytes, "backend": self.backend,
                "ctx": self.ctx, "stride": self.stride, "tokens": self.n_tokens,
                "starts_with_bos": self.starts_with_bos, "windows": self.n_windows,
                "tokens_scored": self.n_scored, "tokens_forwarded": self.n_forwarded,
                "nll": self.nll, "perplexity": self.perplexity, "forward_s": self.forward_s,
                "tokens_per_s": self.tokens_per_s, "bytes_read": self.bytes_read}



def sliding_windows(n_tokens: int, ctx: int, stride: int) -> list[Window]:
    """The windows that score tokens 1..n_tokens-1 once each (needs 1 <= stride < ctx)."""
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        # target 0 has no context; the others were scored by the previous window
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows



def check_window(ctx: int | None, stride: int | None, max_context: int) -> tuple[int, int]:
    """Fill the defaults (ctx min(512, model context), stride ctx // 2) and check the range.

    Raises:
        ValueError: the message starts with "ctx" or "stride", the parameter at fault.
    """
    ctx = min(DEFAULT_CTX, max_context) if ctx is None else ctx
    if not 2 <= ctx <= max_context:
        raise ValueError(f"ctx must be in 2..{max_context} (the model's context), got {ctx}")
    stride = ctx // 2 if stride is None else stride
    if not 1 <= stride < ctx:
        raise ValueError(f"stride must be in 1..{ctx - 1} (below ctx {ctx}, so each window "
                         f"keeps the token before its first scored one), got {stride}")
    return ctx, stride



def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64; logits (L, V), targets (L,)."""
    out = np.empty(len(targets), dtype=np.float64)
    for r in range(0, len(targets), _ROWS):
        x = logits[r:r + _ROWS].astype(np.float64)  # (rows, V)
        m = x.max(axis=1)
        lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
        out[r:r + _ROWS] = lse - x[np.arange(len(x)), targets[r:r + _ROWS]]
    return out



def weight_file_bytes(index: LayerIndex) -> int:
    """Bytes of the files that hold the model's tensors (not tokenizer or config)."""
    files = {f for unit in index.units.values() for f in unit.files}
    return sum(os.path.getsize(f) for f in files)



def storage_label(index: LayerIndex) -> str:
    """The storage type holding most of the weight bytes, e.g. "Q4_1", "BF16", "4/g64"."""
    nbytes: Counter[str] = Counter()
    for unit in index.units.values():
        q = unit.quantization
        for t in unit.tensors.values():
            packed = t.dtype == "U32" and q
            nbytes[f"{q['bits']}/g{q['group_size']}" if packed else t.dtype] += t.nbytes
    return nbytes.most_common(1)[0][0]



async def encode_text(engine: Engine, text: str | Sequence[int], max_tokens: int | None = None
                      ) -> list[int]:
    """Plain-text ids (no chat template; BOS as the tokenizer adds it to plain text), or token
    ids as they are; cut to max_tokens."""
    ids = await asyncio.to_thread(engine.tokenizer.encode, text) if isinstance(text, str) \
        else [int(t) for t in text]
    return ids if max_tokens is None else ids[:max_tokens]



async def perplexity(engine: Engine, ids: Sequence[int], ctx: int | None = None,
                     stride: int | None = None) -> EvalResult:
    """Sliding-window perplexity of ids, streamed through engine.forward in prefill chunks.

    The caller must not run another pass on the engine meanwhile.

    Raises:
        ValueError: fewer than 2 ids, or ctx / stride out of range (see check_window).
    """
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    ctx, stride = check_window(ctx, stride, engine.max_context)
    arr = np.asarray(ids, dtype=np.int64)
    bos = engine.tokenizer.bos_token_id
    res = EvalResult(model=engine.source.path, file_bytes=weight_file_bytes(engine.source.index),
                     backend=engine.backend.name, ctx=ctx, stride=stride, n_tokens=len(arr),
                     starts_with_bos=bos is not None and int(arr[0]) == bos)
    windows = sliding_windows(len(arr), ctx, stride)
    try:
        for i, w in enumerate(windows):
            await _score_window(engine, arr, w, res, more=i + 1 < len(windows))
            log.info("window %d/%d: %d tokens scored, perplexity so far %.4f", i + 1,
                     len(windows), res.n_scored, math.exp(res.nll_sum / res.n_scored))
    finally:  # an error or cancel leaves no read in flight
        await engine.scheduler.drop_carried()
        engine.reader.buffers.trim()
    assert res.n_scored == len(arr) - 1, (res.n_scored, len(arr))
    return res



async def _score_window(engine: Engine, ids: np.ndarray, w: Window, res: EvalResult,
                        more: bool) -> None:
    kv = await engine.runner.make_kv_cache(w.end - w.begin)
    chunk = engine.config.prefill_chunk
    for c in range(w.begin, w.end, chunk):
        e = min(c + chunk, w.end)
        # row p predicts ids[p + 1]; keep the rows whose target is in [first_target, end)
        lo, hi = max(c, w.first_target - 1), min(e, w.end - 1)
        t0 = time.perf_counter()
        logits, rs = await engine.forward(ids[None, c:e], kv, all_logits=hi > lo,
                                          more=more or e < w.end, span_end=w.end - w.begin)
        res.forward_s += time.perf_counter() - t0
        res.bytes_read += rs.bytes_read
        if hi > lo:
            nll = await asyncio.to_thread(token_nll, logits[0, lo - c:hi - c], ids[lo + 1:hi + 1])
            res.nll_sum += float(nll.sum())
            res.n_scored += hi - lo
    res.n_windows += 1
    res.n_forwarded += w.end - w.begin



async def evaluate(model: str, text: str | Sequence[int], config: EngineConfig | None = None,
                   *, ctx: int | None = None, stride: int | None = None,
                   max_tokens: int | None = None) -> EvalResult:
    """Open model and return the perplexity of text (a str, or token ids used as they are)."""
    engine = await Engine.open(model, config)
    try:
        ids = await encode_text(engine, text, max_tokens)
        return await perplexity(engine, ids, ctx, stride)
    finally:
        engine.close()
