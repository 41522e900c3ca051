"""The small ops interface both compute backends implement.

The model files (models/) are written once against these ops. Arrays are the backend's
native type (numpy.ndarray or mlx.core.array); the engine converts only token ids in and
logits out. Shapes: B batch, L sequence, H heads, D head dim, E hidden size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


class RawTensor(Protocol):
    """What prepare() reads: any object with these attributes (loaders.HostTensor is one)."""

    dtype: str  # "F32" | "F16" | "BF16" | "U32" | "I8" | "Q4_0" | "Q4_1" | "Q8_0"
    shape: tuple[int, ...]  # logical shape; (out, in) for linears
    data: np.ndarray  # uint8 raw bytes


class KVCache(Protocol):
    """Per-sequence attention state, one part per layer (kernels/kv_cache.py): a full layer
    (preallocated for max_len) or a sliding-window layer (a ring of `window` positions)."""

    offset: int  # tokens already stored (same for every layer once a step completes)

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds (full layers: preallocated for max_len; sliding: the window)."""
        ...

    def update(self, layer_idx: int, k: Any, v: Any) -> tuple[Any, Any]:
        """Store k, v (B, Hkv, L, D) at [offset, offset+L) and return the keys/values to attend
        over: a full layer's [0, offset+L); a sliding layer's positions from
        max(0, offset - window + 1) (in order when L > 1, ring order when L = 1). Either way
        ops.attention(q, keys, values, scale, keys.shape[2] - L, window) is right.

        Called once per layer per step, in layer order; `advance(L)` follows after the last
        layer.
        """
        ...

    def attend(self, layer_idx: int, q: Any, k: Any, v: Any, scale: float) -> Any:
        """The fused path's attention for one sequence: store k, v (L, Hkv, D) as update does,
        attend q (L, H, D) over the keys so far (causal; within the window for a sliding
        layer) -> (L, H * D)."""
        ...

    def advance(self, n: int) -> None: ...

    def at(self, offset: int) -> KVCache:
        """The same cache seen at a later offset, by a row tile of a pass (models/base.py
        row_tiles): its update and attend write and read at that offset."""
        ...

    def trim(self, n: int) -> None:
        """Drop the last n tokens (used to roll back a cancelled step). A sliding layer can
        roll back only within what its ring still holds (one token once it has wrapped).

        Raises:
            ValueError: n > offset, or a sliding layer no longer holds what the rollback needs.
        """
        ...


