"""Sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    repetition_context: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_k", self.top_k >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("repetition_context", self.repetition_context >= 0, ">= 0"),
            # numpy's generator takes seeds >= 0 only; say so before any model is loaded
            ("seed", self.seed is None or (isinstance(self.seed, int) and self.seed >= 0),
             "an integer >= 0"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        """Pick the next token from (V,) logits; history is the ids so far (for the penalty)."""
        if self.params.temperature == 0:
            return int(np.argmax(self.penalized(logits, history)))
        return self.draw(self.probs(logits, history))

    def penalized(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """(V,) logits as float64 with the repetition penalty applied."""
        p = self.params
        logits = logits.astype(np.float64)
        if p.repetition_penalty != 1.0 and history and p.repetition_context:
            ids = np.unique(np.asarray(history[-p.repetition_context:], dtype=np.int64))
            vals = logits[ids]
            logits[ids] = np.where(vals > 0, vals / p.repetition_penalty,
                                   vals * p.repetition_penalty)
        return logits

    def probs(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """The (V,) distribution a token is drawn from (temperature > 0): penalty,
        temperature, top-k, top-p, min-p. Speculative sampling compares drafts against it."""
        p = self.params
        logits = self.penalized(logits, history) / p.temperature
        if p.top_k and p.top_k < logits.size:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, p.top_p)) + 1]  # smallest set with mass >= p
            mask = np.zeros_like(probs, dtype=bool)
            mask[keep] = True
            probs = np.where(mask, probs, 0.0)
        if p.min_p > 0:
            probs = np.where(probs >= p.min_p * probs.max(), probs, 0.0)
        return probs / probs.sum()

    def draw(self, probs: np.ndarray) -> int:
        """A token drawn from a (V,) distribution with this sampler's generator."""
        return int(self.rng.choice(probs.size, p=probs))

    def uniform(self) -> float:
        return float(self.rng.random())
