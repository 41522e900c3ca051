"""Tools in chat completions: the request's `tools` checked, and tool calls parsed out of the
model's text in the formats the supported families' chat templates teach:

- Hermes / Qwen 2.5 and 3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block
  per call, possibly after some text;
- Llama 3.1-3.3 JSON: the whole answer is `{"name": ..., "parameters": {...}}` (or
  "arguments"), optionally after `<|python_tag|>`, several calls separated by ';'. As the answer
  could be plain JSON, only names of the request's tools count as calls.

The tools reach the model through its chat template (the jinja2 `tools` variable, as HF
transformers renders it); the server refuses tools for a template that never reads them.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from stream_run.server.errors import bad

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_HERMES = re.compile(re.escape(HERMES_OPEN) + r"(.*?)(?:" + re.escape(HERMES_CLOSE) + r"|\Z)",
                     re.DOTALL)
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def parse_tools(value: Any) -> list[dict[str, Any]] | None:
    """Check the request's `tools` (OpenAI's function tools); None when there are none.

    A `parameters` given as a string must hold a JSON object (some clients send it encoded).
    Raises APIError 400 naming the field.
    """
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise bad("'tools' must be an array of tool objects", "tools")
    return [_tool(t, f"tools[{i}]") for i, t in enumerate(value)]


def _tool(tool: Any, param: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function" \
            or not isinstance(tool.get("function"), dict):
        raise bad(f"'{param}' must be an object {{\"type\": \"function\", \"function\": "
                  "{...}}", param)
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad(f"'{param}.function.name' must be 1-64 letters, digits, '_', '-' or '.', "
                  f"got {name!r}", f"{param}.function.name")
    out: dict[str, Any] = {"name": name}
    if fn.get("description") is not None:
        if not isinstance(fn["description"], str):
            raise bad(f"'{param}.function.description' must be a string",
                      f"{param}.function.description")
        out["description"] = fn["description"]
    params = fn.get("parameters")
    if isinstance(params, str):
        try:
            params = json.loads(params)
        except ValueError as exc:
            raise bad(f"'{param}.function.parameters' is not JSON: {exc}",
                      f"{param}.function.parameters") from None
    if params is not None:
        if not isinstance(params, dict):
            raise bad(f"'{param}.function.parameters' must be a JSON Schema object, got "
                      f"{type(params).__name__}", f"{param}.function.parameters")
        out["parameters"] = params
    return {"type": "function", "function": out}


def parse_tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> str:
    """"auto" (the model decides) or "none" (tools are neither rendered nor parsed).
    "required" and a named function would need a grammar per tool schema: refused."""
    if value is None:
        return "auto" if tools else "none"
    if value == "none" or value == "auto" and tools:
        return value
    if value == "auto":
        raise bad("'tool_choice' is 'auto' but the request has no 'tools'", "tool_choice")
    if value == "required" or isinstance(value, dict):
        raise bad("'tool_choice' may be 'auto' or 'none' on this server (forcing a call "
                  "is not supported)", "tool_choice")
    raise bad(f"'tool_choice' must be 'none' or 'auto', got {value!r}", "tool_choice")


def arguments_object(arguments: Any) -> Any:
    """An assistant message's tool-call arguments as chat templates take them (a dict, as HF
    does): OpenAI clients send them JSON-encoded."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _call(obj: Any, names: set[str] | None) -> dict[str, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if names is not None and obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        encoded = args
    else:
        encoded = json.dumps(args, ensure_ascii=False)
    return {"name": obj["name"], "arguments": encoded}


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_tool_calls(text: str, names: set[str]) -> tuple[str, list[dict[str, str]]]:
    """(content outside the calls, calls as {"name", "arguments" (a JSON string)}); no calls:
    (text, [])."""
    if HERMES_OPEN in text:
        calls = [_call(_loads(m.group(1).strip()), None) for m in _HERMES.finditer(text)]
        if calls and all(c is not None for c in calls):
            return _HERMES.sub("", text), calls  # type: ignore[return-value]
        return text, []
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    if not body.startswith("{"):
        return text, []
    whole = _loads(body)
    objs = whole if isinstance(whole, list) else [whole] if whole is not None \
        else [_loads(p) for p in body.split(";") if p.strip()]
    calls = [_call(o, names) for o in objs]
    if calls and all(c is not None for c in calls):
        return "", calls  # type: ignore[return-value]
    return text, []


def tool_call_objects(calls: list[dict[str, str]]) -> list[dict[str, Any]]:
    return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]


class ToolStream:
    """Streams the text of an answer that may hold tool calls: text that is plainly content
    goes out at once; from where a call may begin (a '<tool_call>', or an answer that opens
    with '{' or '<|python_tag|>') it is held, and parsed when the answer ends."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.text = ""
        self.emitted = 0  # text[:emitted] has gone out as content
        self.holding = False  # a call may have begun: hold everything to the end

    def feed(self, delta: str) -> str:
        """The content to send now."""
        self.text += delta
        if self.holding:
            return ""
        if self.emitted == 0:
            head = self.text.lstrip()
            if head.startswith(("{", PYTHON_TAG)):  # Llama 3 JSON: the whole answer is calls
                self.holding = True
                return ""
            if not head or PYTHON_TAG.startswith(head):  # whitespace, or a tag in the making
                return ""
        at = self.text.find(HERMES_OPEN, self.emitted)
        if at >= 0:
            self.holding = True
            return self._emit(at)
        keep = max((k for k in range(1, len(HERMES_OPEN)) if self.text.endswith(HERMES_OPEN[:k])),
                   default=0)
        return self._emit(len(self.text) - keep)

    def _emit(self, end: int) -> str:
        out, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return out

    def finish(self) -> tuple[str, list[dict[str, str]]]:
        """(the content still to send, the calls) once the answer has ended."""
        content, calls = parse_tool_calls(self.text, self.names)
        if not calls:
            return self._emit(len(self.text)), []
        return content[self.emitted:] if self.emitted <= len(content) else "", calls
