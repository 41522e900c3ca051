"""OpenAI response bodies and SSE chunks built from engine chunks: choices (n per prompt),
logprobs in the chat and the completions formats, echo, tool calls, usage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stream_run.engine.request import Chunk
from stream_run.engine.sampling import TokenLogprob
from stream_run.server.openai_api import ParsedRequest
from stream_run.server.tools import ToolStream, parse_tool_calls, tool_call_objects

if TYPE_CHECKING:
    from stream_run.engine.batching import Generation
    from stream_run.engine.tokenizer import Tokenizer


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte (the inverse of bytes_to_unicode)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTES = _byte_decoder()


class TokenStrings:
    """A token id's text (as OpenAI's 'token') and its exact bytes: for a byte-level BPE
    vocabulary the bytes of its piece, which may be part of a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self.tokenizer.decode([token_id])
            piece = self.tokenizer.tok.id_to_token(token_id) or ""
            raw = bytes(_BYTES[c] for c in piece) if piece and all(c in _BYTES for c in piece) \
                and "\ufffd" in text else text.encode()
            hit = self._cache[token_id] = (text, list(raw))
        return hit


def vocab_bytes(tokenizer: Tokenizer, n_ids: int) -> list[bytes | None]:
    """Each id's bytes for a sampling constraint; None for added (special) tokens and ids the
    tokenizer does not know (the model's vocabulary may be padded)."""
    strings = TokenStrings(tokenizer)
    added = set(tokenizer.tok.get_added_tokens_decoder())
    known = tokenizer.vocab_size
    return [None if i in added or i >= known else bytes(strings(i)[1]) for i in range(n_ids)]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
          ) -> dict[str, Any]:
    """OpenAI's usage object; prompt_tokens_details.cached_tokens: prompt tokens whose KV came
    from the prefix cache (--kv-cache-budget), as OpenAI reports its prompt caching."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_logprobs(lps: Sequence[TokenLogprob], strings: TokenStrings) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = strings(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [{**entry(lp.token_id, lp.logprob),
                         "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps],
            "refusal": None}


def completion_logprobs(ids: Sequence[int], lps: Sequence[TokenLogprob | None],
                        strings: TokenStrings, offset: int) -> dict[str, Any]:
    """The completions format; offset: where the first token starts in the choice's text.
    A token with no context (the echoed prompt's first) has null logprob and top_logprobs."""
    tokens, offsets = [], []
    for t in ids:
        text = strings(t)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens,
            "token_logprobs": [None if lp is None else lp.logprob for lp in lps],
            "top_logprobs": [None if lp is None else _top_dict(lp.top, strings) for lp in lps],
            "text_offset": offsets}


def _top_dict(top: Sequence[tuple[int, float]], strings: TokenStrings) -> dict[str, float]:
    """{token text: logprob}; tokens of the same text (parts of one UTF-8 character) keep
    the likeliest's value, so max() over it is still the top logprob."""
    out: dict[str, float] = {}
    for t, v in top:  # most likely first
        out.setdefault(strings(t)[0], v)
    return out


@dataclass(eq=False)
class ChoiceRun:
    """One choice: its prompt, its generation (None when the answer is `ready`), what it
    produced."""

    index: int
    prompt_ids: list[int]
    generation: Generation | None
    echo_text: str = ""  # the prompt opening the text (completions' echo)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # echo with logprobs
    tools: ToolStream | None = None
    text: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    ready: Chunk | None = None  # the whole answer, known without a generation (echo)

    def add(self, chunk: Chunk) -> None:
        self.text.append(chunk.text)
        self.ids += chunk.token_ids
        self.logprobs += chunk.logprobs or []
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
            if chunk.stats is not None:
                self.completion_tokens = chunk.stats.generation_tokens
                self.cached_tokens = chunk.stats.prompt_tokens_reused


def _envelope(req: ParsedRequest, obj: str) -> dict[str, Any]:
    prefix = "chatcmpl-" if req.kind == "chat" else "cmpl-"
    return {"id": prefix + req.id, "object": obj, "created": req.created, "model": req.model,
            "system_fingerprint": "stream-run"}


