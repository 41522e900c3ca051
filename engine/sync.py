"""A synchronous wrapper for scripts: the engine runs on its own event loop in a thread.

    from stream_run.engine import sync
    with sync.open("model-dir", memory_budget="2GB") as llm:
        for chunk in llm.generate("Hello", max_tokens=32):
            print(chunk.text, end="", flush=True)
        print(llm.complete([{"role": "user", "content": "Hi"}], max_tokens=16).text)

Calls from several threads at once are batched like concurrent async requests.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from stream_run.engine.engine import Engine, Prompt
from stream_run.engine.request import Chunk, Completion, GenerationParams
from stream_run.engine.sampling import TokenLogprob

T = TypeVar("T")
_END = object()


class SyncEngine:
    """An Engine driven from synchronous code. Make it with `engine.sync.open`."""

    def __init__(self, model: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="stream-run-loop",
                                        daemon=True)
        self._thread.start()
        try:
            self.engine: Engine = self._call(Engine.open(model, **options))
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, prompt: Prompt, params: GenerationParams | None = None,
                 **kwargs: Any) -> Iterator[Chunk]:
        """Chunks as Engine.generate yields them; closing the iterator early (break, an
        exception in the loop body) cancels the generation."""
        chunks: queue.Queue[Any] = queue.Queue()

        async def pump() -> None:
            try:
                async for chunk in self.engine.generate(prompt, params, **kwargs):
                    chunks.put(chunk)
            except BaseException as exc:  # delivered to the consuming thread
                chunks.put(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
            finally:
                chunks.put(_END)

        async def start() -> asyncio.Task[None]:
            return asyncio.get_running_loop().create_task(pump())

        task = self._call(start())
        try:
            while (item := chunks.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # returns once the engine has let go of the request
            self._call(_cancel_and_wait(task))

    def complete(self, prompt: Prompt, params: GenerationParams | None = None,
                 **kwargs: Any) -> Completion:
        """The whole completion (Engine.complete)."""
        return self._call(self.engine.complete(prompt, params, **kwargs))

    def prompt_logprobs(self, ids: list[int], top: int = 0) -> list[TokenLogprob | None]:
        """Each prompt token's logprob given the ones before (Engine.prompt_logprobs)."""
        return self._call(self.engine.prompt_logprobs(ids, top))

    def encode_prompt(self, prompt: Prompt, system_prompt: str | None = None) -> list[int]:
        return self.engine.encode_prompt(prompt, system_prompt)

    def save_prompt_cache(self, path: str, tokens: list[int] | None = None) -> int:
        """Engine.save_prompt_cache."""
        return self._call(self.engine.save_prompt_cache(path, tokens))

    def load_prompt_cache(self, path: str) -> list[int]:
        """Engine.load_prompt_cache."""
        return self._call(self.engine.load_prompt_cache(path))

    def close(self) -> None:
        """Cancel running generations, close the engine and stop the loop thread."""
        if self._loop.is_closed():
            return
        try:
            self._call(self.engine.aclose())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def open(model: str, **options: Any) -> SyncEngine:  # noqa: A001 - mirrors Engine.open
    """Open a model for synchronous use; options as for Engine.open (memory_budget="4GB",
    backend="numpy", config=EngineConfig(...), max_batch=...)."""
    return SyncEngine(model, **options)