class Backend(Protocol):
    name: str
    # True when prepare() may run on an I/O thread (numpy); False when it must run on the
    # compute thread (MLX arrays are bound to the thread that made them).
    prepare_off_compute_thread: bool
    # True when prepared weights are views of the raw read buffer where the layout allows
    # (kernels.sizes.transient_nbytes says which raw bytes are then held only while preparing).
    prepare_views_raw: bool
    # True when prepare() keeps float16 group scales and biases as float16, which the kernels
    # widen as they read (kernels.sizes counts them at 2 bytes)
    half_scales: bool

    def prepare(
        self, tensors: Mapping[str, RawTensor], quantization: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """Turn one unit's raw tensors into compute form (dense arrays, QuantizedWeight).

        MLX-quantized triples "x.weight"(U32) + "x.scales" + "x.biases" become one entry
        "x.weight"; GGUF blocks become the same affine packed form. `quantization` is the
        model's {"bits", "group_size"} for U32 weights (None for unquantized models).
        """
        ...

    def nbytes(self, prepared: Mapping[str, Any]) -> int: ...

    def from_numpy(self, a: np.ndarray) -> Any: ...
    def to_numpy(self, x: Any) -> np.ndarray: ...

    def embed(self, table: Any, ids: np.ndarray) -> Any:
        """Rows of table (dense or quantized) for int ids (B, L) -> (B, L, E) float32."""
        ...

    def linear(self, x: Any, w: Any, bias: Any | None = None) -> Any:
        """x (..., in) @ w.T (w (out, in), dense or quantized) + bias -> (..., out)."""
        ...

    def rms_norm(self, x: Any, weight: Any, eps: float) -> Any: ...

    def rope(self, x: Any, offset: int, inv_freq: np.ndarray) -> Any:
        """Rotate-half (NeoX/HF) RoPE on x (B, H, L, D) for positions offset..offset+L-1.

        inv_freq (D/2,) float32 already includes any rope scaling.
        """
        ...

    def attention(self, q: Any, k: Any, v: Any, scale: float, offset: int,
                  window: int | None = None, softcap: float | None = None,
                  sinks: Any = None) -> Any:
        """Causal attention. q (B, Hq, L, D); k, v (B, Hkv, T, D) with T = offset + L.

        GQA: Hq is a multiple of Hkv. Query i attends to keys j with j <= offset + i and, with
        a window (a sliding layer), offset + i - j < window. softcap (Gemma 2's logit
        soft-capping): the scaled scores s become tanh(s / softcap) * softcap before the
        mask. sinks (Hq,) (gpt-oss): a logit per query head joins each row's softmax, its
        share dropped (no value). -> (B, Hq, L, D).
        """
        ...

    def silu_mul(self, gate: Any, up: Any) -> Any: ...

    def gelu_tanh_mul(self, gate: Any, up: Any) -> Any:
        """GELU (tanh approximation, torch's gelu_pytorch_tanh) of gate, times up: Gemma's
        gated MLP."""
        ...

    def softcap(self, x: Any, cap: float) -> Any:
        """tanh(x / cap) * cap (Gemma's final-logit soft-capping)."""
        ...

    def add(self, a: Any, b: Any) -> Any: ...

    def concatenate(self, xs: list[Any], axis: int) -> Any:
        """Join arrays along axis (the batched step stacks the rows of several sequences)."""
        ...

    def write_rows(self, x: Any, start: int, y: Any) -> Any:
        """x (1, T, E) with rows start..start+n replaced by y (1, n, E); returns it (numpy
        writes in place, so a pass's row tiles share one hidden-state buffer)."""
        ...

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any: ...

    def transpose(self, x: Any, axes: tuple[int, ...]) -> Any: ...

    def make_kv_cache(
        self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
        windows: Sequence[int | None] | None = None, kv_bits: int | None = None,
    ) -> KVCache:
        """A sequence's cache; windows[i]: None for a full layer, else layer i's sliding window
        (a window >= max_len makes a full layer: it never excludes a key there). None: all full.
        kv_bits (8 or 4): full layers store keys and values group-wise quantized (kv_quant).
        """
        ...

    def synchronize(self, x: Any) -> None:
        """Force evaluation of x (MLX is lazy); a no-op for numpy."""
        ...

    def start(self, x: Any) -> None:
        """Begin evaluating x without waiting (MLX: mx.async_eval); a no-op for numpy. The
        scheduler calls it at the end of each compute call (a streamed step, or a run of
        resident ones), so a step's weights are consumed before the cache may evict them."""
        ...


@runtime_checkable
class FusedBlock(Protocol):
    """Optional: a decoder block's linear parts as two fused calls around attention (numpy:
    numba kernels on packed weights; MLX: two compiled halves). A model checks for it once,
    with isinstance, and calls it only when `fuses` says the weights suit it."""

    def fuses(self, weights: Sequence[Any], n_rows: int) -> bool:
        """True when the block's linears (q, k, v, o, gate, up, down) can run fused for a pass
        of n_rows rows."""
        ...

    def block_attention_input(
        self, x: Any, norm: Any, eps: float, qkv: Sequence[Any], qkv_bias: Sequence[Any],
        qk_norm: Sequence[Any], cos: np.ndarray, sin: np.ndarray, n_heads: int,
        n_kv_heads: int,
    ) -> tuple[Any, Any, Any]:
        """x (T, E) -> q (T, H, D), k, v (T, Hkv, D): norm, projections, q/k norms, RoPE."""
        ...

    def block_output(self, x: Any, attn: Any, wo: Any, bo: Any, post_norm: Any, eps: float,
                     mlp: Sequence[Any]) -> Any:
        """x + o_proj(attn), then its post-attention norm and SwiGLU MLP residual -> (T, E)."""
        ...


@runtime_checkable
class DecodeBlock(Protocol):
    """Optional: the whole fused block for one sequence in one call (attention included)."""

    def block_decode(self, x: Any, norm: Any, eps: float, qkv: Sequence[Any],
                     qkv_bias: Sequence[Any], qk_norm: Sequence[Any], cos: np.ndarray,
                     sin: np.ndarray, n_heads: int, n_kv_heads: int, kv: KVCache,
                     layer_idx: int, scale: float, wo: Any, bo: Any, post_norm: Any,
                     mlp: Sequence[Any]) -> Any:
        ...


@runtime_checkable
class ComputeThreadInit(Protocol):
    """Optional: set-up that must run on the compute thread before any step (MLX: its own
    stream)."""

    def init_compute_thread(self) -> None: ...
