"""Speculative decoding: draft several tokens cheaply, verify them all in one pass.

A streamed pass costs one read of every non-resident byte however many rows it computes, so a
decoding sequence may carry draft tokens beside its last token: the pass returns logits for
each of those rows, the accepted prefix of the draft is kept, the first rejected row gives the
corrected token (or, all accepted, the last row a bonus one) and the KV positions of the
rejected tokens roll back (KVCache.trim).

Drafts come from prompt lookup (the continuation of the latest earlier occurrence of the last
n-gram, in the prompt or the text so far; no model) or from a small resident draft model that
shares the target's tokenizer (a low-bit stream-convert copy of the target itself will do).

Greedy decoding accepts a draft token while it is the target's argmax. Sampling uses standard
speculative sampling (Leviathan et al. 2023): accept draft token d with probability
min(1, p(d) / q(d)), else draw from the residual max(0, p - q) renormalized; q is the draft
model's distribution, or a point mass on d for prompt lookup. The output keeps the target's
distribution.

DraftLength adapts the draft length per sequence: it grows while every draft token is
accepted, shrinks on rejections, and at zero acceptance turns drafting off for a number of
passes that doubles each time it fails again, so speculation costs little when it cannot help.
"""

from __future__ import annotations

import collections
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from stream_run.engine.runner import PassRunner
    from stream_run.engine.sampling import Sampler

MODES = ("off", "prompt_lookup", "draft_model")
NGRAM_MAX, NGRAM_MIN = 4, 2  # prompt lookup tries the longest n-gram first
# A verification pass carries at most this many rows in all (the runner's SMALL_PASS_ROWS: the
# kernels' few-row matvec path, each weight byte read once for every row)
MAX_PASS_ROWS = 8
MAX_DRAFT_TOKENS = MAX_PASS_ROWS - 1


def sweep_rows(n: int) -> int:
    """The most rows, at most n, that the numpy backend's few-row kernels compute in one
    sweep over each weight (they take rows in groups of 8, 4, 2, 1: 5 rows cost two sweeps,
    4 rows one), so draft rows beyond it are cut."""
    return 1 << (max(1, n).bit_length() - 1)


MAX_PAUSE = 32  # passes without drafts, at most, after drafting failed
DECAY = 0.8  # weight of a sequence's older passes in its acceptance rate
COST_SAMPLES = 5  # passes per row count whose median is its cost
EXPLORE_EVERY = 16  # a pass in this many keeps every draft row, whatever its estimated cost


class PassCost:
    """Seconds a decoding pass takes, by its rows (1, 2, 4, 8), measured as passes run (the
    median of the last COST_SAMPLES of each size). What a pass of more rows costs depends on
    the model and the machine (on a CPU a resident 7B Q4_0 pass of 8 rows computed 5.5x one
    row's, a SmolLM2 pass streamed at 75 MB 2x), so draft rows are worth it only where the
    tokens they are expected to add outweigh it (cut_for_cost)."""

    def __init__(self) -> None:
        self.samples: dict[int, collections.deque[float]] = {}
        self.decisions = 0  # cut_for_cost calls, for its exploration

    def add(self, rows: int, seconds: float) -> None:
        self.samples.setdefault(rows, collections.deque(maxlen=COST_SAMPLES)).append(seconds)

    def estimate(self, rows: int) -> float | None:
        """The median of the last COST_SAMPLES passes of `rows` (one pass slowed by the rest of
        a loaded machine does not move it), else that of the most rows measured below it (so
        an unmeasured size is tried), else None."""
        known = [r for r in self.samples if r <= rows]
        return statistics.median(self.samples[max(known)]) if known else None


