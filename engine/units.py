"""The UnitLoader the scheduler uses: loaders' reads + the backend's host->compute conversion."""

from __future__ import annotations

from typing import Any

from stream_run.kernels.backend import Backend
from stream_run.kernels.sizes import held_nbytes, transient_nbytes, unit_nbytes
from stream_run.loaders import FormatError, HostTensor, LayerIndex, UnitReader


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
