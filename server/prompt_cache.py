"""POST /v1/prompt_cache (a stream-run extension, issue 20): save the KV the prefix cache holds
to a prompt-cache file, or load one into it, by name inside the directory the operator gave
with --prompt-cache-dir (clients never name server paths). Off without that flag.

    {"action": "save", "name": "conv-42"}                 the entry used or added last
    {"action": "save", "name": "doc", "prompt": "..."}    the entry for this prompt's tokens
    {"action": "load", "name": "doc"}                     -> {"tokens": n}

A file from another model or KV setting, or cut short, is a 400 naming the file; the server
serves on.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

from aiohttp import web

from stream_run.server.errors import APIError, bad

if TYPE_CHECKING:
    from stream_run.server.app import ServerState

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
SUFFIX = ".safetensors"


async def handle(request: web.Request, state: ServerState, body: Any) -> web.Response:
    directory = state.config.prompt_cache_dir
    if directory is None:
        raise APIError(404, "prompt-cache files are off on this server; hint: start "
                       "stream-serve with --prompt-cache-dir DIR", code="not_enabled")
    engine = state.ready_engine()
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    action, name = body.get("action"), body.get("name")
    if action not in ("save", "load"):
        raise bad(f"action must be 'save' or 'load', got {action!r}", param="action")
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise bad("name must be 1-100 letters, digits, '_', '.' or '-' (no path), got "
                  f"{name!r}", param="name")
    path = os.path.join(directory, name + SUFFIX)
    try:
        if action == "load":
            if not os.path.isfile(path):
                raise APIError(404, f"prompt-cache file {name}{SUFFIX}: not in the server's "
                               "prompt-cache directory", param="name", code="not_found")
            return web.json_response({"name": name, "tokens": len(
                await engine.load_prompt_cache(path))})
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise bad("prompt must be a string", param="prompt")
        tokens = None if prompt is None else engine.tokenizer.encode(prompt)
        return web.json_response({"name": name, "tokens": await engine.save_prompt_cache(
            path, tokens)})
    except ValueError as exc:  # the engine's one line names the file
        message = str(exc).replace(path, name + SUFFIX)
        raise bad(message, param="name") from None
