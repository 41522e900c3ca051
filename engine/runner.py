"""The pass runner: a model's calls become scheduler Steps, the logits come back as the pass's
result, and the KV caches advance after it. Also the UnitLoader the scheduler reads units
through (loaders' reads + the backend's host -> compute conversion)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from stream_run.kernels.backend import Backend, KVCache
from stream_run.kernels.sizes import held_nbytes, transient_nbytes, unit_nbytes
from stream_run.loaders import FormatError, HostTensor, LayerIndex, UnitReader
from stream_run.models.base import Batch, DecoderModel, SeqRows
from stream_run.scheduler import LayerScheduler, RunStats, StepLike


class PassRunner:
    """Runs a model's passes on the scheduler (what the batcher and Engine.forward call)."""

    def __init__(self, model: DecoderModel, scheduler: LayerScheduler,
                 units: BackendUnitLoader) -> None:
        self.model = model
        self.scheduler = scheduler
        self.units = units

    async def make_kv_cache(self, max_len: int) -> KVCache:
        """A KV cache for one sequence of up to max_len tokens (made on the compute thread:
        MLX arrays belong to the thread that made them)."""
        return await self.scheduler.run_on_compute(self.model.make_kv_cache, max_len)

    async def idle(self) -> None:
        """No pass follows for now: cancel reads carried over for one, and free idle read
        buffers (they are outside the budget)."""
        await self.scheduler.drop_carried()
        self.units.reader.buffers.trim()

    def steps(self, batch: Batch) -> list[StepLike]:
        return self.model.calls(batch)  # a Call is a scheduler StepLike as it is

    def plan(self) -> set[str]:
        """Plan which units stay resident for the decode cycle (the cache's policy decides)."""
        return self.scheduler.plan_residency(self.model.units())

    @property
    def min_budget_bytes(self) -> int:
        return self.scheduler.min_budget_bytes(self.model.units())

    async def run(self, batch: Batch, more: bool = False) -> tuple[np.ndarray, RunStats]:
        """One streamed pass; returns the logits (N or T, V) and the run's stats.

        more: another pass follows (decoding), so reads for its first units may start now.
        """
        logits, stats = await self.scheduler.run(self.steps(batch), cyclic=more)
        for seq in batch.seqs:
            seq.kv.advance(len(seq.ids))
        return logits, stats

    async def forward(self, ids: np.ndarray | Sequence[int], kv: KVCache,
                      all_logits: bool = False, more: bool = False,
                      span_end: int | None = None) -> tuple[np.ndarray, RunStats]:
        """One sequence's pass: logits (L, V) with all_logits, else (1, V). span_end: see
        SeqRows (a chunk of a longer prompt)."""
        rows = np.asarray(ids, dtype=np.int64).reshape(-1)
        return await self.run(Batch([SeqRows(rows, kv, span_end)], all_logits), more)


def _held_nbytes(index: LayerIndex, key: str, backend: Backend) -> int:
    """Bytes a prepared unit holds; a tensor the kernels cannot run fails here, at open."""
    try:
        unit_nbytes(index.units[key].tensors)  # raises for a dtype with no compute form
        return held_nbytes(index.units[key].tensors, backend.prepare_views_raw,
                           backend.half_scales)
    except ValueError as exc:
        raise FormatError(f"{index.source}: unit {key!r}: {exc}") from None


class BackendUnitLoader:
    def __init__(self, index: LayerIndex, reader: UnitReader, backend: Backend) -> None:
        self.index = index
        self.reader = reader
        self.backend = backend
        self.prepare_off_compute_thread = backend.prepare_off_compute_thread
        self._sizes = {key: _held_nbytes(index, key, backend) for key in index.units}
        self._transient = {
            key: transient_nbytes(unit.tensors, backend.prepare_views_raw, backend.half_scales)
            for key, unit in index.units.items()
        }

    def read(self, key: str) -> dict[str, HostTensor]:
        return self.reader.read(key)

    def prepare(self, key: str, raw: dict[str, HostTensor]) -> tuple[Any, int]:
        value = self.backend.prepare(raw, self.index.units[key].quantization)
        return value, self._sizes[key]

    def raw_nbytes(self, key: str) -> int:
        return self.index.units[key].nbytes

    def prepared_nbytes(self, key: str) -> int:
        return self._sizes[key]

    def transient_nbytes(self, key: str) -> int:
        return self._transient[key]
