"""The OpenAI-compatible HTTP server (aiohttp): /v1/models, /v1/chat/completions,
/v1/completions, /health; and its own page, GET /, with /v1/stream-stats (server/web.py).

The model loads in the background after the server starts listening, so /v1/models and /health
answer at once. Requests become Engine generations, which the engine batches; a client that
disconnects cancels its handler (aiohttp handler_cancellation), which cancels its generation
and frees its batch slot and KV cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from stream_run.engine.constraints import JsonObjectConstraint
from stream_run.engine.engine import Engine, Generation
from stream_run.engine.errors import (
    ChatTemplateError,
    ContextLengthError,
    QueueFullError,
    ReadError,
)
from stream_run.engine.request import Chunk, GenerationParams, StopFilter
from stream_run.engine.sampling import SamplingParams, TokenLogprob
from stream_run.engine.stats import GenerationStats
from stream_run.server import prompt_cache as prompt_cache_files
from stream_run.server import web as web_page
from stream_run.server.errors import APIError, bad
from stream_run.server.openai_api import Limits, ParsedRequest, parse_chat, parse_completion
from stream_run.server.responses import (
    ChoiceRun,
    StreamedChoice,
    TokenStrings,
    response,
    usage_chunk,
    vocab_bytes,
)
from stream_run.server.tools import ToolStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    model_name: str  # the id clients send as "model"
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    max_body_bytes: int = 4 * 2**20
    max_tokens_cap: int = 4096  # the largest max_tokens accepted, and the default
    max_n: int = 8  # the largest n (choices per prompt) a request may ask for
    # a client that takes longer than this to send its body, or to take the next part of a
    # streamed answer (its socket buffers full), is dropped and its generation cancelled
    stall_timeout_s: float = 60.0  # inf: wait for ever
    # POST /v1/prompt_cache saves and loads prompt-cache files by name in this directory
    # (server/prompt_cache.py); None: off
    prompt_cache_dir: str | None = None
    # the disk's sequential read rate (stream-bench disk), shown beside the page's disk rate
    disk_ceiling_bytes_per_s: float | None = None

    @property
    def stall_limit_s(self) -> float | None:
        """stall_timeout_s as asyncio.timeout takes it."""
        return None if math.isinf(self.stall_timeout_s) else self.stall_timeout_s

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name must be non-empty")
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be > 0, got {self.max_body_bytes}")
        if self.max_tokens_cap <= 0:
            raise ValueError(f"max_tokens_cap must be > 0, got {self.max_tokens_cap}")
        if self.max_n <= 0:
            raise ValueError(f"max_n must be > 0, got {self.max_n}")
        if not self.stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {self.stall_timeout_s}")
        if self.disk_ceiling_bytes_per_s is not None and not (
                0 < self.disk_ceiling_bytes_per_s < math.inf):
            raise ValueError(f"disk_ceiling_bytes_per_s must be > 0, got "
                             f"{self.disk_ceiling_bytes_per_s}")


class ServerState:
    """The engine once it has loaded (or the error that stopped it), owned by the app."""

    def __init__(self, config: ServerConfig, open_engine: Callable[[], Awaitable[Engine]]
                 ) -> None:
        self.config = config
        self.open_engine = open_engine
        self.engine: Engine | None = None
        self.error: BaseException | None = None
        # the weights could not be read for the last generation (a disk or file fault); /health
        # reports it until a generation completes again
        self.read_error: str | None = None
        self.loaded = asyncio.Event()  # set when the engine is ready or failed to load
        self.created = int(time.time())
        self._strings: TokenStrings | None = None
        self._json: Callable[[], JsonObjectConstraint] | None = None

    def strings(self, engine: Engine) -> TokenStrings:
        """Token texts and bytes for logprobs (cached per token)."""
        if self._strings is None:
            self._strings = TokenStrings(engine.tokenizer)
        return self._strings

    async def load(self) -> None:
        try:
            self.engine = await self.open_engine()
        except Exception as exc:
            # /health and every request report it; stream-serve prints it once as it exits
            log.info("loading %s failed: %s", self.config.model_name, exc)
            self.error = exc
        finally:
            self.loaded.set()

    def ready_engine(self) -> Engine:
        if self.engine is not None:
            return self.engine
        if self.error is not None:
            raise APIError(503, f"the model failed to load: {self.error}", "unavailable_error",
                           code="model_load_failed")
        raise APIError(503, "the model is still loading; retry shortly", "unavailable_error",
                       code="model_loading")

    async def json_constraint(self, engine: Engine) -> Callable[[], JsonObjectConstraint]:
        """What makes each json_object request's constraint (the vocabulary's bytes are
        gathered once, off the event loop)."""
        if self._json is None:
            vocab = await asyncio.to_thread(vocab_bytes, engine.tokenizer, engine.spec.vocab_size)
            self._json = functools.partial(JsonObjectConstraint, vocab,
                                           engine.tokenizer.eos_token_ids)
        return self._json

    def limits(self, engine: Engine) -> Limits:
        template = engine.tokenizer.data.chat_template or ""
        return Limits(self.config.model_name, self.config.max_tokens_cap, engine.spec.vocab_size,
                      engine.source.sampling_defaults, self.config.max_n,
                      "tools" in template)


STATE = web.AppKey("state", ServerState)
# on shutdown: how long in-flight requests may run on before they are cancelled, and how long a
# model load that is under way may take to finish (so its engine is closed, not leaked)
SHUTDOWN_TIMEOUT_S = 2.0
LOAD_WAIT_S = 30.0


def make_app(config: ServerConfig, open_engine: Callable[[], Awaitable[Engine]]
             ) -> web.Application:
    """The aiohttp application; open_engine runs in the background once the app starts."""
    app = web.Application(client_max_size=config.max_body_bytes,
                          middlewares=[_errors, _auth])
    app[STATE] = ServerState(config, open_engine)
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model_info)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/prompt_cache", prompt_cache)
    web_page.add_routes(app, STATE)  # GET /, /static/*, /v1/stream-stats
    return app


async def prompt_cache(request: web.Request) -> web.Response:
    return await prompt_cache_files.handle(request, request.app[STATE],
                                           await _read_json(request))


async def _lifecycle(app: web.Application):
    state = app[STATE]
    loading = asyncio.get_running_loop().create_task(state.load(), name="load-model")
    yield
    # the load runs in a thread that cannot be cancelled: let it finish, then close its engine
    await asyncio.wait({loading}, timeout=LOAD_WAIT_S)
    loading.cancel()
    await asyncio.gather(loading, return_exceptions=True)
    if state.engine is not None:
        await state.engine.aclose()


def error_response(err: APIError) -> web.Response:
    headers = {"Retry-After": "1"} if err.status in (429, 503) else None
    return web.json_response(err.body(), status=err.status, headers=headers)


@web.middleware
async def _errors(request: web.Request, handler: Callable) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as err:
        return error_response(err)
    except web.HTTPException as exc:  # routing (404, 405) and the body limit (413)
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        message = exc.text or exc.reason
        if exc.status in (404, 405):
            message = f"no endpoint {request.method} {request.path}"
        if exc.status == 413:
            message = (f"the request body is larger than this server's limit of "
                       f"{request.app[STATE].config.max_body_bytes} bytes")
        return error_response(APIError(exc.status, message, code=code.get(exc.status)))
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(APIError(500, "internal server error", "server_error"))


@web.middleware
async def _auth(request: web.Request, handler: Callable) -> web.StreamResponse:
    key = request.app[STATE].config.api_key
    if key and request.path.startswith("/v1/"):
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "incorrect or missing API key (send 'Authorization: Bearer "
                           "<key>')", code="invalid_api_key")
    return await handler(request)


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.engine is not None:
        if (problem := _files_problem(state.engine)) is not None:
            state.read_error = str(problem)
        b = state.engine.batcher
        body = {"status": "ok", "model": state.config.model_name, "active": b.n_active,
                "waiting": b.n_waiting}
        if state.read_error is not None:
            return web.json_response({**body, "status": "error",
                                      "message": state.read_error}, status=503)
        return web.json_response(body)
    if state.error is not None:
        return web.json_response({"status": "error", "message": str(state.error)}, status=500)
    return web.json_response({"status": "loading"}, status=503)


def _model_card(state: ServerState) -> dict[str, Any]:
    card = {"id": state.config.model_name, "object": "model", "created": state.created,
            "owned_by": "stream-run"}
    if state.engine is not None:  # what a request's unset sampling fields default to
        card["sampling_defaults"] = {"temperature": 1.0, "top_p": 1.0,
                                     **state.engine.source.sampling_defaults}
    return card


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request.app[STATE])]})


async def model_info(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["model"]
    if name != state.config.model_name:
        raise APIError(404, f"the model '{name}' does not exist", param="model",
                       code="model_not_found")
    return web.json_response(_model_card(state))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, parse_chat)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, parse_completion)


async def _read_json(request: web.Request) -> Any:
    timeout = request.app[STATE].config.stall_limit_s
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()  # raises 413 past client_max_size
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s",
                       code="request_timeout") from None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # json's decoder recurses per nesting level
        raise bad("the request body is nested too deeply") from None


async def _complete(request: web.Request, parse: Callable[[Any, Limits], ParsedRequest]
                    ) -> web.StreamResponse:
    state = request.app[STATE]
    engine = state.ready_engine()
    req = parse(await _read_json(request), state.limits(engine))
    if (problem := _files_problem(engine)) is not None:
        raise _read_failed(state, problem)
    async with contextlib.AsyncExitStack() as stack:  # leaving it cancels what still runs
        runs, prompt_tokens = await _start(engine, req, state, stack)
        if req.stream:
            return await _stream(request, req, runs, prompt_tokens, state)
        for run in runs:
            if run.ready is not None:
                run.add(run.ready)
        try:
            async for run, chunk in _merged(runs):
                run.add(chunk)
        except ReadError as exc:
            raise _read_failed(state, exc) from None
        state.read_error = None
        return web.json_response(response(req, runs, state.strings(engine), prompt_tokens))


async def _merged(runs: Sequence[ChoiceRun]) -> AsyncIterator[tuple[ChoiceRun, Chunk]]:
    """The chunks of the runs' generations as they come, up to each one's last."""
    waiting: dict[asyncio.Future[Chunk], ChoiceRun] = {
        asyncio.ensure_future(r.generation.__anext__()): r for r in runs
        if r.generation is not None}
    try:
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for fut in sorted(done, key=lambda f: waiting[f].index):
                run = waiting.pop(fut)
                chunk = fut.result()
                yield run, chunk
                if chunk.finish_reason is None:
                    waiting[asyncio.ensure_future(run.generation.__anext__())] = run
    finally:
        for fut in waiting:
            fut.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


def _files_problem(engine: Engine) -> ReadError | None:
    """mmap mode: a pass touches the mapped pages of resident units, and touching one past the
    end of a file that shrank kills the process (SIGBUS; loaders/sigbus.py prints why). So the
    files are measured before each request (an fstat each): a shrunk one is a 503 instead. A
    file that shrinks while a pass runs still ends the server, with one line naming it."""
    if engine.reader.config.read_mode != "mmap":
        return None
    try:
        engine.reader.check_files()
    except ReadError as exc:
        return exc
    return None


def _read_failed(state: ServerState, exc: ReadError) -> APIError:
    """A storage fault, not a bug: one log line, a 503 naming the file, and /health says so
    until a generation completes again (the engine itself stays usable)."""
    state.read_error = str(exc)
    log.error("reading the model failed: %s", exc)
    return APIError(503, f"reading the model's weights failed: {exc}", "server_error",
                    code="model_read_error")


async def _start(engine: Engine, req: ParsedRequest, state: ServerState,
                 stack: contextlib.AsyncExitStack) -> tuple[list[ChoiceRun], int]:
    """Tokenize each prompt, score it for echo with logprobs, fit max_tokens to the context and
    queue its n generations (before any response starts, so each error is a status code).
    Returns the choices and the prompt tokens of the request."""
    runs, prompt_tokens = [], 0
    for p, prompt in enumerate(req.prompts):
        ids = await _encode(engine, req, prompt)
        prompt_tokens += len(ids)
        max_tokens = _fit(engine, req, ids, state.config.max_tokens_cap)
        echo_text, prompt_lps, ready = "", None, None
        if req.echo:
            echo_text = prompt if isinstance(prompt, str) else engine.tokenizer.decode(ids)
            if max_tokens == 0:  # the prompt is the answer
                ready = Chunk("", [], "length", GenerationStats(prompt_tokens=len(ids)))
            if req.logprobs is not None:
                # a greedy one-token answer (lm-eval's loglikelihood request) comes from the
                # scoring pass itself: no second pass over the prompt
                one = max_tokens == 1 and _greedy(req.sampling)
                try:
                    prompt_lps = await engine.prompt_logprobs(ids, req.logprobs, one)
                except ReadError as exc:
                    raise _read_failed(state, exc) from None
                if one:
                    ready = _one_token(engine, req, len(ids), prompt_lps.pop())
        names = {t["function"]["name"] for t in req.tools or []}
        constraint = await state.json_constraint(engine) if req.json_object else None
        for j in range(req.n):
            generation = None
            if ready is None:
                params = req.params(max_tokens, j).replace(constraint=constraint)
                generation = await stack.enter_async_context(
                    _submit(engine, req, ids, params))
            runs.append(ChoiceRun(p * req.n + j, ids, generation, echo_text, prompt_lps,
                                  ToolStream(names) if req.tools else None, ready=ready))
    return runs, prompt_tokens


def _greedy(sampling: SamplingParams) -> bool:
    """Whether the first token is the likeliest one (no penalty can change the pick)."""
    return sampling.temperature == 0 and sampling.repetition_penalty == 1.0


def _one_token(engine: Engine, req: ParsedRequest, n_prompt: int, lp: TokenLogprob) -> Chunk:
    """The whole answer of one greedy token, as the batcher would give it: EOS ends it with
    no text; a stop string in its text cuts it."""
    stats = GenerationStats(prompt_tokens=n_prompt, generation_tokens=1)
    if lp.token_id in engine.tokenizer.eos_token_ids:
        return Chunk("", [lp.token_id], "stop", stats, logprobs=[lp])
    text, cut = StopFilter(req.stop).feed(engine.tokenizer.decode([lp.token_id]), final=True)
    return Chunk(text, [lp.token_id], "stop" if cut else "length", stats, logprobs=[lp])


async def _encode(engine: Engine, req: ParsedRequest, prompt: Any) -> list[int]:
    param = "messages" if req.kind == "chat" else "prompt"
    try:
        ids = await asyncio.to_thread(engine.encode_prompt, prompt, None, req.tools)
    except ChatTemplateError as exc:
        raise bad(str(exc), param) from None
    if not ids:
        raise bad("the prompt is empty (no tokens)", param)
    return ids


def _fit(engine: Engine, req: ParsedRequest, ids: list[int], cap: int) -> int:
    """max_tokens for this prompt: the request's, or what the context leaves (up to cap)."""
    param = "messages" if req.kind == "chat" else "prompt"
    room = engine.max_context - len(ids)
    max_tokens = req.max_tokens if req.max_tokens is not None else min(cap, room)
    if max_tokens > room or room < 1 and not req.echo:  # echo: the prompt may fill it
        raise bad(f"this model's context is {engine.max_context} tokens; the prompt has "
                  f"{len(ids)} and max_tokens is {max_tokens}; shorten the prompt or lower "
                  "max_tokens", param, "context_length_exceeded")
    return max_tokens


