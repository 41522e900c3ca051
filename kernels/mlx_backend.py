"""The MLX backend (Metal, CUDA or MLX's CPU device), computing in float32.

Weights are parsed by the same host code as the numpy backend, then moved into mx arrays;
packed weights stay packed (QuantizedWeight holding mx arrays) and go through
mx.quantized_matmul; 2-D F16/BF16 weights stay mx.float16/mx.bfloat16 (2 bytes per element)
and are widened to float32 inside linear/embed (exact). mlx is imported here only, so
`import kernels` works without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import numpy as np

from kernels.formats import prepare_unit
from kernels.quant import HalfWeight, QuantizedWeight

DEVICES = ("auto", "cpu", "gpu")


def has_gpu() -> bool:
    """True when MLX can run on Metal or CUDA."""
    metal = getattr(mx, "metal", None)
    cuda = getattr(mx, "cuda", None)
    return bool((metal and metal.is_available()) or (cuda and cuda.is_available()))


class MLXKVCache:
    """Per-layer preallocated float32 mx arrays (B, Hkv, max_len, D), updated by slice assignment.

    One array per layer (not one (n_layers, ...) array) so an update copies at most one layer
    when MLX cannot update in place.
    """

    def __init__(
        self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int
    ) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [mx.zeros(shape, dtype=mx.float32) for _ in range(n_layers)]
        self.v = [mx.zeros(shape, dtype=mx.float32) for _ in range(n_layers)]
        # Evaluate now: MLX 0.32 binds lazy arrays to the creating thread's stream, and the
        # cache is made on the engine thread but written on the compute thread.
        mx.eval(self.k, self.v)
        self.max_len = max_len
        self.offset = 0

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (*self.k, *self.v))

    def update(self, layer_idx: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        end = check_room(self.offset, k.shape[2], self.max_len)
        self.k[layer_idx][:, :, self.offset : end, :] = k
        self.v[layer_idx][:, :, self.offset : end, :] = v
        return self.k[layer_idx][:, :, :end, :], self.v[layer_idx][:, :, :end, :]

    def advance(self, n: int) -> None:
        check_room(self.offset, n, self.max_len)
        self.offset += n

    def trim(self, n: int) -> None:
        self.offset -= check_trim(self.offset, n)


def check_room(offset: int, n: int, max_len: int) -> int:
    """offset + n, after checking it fits.

    Raises:
        ValueError: names max_len and the length requested.
    """
    if n < 0 or offset + n > max_len:
        raise ValueError(
            f"KV cache overflow: {offset} tokens stored + {n} new = {offset + n} exceeds "
            f"max_len={max_len}; hint: create the cache with a larger max_len"
        )
    return offset + n


def check_trim(offset: int, n: int) -> int:
    if not 0 <= n <= offset:
        raise ValueError(f"cannot trim {n} tokens from a KV cache holding {offset}")
    return n


class MLXBackend:
    name = "mlx"
    prepare_off_compute_thread = False
    prepare_views_raw = False

    def __init__(self, device: str = "auto") -> None:
        if device not in DEVICES:
            raise ValueError(f"device={device!r} is not supported; expected one of {DEVICES}")
        if device == "auto":
            device = "gpu" if has_gpu() else "cpu"
        if device == "gpu" and not has_gpu():
            raise ValueError("device='gpu' but MLX has neither Metal nor CUDA; hint: use 'cpu'")
        self.device = device
        want = mx.gpu if device == "gpu" else mx.cpu
        if mx.default_device() != want:
            mx.set_default_device(want)  # MLX is driven from the one compute thread
        self._rope: tuple[tuple, mx.array, mx.array] | None = None

    def init_compute_thread(self) -> None:
        """Give the compute thread its own stream: MLX streams are bound to the thread that
        made them, and every MLX call of the engine runs on that one thread."""
        mx.set_default_stream(mx.new_stream(mx.gpu if self.device == "gpu" else mx.cpu))

    def prepare(
        self, tensors: Mapping[str, Any], quantization: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        out = {}
        for name, v in prepare_unit(tensors, quantization).items():
            if isinstance(v, QuantizedWeight):
                v = QuantizedWeight(
                    mx.array(v.packed), mx.array(v.scales), mx.array(v.biases), v.bits, v.group_size
                )
            elif isinstance(v, HalfWeight):
                v = _half_array(v)
            else:
                v = mx.array(v)
            out[name] = v
        mx.eval(list(_arrays(out)))
        return out

    def nbytes(self, prepared: Mapping[str, Any]) -> int:
        return sum(int(v.nbytes) for v in prepared.values())

    def from_numpy(self, a: np.ndarray) -> mx.array:
        return mx.array(a)

    def to_numpy(self, x: mx.array) -> np.ndarray:
        return np.array(x)

    def embed(self, table: Any, ids: np.ndarray) -> mx.array:
        ids = np.asarray(ids)
        flat = mx.array(ids.reshape(-1).astype(np.int32))
        if isinstance(table, QuantizedWeight):
            rows = mx.dequantize(
                mx.take(table.packed, flat, axis=0),
                mx.take(table.scales, flat, axis=0),
                mx.take(table.biases, flat, axis=0),
                group_size=table.group_size,
                bits=table.bits,
            )
        else:
            rows = _float32(mx.take(table, flat, axis=0))
        return rows.reshape(*ids.shape, rows.shape[-1])

    def linear(self, x: mx.array, w: Any, bias: mx.array | None = None) -> mx.array:
        if isinstance(w, QuantizedWeight):
            y = mx.quantized_matmul(
                x,
                w.packed,
                w.scales,
                w.biases,
                transpose=True,
                group_size=w.group_size,
                bits=w.bits,
            )
        else:
            y = x @ _float32(w).T
        return y if bias is None else y + bias

    def rms_norm(self, x: mx.array, weight: mx.array, eps: float) -> mx.array:
        return mx.fast.rms_norm(x, weight, eps)

    def rope(self, x: mx.array, offset: int, inv_freq: np.ndarray) -> mx.array:
        cos, sin = self._tables(offset, x.shape[2], inv_freq)  # (L, D/2)
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        # x * cos + rotate_half(x) * sin, angles from the same float32 tables as numpy
        return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def _tables(self, offset: int, L: int, inv_freq: np.ndarray) -> tuple[mx.array, mx.array]:
        """cos/sin (L, D/2) in float32 numpy, as the numpy backend computes them; every layer of
        a step reuses the last pair."""
        inv = np.asarray(inv_freq, dtype=np.float32)
        key = (offset, L, inv.tobytes())
        if self._rope is None or self._rope[0] != key:
            angles = np.arange(offset, offset + L, dtype=np.float32)[:, None] * inv[None, :]
            self._rope = (key, mx.array(np.cos(angles)), mx.array(np.sin(angles)))
        return self._rope[1], self._rope[2]

    def attention(
        self, q: mx.array, k: mx.array, v: mx.array, scale: float, offset: int
    ) -> mx.array:
        # "causal" is lower-right aligned (last query on last key): with T = offset + L that is
        # query i -> keys 0..offset+i, so it also covers chunked prefill (offset > 0, L > 1).
        mask = "causal" if q.shape[2] > 1 else None
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    def silu_mul(self, gate: mx.array, up: mx.array) -> mx.array:
        return gate * mx.sigmoid(gate) * up

    def add(self, a: mx.array, b: mx.array) -> mx.array:
        return a + b

    def concatenate(self, xs: list[mx.array], axis: int) -> mx.array:
        return mx.concatenate(xs, axis=axis)

    def reshape(self, x: mx.array, shape: tuple[int, ...]) -> mx.array:
        return x.reshape(shape)

    def transpose(self, x: mx.array, axes: tuple[int, ...]) -> mx.array:
        return x.transpose(axes)

    def make_kv_cache(
        self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int
    ) -> MLXKVCache:
        return MLXKVCache(n_layers, batch, n_kv_heads, head_dim, max_len)

    def synchronize(self, x: Any) -> None:
        mx.eval(x)

    def start(self, x: Any) -> None:
        mx.async_eval(x)


def _half_array(hw: HalfWeight) -> mx.array:
    """HalfWeight -> mx.float16 / mx.bfloat16 (out, in); bf16 bits arrive as uint16."""
    a = mx.array(hw.data)
    return a.view(mx.bfloat16) if hw.dtype == "BF16" else a


def _float32(a: mx.array) -> mx.array:
    """A 16-bit weight widened to float32 (exact; MLX makes a float32 temporary per call)."""
    return a if a.dtype == mx.float32 else a.astype(mx.float32)


def _arrays(prepared: Mapping[str, Any]):
    for v in prepared.values():
        if isinstance(v, QuantizedWeight):
            yield from (v.packed, v.scales, v.biases)
        else:
            yield v