def cut_for_cost(drafts: list[tuple[int, DraftLength]], base_rows: int, cost: PassCost
                 ) -> int:
    """The rows (a sweep size: 1, 2, 4 or 8) to give a pass whose sequences have base_rows rows
    without drafts and drafts of the given lengths (with their DraftLength; cut from the last
    one first, as the batcher cuts): the size with the most expected tokens per second. Costs
    not measured yet count as the nearest measured smaller size's; with nothing measured, and
    once in EXPLORE_EVERY calls, every draft row is kept."""
    total = base_rows + sum(d for d, _ in drafts)
    cost.decisions += 1
    if cost.decisions % EXPLORE_EVERY == 0:
        return sweep_rows(total)  # every draft row now and then: its cost stays measured
    best, best_rate = sweep_rows(total), -1.0
    for rows in sorted({sweep_rows(r) for r in range(max(1, base_rows), total + 1)}):
        cut, tokens = total - rows, float(base_rows - len(drafts))
        for d, length in reversed(drafts):
            n = min(cut, d)
            cut -= n
            tokens += length.expected_tokens(d - n)
        if cut > 0:  # fewer rows than the sequences themselves need
            continue
        seconds = cost.estimate(rows)
        if seconds is None:
            return sweep_rows(total)
        rate = tokens / max(seconds, 1e-9)
        if rate > best_rate * 1.02:  # more rows only for a clear gain
            best, best_rate = rows, rate
    return best


