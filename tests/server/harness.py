"""A real stream-serve app on 127.0.0.1 (a free port), run on its own event loop in a thread,
so tests can talk to it with blocking clients (openai, http.client) or their own loops."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from stream_run.engine import Engine, EngineConfig
from stream_run.server.app import STATE, ServerConfig, make_app, start_server


class ServerThread:
    def __init__(self, config: ServerConfig, open_engine: Callable[[], Awaitable[Engine]]
                 ) -> None:
        self.app = make_app(config, open_engine)
        self.config = config
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.runner = self.call(start_server(self.app, "127.0.0.1", 0))
        self.port = self.runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{self.port}"

    @classmethod
    def for_model(cls, path, config: ServerConfig, **engine_options: Any) -> ServerThread:
        engine_options.setdefault("backend", "numpy")
        return cls(config, lambda: Engine.open(str(path), EngineConfig(**engine_options)))

    def call(self, coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    @property
    def state(self):
        return self.app[STATE]

    @property
    def engine(self) -> Engine:
        return self.state.engine

    def wait_loaded(self, timeout_s: float = 30) -> Engine:
        deadline = time.monotonic() + timeout_s
        while not self.state.loaded.is_set():
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.01)
        assert self.state.error is None, self.state.error
        return self.engine

    def wait_idle(self, timeout_s: float = 30) -> None:
        """Until the engine holds no request (bounded; fails the test when it never does)."""
        deadline = time.monotonic() + timeout_s
        while self.engine.batcher.n_active or self.engine.batcher.n_waiting:
            assert time.monotonic() < deadline, "requests still active"
            time.sleep(0.01)

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                key: str | None = None, headers: dict[str, str] | None = None
                ) -> tuple[int, Any]:
        """One HTTP request with http.client; returns (status, parsed JSON or text)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if key is None:
            key = self.config.api_key
        if key:
            hdrs["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            text = resp.read().decode()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text

    def close(self) -> None:
        self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()
