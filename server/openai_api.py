"""The OpenAI protocol, without HTTP: request bodies checked into engine arguments, responses
and SSE chunks built as dicts, errors as OpenAI error objects with their status codes."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from stream_run.engine.request import Chunk, GenerationParams
from stream_run.engine.sampling import SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 4


class APIError(Exception):
    """An error answered as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    model_name: str
    max_tokens_cap: int  # the largest max_tokens a request may ask for (and the default)
    vocab_size: int  # token ids in a prompt must be below it
    # the model's sampling defaults (generation_config.json / GGUF general.sampling.*) for
    # fields a request leaves unset; OpenAI's where the model ships none
    sampling_defaults: dict[str, float] = field(default_factory=dict)


@dataclass
class ParsedRequest:
    """A checked request: the prompt for Engine.encode_prompt, and the generation settings.
    max_tokens is None when the request did not set it (the server fills in the default)."""

    kind: str  # "chat" | "completion"
    prompt: str | list[int] | list[dict[str, Any]]
    max_tokens: int | None
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    model: str = ""
    speculative: str | None = None  # per-request override of the server's default
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    def params(self, max_tokens: int) -> GenerationParams:
        return GenerationParams(max_tokens=max_tokens, sampling=self.sampling, stop=self.stop,
                                speculative=self.speculative)


def parse_chat(body: Any, limits: Limits) -> ParsedRequest:
    """Check a /v1/chat/completions body. Raises APIError (400/404)."""
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array of message objects", "messages")
    prompt = [_message(m, i) for i, m in enumerate(messages)]
    # refused rather than ignored: a client that asked for them would misread a plain answer
    unsupported = {"logprobs": bool(body.get("logprobs")),
                   "top_logprobs": body.get("top_logprobs") not in (None, 0),
                   "tools": bool(body.get("tools")),
                   "tool_choice": body.get("tool_choice") not in (None, "none"),
                   "functions": bool(body.get("functions")),
                   "function_call": body.get("function_call") not in (None, "none")}
    for name, used in unsupported.items():
        if used:
            raise bad(f"'{name}' is not supported by this server", name)
    cap = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return _common(body, limits, "chat", prompt, _max_tokens(cap, param, limits))


def parse_completion(body: Any, limits: Limits) -> ParsedRequest:
    """Check a /v1/completions body. Raises APIError (400/404)."""
    body = _object(body)
    prompt = _prompt(body.get("prompt"), limits)
    unsupported = {"echo": bool(body.get("echo")), "suffix": bool(body.get("suffix")),
                   "logprobs": body.get("logprobs") not in (None, 0),
                   "best_of": body.get("best_of") not in (None, 1)}
    for name, used in unsupported.items():
        if used:
            raise bad(f"'{name}' is not supported by this server", name)
    return _common(body, limits, "completion", prompt,
                   _max_tokens(body.get("max_tokens"), "max_tokens", limits))


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def _common(body: dict[str, Any], limits: Limits, kind: str, prompt: Any,
            max_tokens: int | None) -> ParsedRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' must be a non-empty string", "model")
    if model != limits.model_name:
        raise APIError(404, f"the model '{model}' does not exist; this server serves "
                       f"'{limits.model_name}'", param="model", code="model_not_found")
    if body.get("n", 1) != 1 or isinstance(body.get("n"), bool):
        raise bad("only n=1 is supported", "n")
    stream = _typed(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    include_usage = _typed(options or {}, "include_usage", bool, False, "stream_options")
    speculative = _typed(body, "speculative", str, None)  # GenerationParams checks it
    return ParsedRequest(kind, prompt, max_tokens, _sampling(body, limits.sampling_defaults),
                         _stop(body.get("stop")),
                         stream, include_usage and stream, model, speculative)


def _typed(obj: dict[str, Any], name: str, kind: type, default: Any, prefix: str = "") -> Any:
    value = obj.get(name)
    if value is None:
        return default
    if kind in (int, float) and isinstance(value, bool) or not isinstance(value, kind):
        what = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[kind]
        param = f"{prefix}.{name}" if prefix else name
        raise bad(f"'{param}' must be {what}, got {value!r}", param)
    return value


def _number(body: dict[str, Any], name: str, lo: float, hi: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise bad(f"'{name}' must be a number in [{lo:g}, {hi:g}], got {value!r}", name)
    return float(value)


def _sampling(body: dict[str, Any], defaults: dict[str, float]) -> SamplingParams:
    temperature = _number(body, "temperature", 0, 2, defaults.get("temperature", 1.0))
    top_p = _number(body, "top_p", 0, 1, defaults.get("top_p", 1.0))
    if top_p == 0:  # only the most likely token: greedy
        temperature, top_p = 0.0, 1.0
    seed = _typed(body, "seed", int, None)
    top_k = _typed(body, "top_k", int, int(defaults.get("top_k", 0)))  # llama.cpp / vLLM
    if top_k < 0:
        raise bad(f"'top_k' must be >= 0, got {top_k}", "top_k")
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                          min_p=_number(body, "min_p", 0, 0.999, defaults.get("min_p", 0.0)),
                          repetition_penalty=_number(body, "repetition_penalty", 0.01, 10,
                                                     defaults.get("repetition_penalty", 1.0)))


def _max_tokens(value: Any, param: str, limits: Limits) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad(f"'{param}' must be a positive integer, got {value!r}", param)
    if value > limits.max_tokens_cap:
        raise bad(f"'{param}' is {value}, above this server's limit of "
                  f"{limits.max_tokens_cap}", param)
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) \
            or len(stops) > MAX_STOPS:
        raise bad(f"'stop' must be a string or an array of up to {MAX_STOPS} strings", "stop")
    return tuple(s for s in stops if s)


