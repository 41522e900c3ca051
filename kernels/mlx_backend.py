"""The MLX backend (Metal, CUDA or MLX's CPU device), computing in float32.

Weights are parsed by the same host code as the numpy backend, then moved into mx arrays;
packed weights stay packed (QuantizedWeight holding mx arrays) and go through
mx.quantized_matmul; 2-D F16/BF16 weights stay mx.float16/mx.bfloat16 (2 bytes per element)
and are widened to float32 inside linear/embed (exact). mlx is imported here only, so
`import kernels` works without it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# float32 means float32 here as on numpy: MLX would otherwise run float32 matmuls of several
# rows as TF32 on CUDA (MLX_ENABLE_TF32 defaults to 1), which put prefill logits ~3e-4 off
# the float64 reference on an H100. A user who sets the variable keeps their choice.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx  # noqa: E402  (after the environment default above)
import numpy as np

from stream_run.kernels import mxfp4
from stream_run.kernels.formats import prepare_unit
from stream_run.kernels.kv_cache import (
    LayeredKVCache,
    Ring,
    check_bits,
    check_rows,
    group_size,
    layer_windows,
    load_ring,
    query_blocks,
    ring_state,
    rows_state,
    window_mask,
)
from stream_run.kernels.quant import HalfWeight, QuantizedWeight

DEVICES = ("auto", "cpu", "gpu")
FUSED_MAX_ROWS = 8  # decode passes (one row per sequence, up to a small batch): fixed shapes
GELU_C = math.sqrt(2 / math.pi)  # the tanh approximation's constant


def has_gpu() -> bool:
    """True when MLX can run on Metal or CUDA."""
    metal = getattr(mx, "metal", None)
    cuda = getattr(mx, "cuda", None)
    return bool((metal and metal.is_available()) or (cuda and cuda.is_available()))


class MLXFullKV:
    """One full layer: float32 mx arrays (B, Hkv, max_len, D), updated by slice assignment."""

    window = None

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, max_len: int) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = mx.zeros(shape, dtype=mx.float32)
        self.v = mx.zeros(shape, dtype=mx.float32)

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    def update(self, offset: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        end = offset + k.shape[2]
        self.k[:, :, offset:end, :] = k
        self.v[:, :, offset:end, :] = v
        return self.k[:, :, :end, :], self.v[:, :, :end, :]

    def attend(self, offset: int, q: mx.array, k: mx.array, v: mx.array,
               scale: float) -> mx.array:
        L, H, D = q.shape
        end = offset + L
        self.k[0, :, offset:end, :] = k.transpose(1, 0, 2)
        self.v[0, :, offset:end, :] = v.transpose(1, 0, 2)
        o = mx.fast.scaled_dot_product_attention(
            q.transpose(1, 0, 2)[None], self.k[:1, :, :end, :], self.v[:1, :, :end, :],
            scale=scale, mask="causal" if L > 1 else None)
        return o[0].transpose(1, 0, 2).reshape(L, H * D)

    def check_rollback(self, offset: int) -> None:
        return None

    def state(self, end: int) -> dict[str, np.ndarray]:
        return rows_state(("k", "v"), (self.k, self.v), end)

    def load_state(self, state: dict[str, np.ndarray], n: int) -> None:
        k, v = check_rows(("k", "v"), (self.k, self.v), state, n)
        self.k[0, :, :n, :] = mx.array(k)
        self.v[0, :, :n, :] = mx.array(v)
        mx.eval(self.k, self.v)


class MLXSlidingKV:
    """One sliding-window layer: float32 mx arrays (B, Hkv, window, D), a ring buffer (position
    p at slot p % window; kv_cache.Ring keeps the books), as numpy's NumpySlidingKV."""

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, window: int) -> None:
        self.ring = Ring(window)
        self.window = window
        shape = (batch, n_kv_heads, window, head_dim)
        self.k = mx.zeros(shape, dtype=mx.float32)
        self.v = mx.zeros(shape, dtype=mx.float32)

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    def update(self, offset: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """As NumpySlidingKV.update: one row -> the ring's filled slots; L > 1 -> positions
        max(0, offset - window + 1) .. offset + L - 1 in order."""
        ring, L = self.ring, k.shape[2]
        first = ring.first_needed(offset)
        if L == 1:
            s = ring.store_one(offset)
            self.k[:, :, s : s + 1, :] = k
            self.v[:, :, s : s + 1, :] = v
            T = min(offset + 1, self.window)
            return self.k[:, :, :T, :], self.v[:, :, :T, :]
        held = ring.slots(first, offset)
        keys = mx.concatenate([*(self.k[:, :, a:b, :] for a, b in held), k], axis=2)
        values = mx.concatenate([*(self.v[:, :, a:b, :] for a, b in held), v], axis=2)
        for a, b, r in ring.store(offset, L):  # after the reads: these slots held older keys
            self.k[:, :, a:b, :] = k[:, :, r : r + b - a, :]
            self.v[:, :, a:b, :] = v[:, :, r : r + b - a, :]
        return keys, values

    def attend(self, offset: int, q: mx.array, k: mx.array, v: mx.array,
               scale: float) -> mx.array:
        L, H, D = q.shape
        keys, values = self.update(offset, k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None])
        o = attention(q.transpose(1, 0, 2)[None], keys, values, scale, keys.shape[2] - L,
                      self.window)
        return o[0].transpose(1, 0, 2).reshape(L, H * D)

    def check_rollback(self, offset: int) -> None:
        self.ring.first_needed(offset)

    def state(self, end: int) -> dict[str, np.ndarray]:
        return ring_state(self.ring, ("k", "v"), (self.k, self.v))

    def load_state(self, state: dict[str, np.ndarray], n: int) -> None:
        k, v = load_ring(self.ring, ("k", "v"), (self.k, self.v), state, n)
        self.k[0] = mx.array(k)
        self.v[0] = mx.array(v)
        mx.eval(self.k, self.v)


