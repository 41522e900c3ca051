"""The OpenAI protocol, without HTTP: request bodies checked into engine arguments, responses
and SSE chunks built as dicts, errors as OpenAI error objects with their status codes."""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from stream_run.engine.request import GenerationParams
from stream_run.engine.sampling import SamplingParams
from stream_run.engine.speculative import MODES as SPEC_MODES
from stream_run.server.errors import APIError, bad
from stream_run.server.tools import arguments_object, parse_tool_choice, parse_tools

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20  # OpenAI's bound for top_logprobs (completions' logprobs: 5; vLLM: 20)
MAX_PROMPTS = 64  # prompts in one /v1/completions request
__all__ = ["APIError", "bad"]


@dataclass(frozen=True)
class Limits:
    model_name: str
    max_tokens_cap: int  # the largest max_tokens a request may ask for (and the default)
    vocab_size: int  # token ids in a prompt must be below it
    # the model's sampling defaults (generation_config.json / GGUF general.sampling.*) for
    # fields a request leaves unset; OpenAI's where the model ships none
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    max_n: int = 8  # the largest n (choices per prompt)
    template_reads_tools: bool = False  # the chat template renders a `tools` list


@dataclass
class ParsedRequest:
    """A checked request: the prompt for Engine.encode_prompt, and the generation settings.
    max_tokens is None when the request did not set it (the server fills in the default)."""

    kind: str  # "chat" | "completion"
    prompts: list[str | list[int] | list[dict[str, Any]]]  # chat: one (its messages)
    max_tokens: int | None
    sampling: SamplingParams  # its logprobs: None, or the top-k alternatives wanted
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    model: str = ""
    n: int = 1
    echo: bool = False  # completions: the prompt opens the text (and its logprobs, if asked)
    json_object: bool = False  # response_format {"type": "json_object"}: sampling constrained
    tools: list[dict[str, Any]] | None = None  # rendered and parsed (tool_choice "auto")
    speculative: str | None = None  # per-request override of the server's default
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def logprobs(self) -> int | None:
        return self.sampling.logprobs

    def params(self, max_tokens: int, index: int = 0) -> GenerationParams:
        """The generation of choice `index` of a prompt: a seeded request's choices differ
        (seed + index), so n > 1 samples n answers reproducibly."""
        sampling = self.sampling
        if index and sampling.seed is not None:
            sampling = dataclasses.replace(sampling, seed=sampling.seed + index)
        return GenerationParams(max_tokens=max_tokens, sampling=sampling, stop=self.stop,
                                speculative=self.speculative)