@dataclass
class DraftLength:
    """The draft length of one sequence's next pass (0: no draft), from how the last ones
    fared: +1 when all were accepted, -1 on a partial rejection, halved when none was
    accepted; at 0 drafting pauses for `backoff` passes (doubling, up to MAX_PAUSE, while it
    keeps failing; back to 1 after any acceptance)."""

    k_max: int
    k: int = 0
    pause: int = 0
    backoff: int = 1
    # decayed counts of accepted draft tokens and of rejections: a draft token is accepted with
    # probability about accepted / (accepted + rejected) (the geometric model's estimate)
    accepted: float = 1.0
    rejected: float = 1.0

    def __post_init__(self) -> None:
        self.k = self.k or max(1, (self.k_max + 1) // 2)

    def expected_tokens(self, d: int) -> float:
        """Tokens a pass with a draft of d yields, expected: 1 + a + ... + a^d, a this
        sequence's acceptance rate so far."""
        a = self.accepted / (self.accepted + self.rejected)
        return float(sum(a**i for i in range(d + 1)))

    def want(self) -> int:
        """The length to draft now; called once per pass of the sequence."""
        if self.pause > 0:
            self.pause -= 1
            return 0
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.accepted = DECAY * self.accepted + accepted
        self.rejected = DECAY * self.rejected + (accepted < drafted)
        if accepted == drafted:
            self.k = min(self.k_max, self.k + 1)
        elif accepted > 0:
            self.k = max(1, self.k - 1)
        else:
            self.k //= 2
        if accepted > 0:
            self.backoff = 1
        elif self.k == 0:
            self.pause, self.backoff = self.backoff, min(MAX_PAUSE, 2 * self.backoff)
            self.k = 1


def prompt_lookup(history: Sequence[int], k: int, ngram_max: int = NGRAM_MAX,
                  ngram_min: int = NGRAM_MIN) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of history's last n-gram
    (n from ngram_max down to ngram_min); [] when none occurs."""
    if k <= 0:
        return []
    arr = np.asarray(history, dtype=np.int64)
    for n in range(min(ngram_max, len(arr) - 1), ngram_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # starts 0..len-n-1
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if hits.size:
            i = int(hits[-1]) + n
            return arr[i:i + k].tolist()
    return []


class PromptLookup:
    """prompt_lookup for one growing history, with an index of every n-gram's latest start, so
    a pass costs O(new tokens) rather than a scan of the whole history."""

    def __init__(self, ngram_max: int = NGRAM_MAX, ngram_min: int = NGRAM_MIN) -> None:
        self.sizes = range(ngram_max, ngram_min - 1, -1)
        self.latest: dict[tuple[int, ...], int] = {}  # n-gram -> where its continuation starts
        self.indexed = 0  # n-grams ending before this index are in `latest`

    def __call__(self, history: Sequence[int], k: int) -> list[int]:
        """The same as prompt_lookup(history, k) for a history that only grows."""
        if k <= 0:
            return []
        end = len(history) - 1  # n-grams inside history[:-1]
        for e in range(max(self.indexed, 1), end + 1):
            for n in self.sizes:
                if e - n >= 0:
                    self.latest[tuple(history[e - n:e])] = e
        self.indexed = max(self.indexed, end + 1)
        for n in self.sizes:
            if n <= end:
                i = self.latest.get(tuple(history[-n:]))
                if i is not None:
                    return list(history[i:i + k])
        return []


@dataclass
class SpecState:
    """A sequence's speculation: its mode, draft length and this pass's draft."""

    mode: str
    length: DraftLength
    draft: list[int] = field(default_factory=list)
    draft_probs: np.ndarray | None = None  # (k, V) the draft model's q; None: point masses
    draft_kv: Any = None  # the draft model's KV cache for this sequence
    draft_fed: int = 0  # draft tokens fed to draft_kv while drafting (its rollback)
    lookup: PromptLookup = field(default_factory=PromptLookup)


def verify(sampler: Sampler, logits: np.ndarray, history: Sequence[int], draft: Sequence[int],
           q: np.ndarray | None = None) -> list[int]:
    """The tokens a verification pass yields: the accepted prefix of draft, then one more (the
    correction at the first rejection, or drawn from the last row when all were accepted).

    Args:
        logits: (len(draft) + 1, V): row i predicts the token after history + draft[:i].
        q: (len(draft), V) the draft distributions (sampling with a draft model); None: point
            masses on the draft tokens (prompt lookup, or greedy drafts).
    Runs on the compute thread.
    """
    out: list[int] = []
    greedy = sampler.params.temperature == 0
    hist = list(history)
    for i, d in enumerate(draft):
        if greedy:
            t = int(np.argmax(sampler.penalized(logits[i], hist)))
            out.append(t)
            if t != d:
                return out
            hist.append(t)
            continue
        p = sampler.probs(logits[i], hist)
        qd = 1.0 if q is None else float(q[i][d])
        if qd > 0 and sampler.uniform() * qd < p[d]:  # accept with min(1, p/q)
            out.append(int(d))
            hist.append(int(d))
            continue
        if q is None:
            resid = p.copy()
            resid[d] = 0.0
        else:
            resid = np.maximum(p - q[i], 0.0)
        total = resid.sum()
        out.append(sampler.draw(resid / total if total > 0 else p))
        return out
    out.append(sampler(logits[len(draft)], hist))
    return out


async def draft_with_model(runner: PassRunner, state: SpecState, sampler: Sampler,
                           history: list[int], k: int, max_len: int) -> None:
    """Draft k tokens with a resident draft model into state.draft (and state.draft_probs
    when sampling): first the tokens of history its cache lacks, then one pass per token."""
    if state.draft_kv is None:
        state.draft_kv = await runner.make_kv_cache(max_len)
    kv = state.draft_kv
    greedy = sampler.params.temperature == 0
    feed, draft, probs = history[kv.offset:], [], []
    for _ in range(k):
        logits, _ = await runner.forward(feed, kv)
        row = logits[-1]
        if greedy:
            t = int(np.argmax(sampler.penalized(row, history + draft)))
        else:
            q = sampler.probs(row, history + draft)
            t = sampler.draw(q)
            probs.append(q)
        draft.append(t)
        feed = [t]
    state.draft, state.draft_fed = draft, k - 1
    state.draft_probs = np.stack(probs) if probs else None


def settle_draft_kv(state: SpecState, accepted: int) -> None:
    """After verification: the draft model's cache keeps the accepted draft tokens it holds
    (it was fed all but the last token it drafted)."""
    kv, fed = state.draft_kv, state.draft_fed
    if kv is not None and fed:
        kv.trim(fed - min(accepted, fed))
    state.draft_fed = 0


@dataclass
class Speculation:
    """The engine's speculation settings: the default mode, the most draft tokens per pass,
    and the draft model's pass runner (None: no draft model)."""

    mode: str = "off"
    num_draft_tokens: int = 7
    draft: PassRunner | None = None

    def state_for(self, speculative: str | None, num_draft_tokens: int | None
                  ) -> SpecState | None:
        """A new sequence's SpecState (None: speculation off), from its request's settings
        (None: the defaults).

        Raises:
            ValueError: "draft_model" asked of an engine without a draft model.
        """
        mode = speculative or self.mode
        if mode == "off":
            return None
        if mode == "draft_model" and self.draft is None:
            raise ValueError("speculative='draft_model': this engine has no draft model "
                             "(open it with draft_model=PATH, stream-run --draft-model)")
        return SpecState(mode, DraftLength(num_draft_tokens or self.num_draft_tokens))