STATE_NAMES = ("k", "k_scales", "k_biases", "v", "v_scales", "v_biases")  # kv_quant's too


class MLXQuantizedKV:
    """One full layer of a quantized cache (--kv-bits; kv_quant says what is stored): mx.quantize
    of float16 keys and values (uint32-packed codes, float16 scales and biases, group along
    head_dim), written by slice assignment. A pass widens positions [0, end) with mx.dequantize
    and attends as MLXFullKV does."""

    window = None

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 bits: int) -> None:
        self.bits = check_bits(bits)
        self.group = group_size(head_dim, bits)
        lead = (batch, n_kv_heads, max_len)
        self.k = (mx.zeros((*lead, head_dim * bits // 32), dtype=mx.uint32),
                  mx.zeros((*lead, head_dim // self.group), dtype=mx.float16),
                  mx.zeros((*lead, head_dim // self.group), dtype=mx.float16))
        self.v = tuple(mx.zeros_like(a) for a in self.k)

    @property
    def arrays(self) -> list[mx.array]:
        return [*self.k, *self.v]

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays))

    def _store(self, buf: tuple[mx.array, ...], b: int | slice, lo: int, x: mx.array) -> None:
        parts = mx.quantize(x.astype(mx.float16), group_size=self.group, bits=self.bits)
        for dst, src in zip(buf, parts, strict=True):
            dst[b, :, lo:lo + x.shape[-2], :] = src

    def _widen(self, buf: tuple[mx.array, ...], b: int | slice, end: int) -> mx.array:
        codes, scales, biases = (a[b, :, :end, :] for a in buf)
        return mx.dequantize(codes, scales, biases, group_size=self.group,
                             bits=self.bits).astype(mx.float32)

    def update(self, offset: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        end = offset + k.shape[2]
        self._store(self.k, slice(None), offset, k)
        self._store(self.v, slice(None), offset, v)
        return self._widen(self.k, slice(None), end), self._widen(self.v, slice(None), end)

    def attend(self, offset: int, q: mx.array, k: mx.array, v: mx.array,
               scale: float) -> mx.array:
        L, H, D = q.shape
        end = offset + L
        self._store(self.k, slice(0, 1), offset, k.transpose(1, 0, 2)[None])
        self._store(self.v, slice(0, 1), offset, v.transpose(1, 0, 2)[None])
        o = mx.fast.scaled_dot_product_attention(
            q.transpose(1, 0, 2)[None], self._widen(self.k, slice(0, 1), end),
            self._widen(self.v, slice(0, 1), end), scale=scale,
            mask="causal" if L > 1 else None)
        return o[0].transpose(1, 0, 2).reshape(L, H * D)

    def check_rollback(self, offset: int) -> None:
        return None

    def state(self, end: int) -> dict[str, np.ndarray]:
        return rows_state(STATE_NAMES, self.arrays, end)

    def load_state(self, state: dict[str, np.ndarray], n: int) -> None:
        for dst, src in zip(self.arrays, check_rows(STATE_NAMES, self.arrays, state, n),
                            strict=True):
            dst[0, :, :n, :] = mx.array(src)
        mx.eval(self.arrays)


class MLXKVCache(LayeredKVCache):
    """A sequence's KV cache on MLX: per layer an MLXFullKV, or an MLXSlidingKV where windows
    gives a window (kv_cache.layer_windows). One array pair per layer, so an update copies at
    most one layer when MLX cannot update in place."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 windows: Sequence[int | None] | None = None, kv_bits: int | None = None
                 ) -> None:
        def full() -> MLXFullKV | MLXQuantizedKV:
            if kv_bits is None:
                return MLXFullKV(batch, n_kv_heads, head_dim, max_len)
            return MLXQuantizedKV(batch, n_kv_heads, head_dim, max_len, kv_bits)

        layers: list[MLXFullKV | MLXSlidingKV | MLXQuantizedKV] = [
            full() if w is None else MLXSlidingKV(batch, n_kv_heads, head_dim, w)
            for w in layer_windows(n_layers, max_len, windows)]
        # Evaluate now: MLX 0.32 binds lazy arrays to the creating thread's stream, and the
        # cache is made on the engine thread but written on the compute thread.
        mx.eval([a for layer in layers for a in (
            layer.arrays if isinstance(layer, MLXQuantizedKV) else (layer.k, layer.v))])
        super().__init__(layers, max_len)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, offset: int,
              window: int | None = None, softcap: float | None = None,
              sinks: mx.array | None = None) -> mx.array:
    """MLXBackend.attention (also a sliding layer's): in blocks of query rows over the keys
    each block sees (kv_cache.query_blocks) when the whole score matrix would exceed
    ATTN_SCORE_BYTES (mx.fast's attention materialises it on the CPU)."""
    blocks = query_blocks(q.shape[2], k.shape[2], q.shape[0] * q.shape[1], offset, window)
    if len(blocks) == 1:
        return _attention(q, k, v, scale, offset, window, softcap, sinks)
    return mx.concatenate([
        _attention(q[:, :, q0:q1], k[:, :, lo:hi], v[:, :, lo:hi], scale, offset + q0 - lo,
                   window, softcap, sinks)
        for q0, q1, lo, hi in blocks], axis=2)


def _attention(q: mx.array, k: mx.array, v: mx.array, scale: float, offset: int,
               window: int | None, softcap: float | None,
               sinks: mx.array | None = None) -> mx.array:
    L, T = q.shape[2], k.shape[2]
    if softcap is not None and sinks is not None:
        raise ValueError("attention: sinks with softcap are not supported on MLX")
    if softcap is not None:  # mx.fast's attention has no soft-capping
        visible = None if L == 1 and T <= (window or T) else window_mask(L, T, offset, window)
        return _softcapped_attention(q, k, v, scale, softcap, visible)
    if window is None:
        # "causal" is lower-right aligned (last query on last key): with T = offset + L that is
        # query i -> keys 0..offset+i, so it also covers chunked prefill (offset > 0, L > 1).
        mask: Any = "causal" if L > 1 else None
    elif L == 1 and T <= window:
        mask = None  # a ring's filled slots: every key is in the window
    else:
        mask = mx.array(window_mask(L, T, offset, window))
    if sinks is not None:
        sinks = sinks.astype(q.dtype)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)


def _softcapped_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, softcap: float,
                          visible: np.ndarray | None) -> mx.array:
    """Attention with the scaled scores soft-capped before the mask; visible (L, T) bool or
    None (every key)."""
    B, Hq, L, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    # query heads h = kv * G + g share kv head h // G: group them instead of repeating K/V
    scores = (q.reshape(B, Hkv, G * L, D) @ k.swapaxes(-1, -2)) * scale  # (B, Hkv, G*L, T)
    scores = mx.tanh(scores / softcap) * softcap
    if visible is not None:
        scores = mx.where(mx.array(visible), scores.reshape(B, Hkv, G, L, T), -mx.inf)
        scores = scores.reshape(B, Hkv, G * L, T)
    probs = mx.softmax(scores, axis=-1, precise=True)
    return (probs @ v).reshape(B, Hq, L, D)


class MLXBackend:
    name = "mlx"
    prepare_off_compute_thread = False
    prepare_views_raw = False
    half_scales = False  # mx.quantized_matmul takes float32 scales here as before

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
        # fused blocks: one mx.compile'd function per weight layout (see fuses)
        self.compile_blocks = True
        self._compiled: dict[tuple, Callable[..., Any]] = {}
        self._rows: tuple[np.ndarray, np.ndarray, mx.array, mx.array] | None = None

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
            elif isinstance(v, mxfp4.MXFP4Weight):  # the codes as mx's mxfp4 words
                codes, exps = mxfp4.to_hf(v)
                v = mxfp4.MXFP4Weight(mx.array(codes.reshape(codes.shape[0], -1).view(np.uint32)),
                                      mx.array(exps))
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
        elif isinstance(w, mxfp4.MXFP4Weight):
            y = mx.quantized_matmul(x, w.codes, w.exponents, transpose=True, group_size=32,
                                    bits=4, mode="mxfp4")
        else:
            y = x @ _float32(w).T
        return y if bias is None else y + bias

    def head_linear(self, x: mx.array, w: Any, start: int, n: int) -> mx.array | None:
        """Per-head linears on a weight (H * rho, in) whose row blocks are heads (MLA's
        kv_b_proj): x (H, L, in) -> (H, L, n) through rows h * rho + start .. + n of head h, as
        stored (one batched quantized_matmul over the heads' rows; a 16-bit weight widens just
        those rows). None for another form (the caller dequantizes)."""
        return self._heads(x, w, start, n, transpose=True)

    def head_linear_t(self, x: mx.array, w: Any, start: int) -> mx.array | None:
        """The transposed per-head product: x (H, L, n) -> (H, L, in), x[h] @ rows
        h * rho + start .. + n of w (quantized_matmul with transpose=False on the packed rows).
        None for another form."""
        return self._heads(x, w, start, x.shape[2], transpose=False)

    def _heads(self, x: mx.array, w: Any, start: int, n: int, transpose: bool
               ) -> mx.array | None:
        H = x.shape[0]
        rho = w.shape[0] // H

        def rows(a: mx.array) -> mx.array:  # (H, n, ...) of the heads' row blocks
            return a.reshape(H, rho, -1)[:, start:start + n]

        if isinstance(w, QuantizedWeight):
            return mx.quantized_matmul(x, rows(w.packed), rows(w.scales), rows(w.biases),
                                       transpose=transpose, group_size=w.group_size,
                                       bits=w.bits)
        if isinstance(w, mx.array):
            wf = _float32(rows(w))
            return x @ (wf.transpose(0, 2, 1) if transpose else wf)
        return None

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
        self, q: mx.array, k: mx.array, v: mx.array, scale: float, offset: int,
        window: int | None = None, softcap: float | None = None,
        sinks: mx.array | None = None,
    ) -> mx.array:
        return attention(q, k, v, scale, offset, window, softcap, sinks)

    def silu_mul(self, gate: mx.array, up: mx.array) -> mx.array:
        return gate * mx.sigmoid(gate) * up

    def gelu_tanh_mul(self, gate: mx.array, up: mx.array) -> mx.array:
        inner = GELU_C * (gate + 0.044715 * gate * gate * gate)
        return 0.5 * gate * (1.0 + mx.tanh(inner)) * up

    def softcap(self, x: mx.array, cap: float) -> mx.array:
        return mx.tanh(x / cap) * cap

    def add(self, a: mx.array, b: mx.array) -> mx.array:
        return a + b

    def concatenate(self, xs: list[mx.array], axis: int) -> mx.array:
        return mx.concatenate(xs, axis=axis)

    def write_rows(self, x: mx.array, start: int, y: mx.array) -> mx.array:
        x[:, start:start + y.shape[1]] = y
        return x

    def reshape(self, x: mx.array, shape: tuple[int, ...]) -> mx.array:
        return x.reshape(shape)

    def transpose(self, x: mx.array, axes: tuple[int, ...]) -> mx.array:
        return x.transpose(axes)

    def make_kv_cache(
        self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
        windows: Sequence[int | None] | None = None, kv_bits: int | None = None,
    ) -> MLXKVCache:
        return MLXKVCache(n_layers, batch, n_kv_heads, head_dim, max_len, windows, kv_bits)

    def synchronize(self, x: Any) -> None:
        mx.eval(x)

    def start(self, x: Any) -> None:
        mx.async_eval(x)

    # The fused block (the interface of kernels/fused.py on numpy): the two halves of a block
    # around attention are each one mx.compile'd function, traced once per weight layout and row
    # count. Compiling fuses the element-wise work (norm scaling, bias, RoPE, SiLU, residuals)
    # into fewer kernels, and a pass builds ~10 graph nodes per block from Python instead of
    # ~30. Attention stays outside: its key length grows every step.

    def fuses(self, weights: Sequence[Any], n_rows: int) -> bool:
        """True for decode passes (few rows: the compiled shapes repeat), any weight kind."""
        return self.compile_blocks and n_rows <= FUSED_MAX_ROWS

    def block_attention_input(
        self, x: mx.array, norm: mx.array, eps: float, qkv: Sequence[Any],
        qkv_bias: Sequence[mx.array | None], qk_norm: Sequence[mx.array | None],
        cos: np.ndarray, sin: np.ndarray, n_heads: int, n_kv_heads: int,
    ) -> tuple[mx.array, mx.array, mx.array]:
        """x (N, E) -> q (N, H, D), k, v (N, Hkv, D): norm, q/k/v (+ bias), q/k norm, RoPE with
        per-row cos, sin (N, D/2)."""
        biases = [b for b in qkv_bias if b is not None]
        norms = [n for n in qk_norm if n is not None]
        key = ("attention_input", eps, n_heads, n_kv_heads, tuple(_layout(w) for w in qkv),
               tuple(b is not None for b in qkv_bias), tuple(n is not None for n in qk_norm))
        fn = self._compiled.get(key) or self._compile(key, _attention_input_fn(*key[1:]))
        mcos, msin = self._row_tables(cos, sin)
        return fn(x, norm, mcos, msin, *_flat(qkv), *biases, *norms)

    def block_output(
        self, x: mx.array, attn: mx.array, wo: Any, bo: mx.array | None, norm: mx.array,
        eps: float, mlp: Sequence[Any],
    ) -> mx.array:
        """x (N, E) + o-proj(attn (N, H*D)) -> h; returns h + the SiLU MLP of norm(h)."""
        key = ("output", eps, _layout(wo), bo is not None, tuple(_layout(w) for w in mlp))
        fn = self._compiled.get(key) or self._compile(key, _output_fn(*key[1:]))
        return fn(x, attn, norm, *_flat([wo]), *([bo] if bo is not None else []), *_flat(mlp))

    def _compile(self, key: tuple, fn: Callable[..., Any]) -> Callable[..., Any]:
        self._compiled[key] = compiled = mx.compile(fn)
        return compiled

    def _row_tables(self, cos: np.ndarray, sin: np.ndarray) -> tuple[mx.array, mx.array]:
        """The pass's per-row RoPE tables as mx arrays, converted once per pass (every block
        of a pass gets the same numpy pair)."""
        if self._rows is None or self._rows[0] is not cos or self._rows[1] is not sin:
            self._rows = (cos, sin, mx.array(cos), mx.array(sin))
        return self._rows[2], self._rows[3]


def _layout(w: Any) -> tuple:
    """What a compiled function must know of a weight beyond its arrays' shapes."""
    if isinstance(w, QuantizedWeight):
        return ("q", w.bits, w.group_size)
    return ("f",)


def _flat(weights: Sequence[Any]) -> list[mx.array]:
    out: list[mx.array] = []
    for w in weights:
        out.extend((w.packed, w.scales, w.biases) if isinstance(w, QuantizedWeight) else (w,))
    return out


def _take_linear(x: mx.array, layout: tuple, args: Any) -> mx.array:
    """x @ W.T for the weight whose arrays come next from the iterator args."""
    if layout[0] == "q":
        packed, scales, biases = next(args), next(args), next(args)
        return mx.quantized_matmul(x, packed, scales, biases, transpose=True,
                                   group_size=layout[2], bits=layout[1])
    return x @ _float32(next(args)).T


def _rope_rows(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """RoPE (rotate-half) on x (N, heads, D) with per-row cos, sin (N, D/2)."""
    half = x.shape[-1] // 2
    c, s = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _attention_input_fn(eps: float, n_heads: int, n_kv_heads: int, layouts: tuple,
                        has_bias: tuple, has_norm: tuple) -> Callable[..., Any]:
    def attention_input(x, norm, cos, sin, *rest):
        args = iter(rest)
        h = mx.fast.rms_norm(x, norm, eps)
        ys = [_take_linear(h, layout, args) for layout in layouts]
        ys = [y + next(args) if b else y for y, b in zip(ys, has_bias, strict=True)]
        n = x.shape[0]
        q, k, v = (y.reshape(n, heads, -1)
                   for y, heads in zip(ys, (n_heads, n_kv_heads, n_kv_heads), strict=True))
        if has_norm[0]:
            q = mx.fast.rms_norm(q, next(args), eps)
        if has_norm[1]:
            k = mx.fast.rms_norm(k, next(args), eps)
        return _rope_rows(q, cos, sin), _rope_rows(k, cos, sin), v

    return attention_input


def _output_fn(eps: float, o_layout: tuple, has_bias: bool,
               mlp_layouts: tuple) -> Callable[..., Any]:
    def output(x, attn, norm, *rest):
        args = iter(rest)
        o = _take_linear(attn, o_layout, args)
        h = x + (o + next(args) if has_bias else o)
        n = mx.fast.rms_norm(h, norm, eps)
        gate, up = (_take_linear(n, layout, args) for layout in mlp_layouts[:2])
        return h + _take_linear(gate * mx.sigmoid(gate) * up, mlp_layouts[2], args)

    return output


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
        elif isinstance(v, mxfp4.MXFP4Weight):
            yield from (v.codes, v.exponents)
        else:
            yield v
