"""What a generation request takes and gives back: parameters, streamed chunks, the whole
completion, and the stop-string filter."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from stream_run.engine.sampling import SamplingParams, TokenLogprob
from stream_run.engine.speculative import MAX_DRAFT_TOKENS
from stream_run.engine.speculative import MODES as SPEC_MODES
from stream_run.engine.stats import GenerationStats

FINISH_REASONS = ("stop", "length", "cancelled")
_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # speculative decoding (engine/speculative.py): "off", "prompt_lookup" or "draft_model"
    # (the engine's draft model); None: the engine's default (EngineConfig.speculative)
    speculative: str | None = None
    num_draft_tokens: int | None = None  # the most draft tokens per pass; None: the engine's

    def __post_init__(self) -> None:
        if self.speculative is not None and self.speculative not in SPEC_MODES:
            raise ValueError(f"speculative must be one of {', '.join(SPEC_MODES)}, got "
                             f"{self.speculative!r}")
        if self.num_draft_tokens is not None and (
                isinstance(self.num_draft_tokens, bool)
                or not isinstance(self.num_draft_tokens, int)
                or not 1 <= self.num_draft_tokens <= MAX_DRAFT_TOKENS):
            raise ValueError(f"num_draft_tokens must be an int in 1..{MAX_DRAFT_TOKENS}, got "
                             f"{self.num_draft_tokens!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) \
                or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an int >= 0, got {self.max_tokens!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")

    def replace(self, **overrides: object) -> GenerationParams:
        """A copy with GenerationParams or SamplingParams fields replaced (None = keep).

        `stop` takes a string or a list of strings.

        Raises:
            TypeError: an unknown name; ValueError: a bad value (named in the message).
        """
        overrides = {k: v for k, v in overrides.items() if v is not None}
        sampling = {k: overrides.pop(k) for k in list(overrides) if k in _SAMPLING_FIELDS}
        if "stop" in overrides:
            stop = overrides["stop"]
            overrides["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)  # type: ignore[arg-type]
        if sampling:
            overrides["sampling"] = dataclasses.replace(self.sampling, **sampling)
        return dataclasses.replace(self, **overrides) if overrides else self


@dataclass
class Chunk:
    """One streamed piece: a text delta and the ids sampled since the previous chunk (all ids,
    the EOS id included, appear in exactly one chunk). The last chunk has finish_reason
    ("stop" | "length" | "cancelled") and stats. With SamplingParams.logprobs set, logprobs
    has one entry per id of token_ids (engine/sampling.py says which distribution)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stats: GenerationStats | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Completion:
    """A whole generation (Engine.complete)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for

    @property
    def usage(self) -> Usage:
        return Usage(self.stats.prompt_tokens, self.stats.generation_tokens)


class StopFilter:
    """Holds back text that could be the start of a stop string; cuts at a full match."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.pending = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        keep = 0 if final else max(
            (k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])),
            default=0,
        )
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False