def response(req: ParsedRequest, runs: Sequence[ChoiceRun], strings: TokenStrings,
             prompt_tokens: int) -> dict[str, Any]:
    """The non-streaming answer."""
    choices = []
    for run in runs:
        text = "".join(run.text)
        choice: dict[str, Any] = {"index": run.index, "logprobs": None,
                                  "finish_reason": run.finish_reason}
        if req.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if run.tools is not None:
                content, calls = parse_tool_calls(text, run.tools.names)
                if calls:
                    message = {"role": "assistant", "content": content.strip() or None,
                               "tool_calls": tool_call_objects(calls)}
                    choice["finish_reason"] = "tool_calls"
            choice["message"] = message
            if req.logprobs is not None:
                choice["logprobs"] = chat_logprobs(run.logprobs, strings)
        else:
            choice["text"] = run.echo_text + text
            if req.logprobs is not None:
                ids, lps = run.ids, [*run.logprobs]
                if run.prompt_logprobs is not None:
                    ids, lps = run.prompt_ids + ids, [*run.prompt_logprobs, *lps]
                choice["logprobs"] = completion_logprobs(ids, lps, strings, 0)
        choices.append(choice)
    obj = "chat.completion" if req.kind == "chat" else "text_completion"
    return {**_envelope(req, obj), "choices": choices,
            "usage": usage(prompt_tokens, sum(r.completion_tokens for r in runs),
                           sum(r.cached_tokens for r in runs))}


def stream_chunk(req: ParsedRequest, index: int, text: str = "",
                 finish_reason: str | None = None, *, first: bool = False,
                 logprobs: dict[str, Any] | None = None,
                 tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One SSE chunk of choice `index`: a content delta (a chat choice's first carries the
    role), its tokens' logprobs, tool calls, or the finish."""
    if req.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text or first:
            delta["content"] = text
        if tool_calls:
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(tool_calls)]
        choice = {"index": index, "delta": delta, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        out = {**_envelope(req, "chat.completion.chunk"), "choices": [choice]}
    else:
        choice = {"index": index, "text": text, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        out = {**_envelope(req, "text_completion"), "choices": [choice]}
    if req.include_usage:
        out["usage"] = None
    return out


def usage_chunk(req: ParsedRequest, prompt_tokens: int, completion_tokens: int,
                cached_tokens: int = 0) -> dict[str, Any]:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {**_envelope(req, obj), "choices": [],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


class StreamedChoice:
    """The SSE chunks of one choice as its engine chunks arrive (streaming)."""

    def __init__(self, req: ParsedRequest, run: ChoiceRun, strings: TokenStrings) -> None:
        self.req, self.run, self.strings = req, run, strings
        self.offset = 0  # completions' text_offset of the next token

    def opening(self) -> list[dict[str, Any]]:
        """A chat choice's role; a completion's echoed prompt (with its logprobs)."""
        req, run = self.req, self.run
        if req.kind == "chat":
            return [stream_chunk(req, run.index, first=True)]
        if not req.echo:
            return []
        lps = None
        if run.prompt_logprobs is not None:
            lps = completion_logprobs(run.prompt_ids, run.prompt_logprobs, self.strings, 0)
        self.offset = len(run.echo_text)
        return [stream_chunk(req, run.index, run.echo_text, logprobs=lps)]

    def _logprobs(self, chunk: Chunk) -> dict[str, Any] | None:
        if chunk.logprobs is None:
            return None
        if self.req.kind == "chat":
            return chat_logprobs(chunk.logprobs, self.strings)
        lps = completion_logprobs(chunk.token_ids, chunk.logprobs, self.strings, self.offset)
        self.offset += sum(len(t) for t in lps["tokens"])
        return lps

    def feed(self, chunk: Chunk) -> list[dict[str, Any]]:
        """The SSE objects for an engine chunk."""
        req, run = self.req, self.run
        run.add(chunk)
        text = run.tools.feed(chunk.text) if run.tools is not None else chunk.text
        out = []
        lps = self._logprobs(chunk)
        if text or (lps is not None and chunk.token_ids):
            out.append(stream_chunk(req, run.index, text, logprobs=lps))
        if chunk.finish_reason is None:
            return out
        reason = chunk.finish_reason
        if run.tools is not None:
            rest, calls = run.tools.finish()
            if rest:
                out.append(stream_chunk(req, run.index, rest))
            if calls:
                out.append(stream_chunk(req, run.index, tool_calls=tool_call_objects(calls)))
                reason = "tool_calls"
        out.append(stream_chunk(req, run.index, "", reason))
        return out