def _submit(engine: Engine, req: ParsedRequest, ids: list[int], params: GenerationParams
            ) -> Generation:
    param = "messages" if req.kind == "chat" else "prompt"
    try:
        return engine.submit(ids, params)
    except QueueFullError as exc:
        raise APIError(429, str(exc), "rate_limit_error", code="rate_limit_exceeded") from None
    except (ContextLengthError, ValueError) as exc:
        raise bad(str(exc), param) from None


def _sse(obj: Any) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


class _Stalled(Exception):
    """The client has not taken a streamed part for stall_timeout_s."""


async def _stream(request: web.Request, req: ParsedRequest, runs: list[ChoiceRun],
                  prompt_tokens: int, state: ServerState) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    timeout = state.config.stall_limit_s
    assert state.engine is not None
    choices = {id(r): StreamedChoice(req, r, state.strings(state.engine)) for r in runs}

    async def send(obj: Any | None) -> None:
        # write() waits while the socket's buffers are full: a client that stops reading would
        # hold its batch slot, KV cache and handler for ever. None: the end of the stream
        try:
            async with asyncio.timeout(timeout):
                await (resp.write_eof() if obj is None else resp.write(_sse(obj)))
        except TimeoutError:
            raise _Stalled from None

    try:
        for run in runs:
            for obj in choices[id(run)].opening():
                await send(obj)
            if run.ready is not None:  # answered by the echo's scoring pass
                for obj in choices[id(run)].feed(run.ready):
                    await send(obj)
        try:
            async for run, chunk in _merged(runs):
                for obj in choices[id(run)].feed(chunk):
                    await send(obj)
            if req.include_usage:
                await send(usage_chunk(req, prompt_tokens,
                                       sum(r.completion_tokens for r in runs),
                                       sum(r.cached_tokens for r in runs)))
            state.read_error = None
        except ReadError as exc:  # headers are sent: the error goes in the stream
            await send(_read_failed(state, exc).body())
        except (ConnectionResetError, _Stalled):
            raise
        except Exception as exc:  # headers are sent: the error goes in the stream
            log.exception("generation failed mid-stream")
            await send(APIError(500, str(exc), "server_error").body())
        await send("[DONE]")
        await send(None)
    except ConnectionResetError:  # the client went away; leaving cancels the generation
        pass
    except _Stalled:
        log.warning("a client took no streamed data for %g s; dropping it", timeout)
        if request.transport is not None:
            request.transport.abort()  # discards the buffered output
    return resp


async def start_server(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start app listening on host:port (0: a free port); runner.addresses has the port."""
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