def _message(m: Any, i: int) -> dict[str, Any]:
    param = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(f"'{param}' must be an object with 'role' and 'content'", param)
    role = m.get("role")
    if role not in ROLES:
        raise bad(f"'{param}.role' must be one of {', '.join(ROLES)}, got {role!r}",
                  f"{param}.role")
    content = m.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) for p in content):
            raise bad(f"'{param}.content': only text parts are supported", f"{param}.content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise bad(f"'{param}.content' must be a string or an array of text parts",
                  f"{param}.content")
    return {"role": "system" if role == "developer" else role, "content": content}


def _prompt(value: Any, limits: Limits) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one prompt
    if isinstance(value, str):
        if not value:
            raise bad("'prompt' is empty", "prompt")
        return value
    if isinstance(value, list) and value and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value):
        if not all(0 <= t < limits.vocab_size for t in value):
            raise bad(f"'prompt' has token ids outside [0, {limits.vocab_size})", "prompt")
        return value
    raise bad("'prompt' must be a non-empty string or array of token ids (one prompt per "
              "request)", "prompt")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _envelope(req: ParsedRequest, obj: str) -> dict[str, Any]:
    prefix = "chatcmpl-" if req.kind == "chat" else "cmpl-"
    return {"id": prefix + req.id, "object": obj, "created": req.created, "model": req.model,
            "system_fingerprint": "stream-run"}


def stream_chunk(req: ParsedRequest, text: str, finish_reason: str | None = None,
                 first: bool = False) -> dict[str, Any]:
    """One SSE chunk: a content delta (the first also carries the role) or the finish."""
    if req.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text or first:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        out = {**_envelope(req, "chat.completion.chunk"), "choices": [choice]}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        out = {**_envelope(req, "text_completion"), "choices": [choice]}
    if req.include_usage:
        out["usage"] = None
    return out


def usage_chunk(req: ParsedRequest, prompt_tokens: int, completion_tokens: int
                ) -> dict[str, Any]:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {**_envelope(req, obj), "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def response(req: ParsedRequest, text: str, last: Chunk) -> dict[str, Any]:
    """The non-streaming answer."""
    assert last.stats is not None
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": last.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None,
                  "finish_reason": last.finish_reason}
        obj = "text_completion"
    return {**_envelope(req, obj), "choices": [choice],
            "usage": usage(last.stats.prompt_tokens, last.stats.generation_tokens)}