def parse_chat(body: Any, limits: Limits) -> ParsedRequest:
    """Check a /v1/chat/completions body. Raises APIError (400/404)."""
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array of message objects", "messages")
    prompt = [_message(m, i) for i, m in enumerate(messages)]
    # refused rather than ignored: a client that asked for them would misread a plain answer
    for name in ("functions", "function_call"):
        if body.get(name) not in (None, "none", []):
            raise bad(f"'{name}' (deprecated) is not supported; use 'tools'", name)
    tools = parse_tools(body.get("tools"))
    if parse_tool_choice(body.get("tool_choice"), tools) == "none":
        tools = None
    if tools and not limits.template_reads_tools:
        raise bad("this model's chat template does not render tools (it never reads "
                  "'tools'), so the model would not see them", "tools")
    logprobs = _typed(body, "logprobs", bool, False)
    top = _int_in(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    json_object = _response_format(body.get("response_format"))
    if json_object and not any("json" in m["content"].lower() for m in prompt):
        raise bad("'messages' must contain the word 'json' in some form to use "
                  "'response_format' of type 'json_object'", "messages")
    cap = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    req = _common(body, limits, "chat", [prompt], _max_tokens(cap, param, limits),
                  (top or 0) if logprobs else None)
    req.json_object, req.tools = json_object, tools
    return req


def parse_completion(body: Any, limits: Limits) -> ParsedRequest:
    """Check a /v1/completions body. Raises APIError (400/404)."""
    body = _object(body)
    prompts = _prompts(body.get("prompt"), limits)
    if body.get("suffix"):
        raise bad("'suffix' is not supported by this server", "suffix")
    echo = _typed(body, "echo", bool, False)
    logprobs = _int_in(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    max_tokens = _max_tokens(body.get("max_tokens"), "max_tokens", limits, allow_zero=echo)
    req = _common(body, limits, "completion", prompts, max_tokens, logprobs)
    best_of = body.get("best_of")
    if best_of is not None and best_of != req.n:
        raise bad("'best_of' is not supported by this server (only best_of = n)", "best_of")
    req.echo = echo
    return req


def _int_in(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise bad(f"'{name}' must be an integer in [{lo}, {hi}], got {value!r}", name)
    return value


def _response_format(value: Any) -> bool:
    """Whether the answer must be a JSON object (its sampling is constrained)."""
    if value is None:
        return False
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return False
    if kind == "json_object":
        return True
    if kind == "json_schema":
        raise bad("'response_format' type 'json_schema' is not supported (only 'json_object' "
                  "is constrained); use 'json_object'", "response_format")
    raise bad("'response_format' must be {\"type\": \"text\"} or {\"type\": "
              f"\"json_object\"}}, got {value!r}", "response_format")


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def _common(body: dict[str, Any], limits: Limits, kind: str, prompts: list[Any],
            max_tokens: int | None, logprobs: int | None) -> ParsedRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' must be a non-empty string", "model")
    if model != limits.model_name:
        raise APIError(404, f"the model '{model}' does not exist; this server serves "
                       f"'{limits.model_name}'", param="model", code="model_not_found")
    n = _typed(body, "n", int, 1)
    if not 1 <= n <= limits.max_n:
        raise bad(f"'n' must be in [1, {limits.max_n}] on this server (--max-n), got {n}",
                  "n")
    stream = _typed(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    include_usage = _typed(options or {}, "include_usage", bool, False, "stream_options")
    sampling = dataclasses.replace(_sampling(body, limits.sampling_defaults), logprobs=logprobs)
    speculative = _typed(body, "speculative", str, None)
    if speculative is not None and speculative not in SPEC_MODES:
        raise bad(f"speculative must be one of {', '.join(SPEC_MODES)}, got {speculative!r}",
                  param="speculative")
    return ParsedRequest(kind, prompts, max_tokens, sampling, _stop(body.get("stop")),
                         stream, include_usage and stream, model, n, speculative=speculative)


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


def _max_tokens(value: Any, param: str, limits: Limits, allow_zero: bool = False
                ) -> int | None:
    if value is None:
        return None
    lo = 0 if allow_zero else 1  # echo with max_tokens 0: score the prompt only
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        what = "an integer >= 0 (with echo)" if allow_zero else "a positive integer"
        raise bad(f"'{param}' must be {what}, got {value!r}", param)
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
    out: dict[str, Any] = {"role": "system" if role == "developer" else role,
                           "content": content}
    calls = m.get("tool_calls")
    if role == "assistant" and calls:
        out["tool_calls"] = [_tool_call(c, f"{param}.tool_calls[{j}]")
                             for j, c in enumerate(calls if isinstance(calls, list) else [None])]
    for key in ("tool_call_id", "name"):
        if isinstance(m.get(key), str):
            out[key] = m[key]
    return out


def _tool_call(call: Any, param: str) -> dict[str, Any]:
    """An assistant message's tool call, its arguments decoded as chat templates expect."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad(f"'{param}' must be {{\"type\": \"function\", \"function\": {{\"name\": "
                  "..., \"arguments\": ...}}}}", param)
    args = arguments_object(fn.get("arguments", {}))
    return {"id": call.get("id"), "type": "function",
            "function": {"name": fn["name"], "arguments": args}}


def _prompts(value: Any, limits: Limits) -> list[str | list[int]]:
    """A prompt, or an array of them: strings or arrays of token ids."""
    batch = isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value)
    prompts = value if batch else [value]
    if len(prompts) > MAX_PROMPTS:
        raise bad(f"'prompt' has {len(prompts)} prompts, above this server's limit of "
                  f"{MAX_PROMPTS}", "prompt")
    return [_prompt(p, limits) for p in prompts]


def _prompt(value: Any, limits: Limits) -> str | list[int]:
    if isinstance(value, str):
        if not value:
            raise bad("'prompt' is empty", "prompt")
        return value
    if isinstance(value, list) and value and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value):
        if not all(0 <= t < limits.vocab_size for t in value):
            raise bad(f"'prompt' has token ids outside [0, {limits.vocab_size})", "prompt")
        return value
    raise bad("'prompt' must be a non-empty string or array of token ids, or an array of "
              "them", "prompt")
