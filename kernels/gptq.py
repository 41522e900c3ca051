"""GPTQ: quantize one linear layer's weight using the second moment of its inputs.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323). For W (out, in) and calibration inputs
X (n, in), GPTQ minimises ||X W^T - X Q^T|| row by row: columns are quantized in their natural
order, and each column's rounding error is spread over the columns not yet quantized through
the inverse Hessian H^-1 (H = X^T X, up to a factor). The upper Cholesky factor of H^-1 gives
every step's update at once; errors are applied to the rest of a block of columns at once and
to the columns after it in one matrix product ("lazy batch" updates).

One addition to the paper: the Hessian may be shrunk toward its diagonal, (1 - shrink) * H +
shrink * diag(H), the usual shrinkage of a sample covariance (Ledoit and Wolf) toward a
structured target. A few thousand calibration tokens estimate the correlations of a 576- or
1536-wide input poorly; GPTQ then fits the calibration text and gains less elsewhere (on
SmolLM2 the output error of down_proj fell by 40-55 % on the calibration text, 7-18 % on
another). shrink = 1 is round-to-nearest exactly (no error is passed on); 0 is the paper's.
The default 0.75 was chosen on SmolLM2 by perplexity on held-out texts (0.5 to 0.75 did best,
by a wide margin over 0 and 0.9).

The grid is kernels.quant's: each group's scale and bias are MLX's min/max round-to-nearest
ones, computed from the group's weights as updated when its first column comes up, then held for
the group. The result is the same MLX affine layout as kernels.quant.quantize. No act-order: a
permuted column order would break the contiguous groups.
"""

from __future__ import annotations

import numpy as np

from stream_run.kernels.quant import QuantizedWeight, _groups, _rtn, pack, round_params

DEFAULT_DAMP = 0.01  # fraction of the mean of diag(H) added to the diagonal (the paper's 1 %)
DEFAULT_SHRINK = 0.75  # weight of diag(H) against H (0: the paper's GPTQ, 1: round-to-nearest)
DEFAULT_BLOCK = 128  # columns per lazy batch update (the paper's B)
ROW_CHUNK_ELEMS = 1 << 22  # weights updated at once, float64 (32 MB)
_MAX_DAMP_TRIES = 6  # a Hessian that is not positive definite: retry with damp x10 each time


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, bits: int = 4, group_size: int = 64, *,
                  damp: float = DEFAULT_DAMP, shrink: float = DEFAULT_SHRINK,
                  block_size: int = DEFAULT_BLOCK, param_dtype: type = np.float16
                  ) -> QuantizedWeight:
    """Affine-quantize w (out, in) with GPTQ against the input Hessian (in, in).

    Args:
        w: the weight, float (out, in).
        hessian: X^T X of the layer's calibration inputs X (n, in), any positive scale; a
            zero diagonal entry (an input never active) gets 1, so its column is rounded on its
            own and passes no error on.
        damp: added to the diagonal, as a fraction of its mean, before inverting.
        shrink: H is replaced by (1 - shrink) * H + shrink * diag(H) first (0 <= shrink <= 1).
        block_size: columns per lazy update; rounded up to a multiple of group_size so that no
            group straddles two blocks (its grid is then taken from fully updated weights).
        param_dtype: the dtype scales and biases are stored in (np.float16 or np.float32):
            each group's scale and bias are rounded to it before its columns are quantized, so
            the error fed forward is the error of the weights as stored.

    Returns:
        The QuantizedWeight (float32 scales and biases holding param_dtype values).

    Raises:
        ValueError: bad bits / group_size / shapes, a non-finite weight or Hessian, or a
            Hessian that stays singular after damping.
    """
    n_in = _groups(np.asarray(w, np.float32), bits, group_size).shape[1] * group_size
    hessian = np.asarray(hessian, dtype=np.float64)
    if hessian.shape != (n_in, n_in) or not np.isfinite(hessian).all():
        raise ValueError(f"hessian: expected a finite ({n_in}, {n_in}) matrix for w of shape "
                         f"{np.shape(w)}, got shape {hessian.shape}")
    return gptq_quantize_factored(w, inverse_hessian_factor(hessian, damp, shrink), bits,
                                  group_size, block_size=block_size, param_dtype=param_dtype)


def gptq_quantize_factored(w: np.ndarray, u: np.ndarray, bits: int = 4, group_size: int = 64,
                           *, block_size: int = DEFAULT_BLOCK, param_dtype: type = np.float16
                           ) -> QuantizedWeight:
    """gptq_quantize given u = inverse_hessian_factor(hessian) (layers that share an input
    share it). Rows are independent: they are quantized ROW_CHUNK_ELEMS weights at a time.

    Raises:
        ValueError: bad bits / group_size / shapes, or a non-finite weight.
    """
    w = _groups(np.asarray(w, np.float32), bits, group_size)  # checks bits, group, finite
    n_out, n_groups, _ = w.shape
    n_in = n_groups * group_size
    if np.shape(u) != (n_in, n_in):
        raise ValueError(f"u: expected shape ({n_in}, {n_in}), got {np.shape(u)}")
    w = w.reshape(n_out, n_in)
    q = np.empty((n_out, n_in), dtype=np.uint8)
    scales = np.empty((n_out, n_groups), dtype=np.float32)
    biases = np.empty((n_out, n_groups), dtype=np.float32)
    block = -(-block_size // group_size) * group_size
    step = max(1, ROW_CHUNK_ELEMS // n_in)
    for r in range(0, n_out, step):
        rows = slice(r, min(r + step, n_out))
        _gptq_rows(w[rows], u, bits, group_size, block, q[rows], scales[rows], biases[rows],
                   param_dtype)
    return QuantizedWeight(pack(q, bits), scales, biases, bits, group_size)


def _gptq_rows(w: np.ndarray, u: np.ndarray, bits: int, group_size: int, block: int,
               q: np.ndarray, scales: np.ndarray, biases: np.ndarray, param_dtype: type
               ) -> None:
    """The GPTQ loop over rows w (rows, in); writes codes q, scales and biases in place."""
    n_rows, n_in = w.shape
    W = w.astype(np.float64)  # updated in place as errors are fed forward
    for b0 in range(0, n_in, block):
        b1 = min(b0 + block, n_in)
        W1, U1 = W[:, b0:b1], u[b0:b1, b0:b1]  # W1 is a view: updates land in W
        err = np.empty((n_rows, b1 - b0))
        for g0 in range(0, b1 - b0, group_size):
            g = (b0 + g0) // group_size
            scales[:, g], biases[:, g] = group_params(W1[:, g0:g0 + group_size], bits,
                                                      param_dtype)
            for i in range(g0, g0 + group_size):
                q[:, b0 + i], deq = round_column(W1[:, i], scales[:, g], biases[:, g], bits)
                err[:, i] = (W1[:, i] - deq) / U1[i, i]
                W1[:, i + 1:] -= np.outer(err[:, i], U1[i, i + 1:])
        W[:, b1:] -= err @ u[b0:b1, b1:]


def inverse_hessian_factor(hessian: np.ndarray, damp: float = DEFAULT_DAMP,
                           shrink: float = DEFAULT_SHRINK) -> np.ndarray:
    """The upper Cholesky factor U of (H_s + damp * mean(diag H) * I)^-1 (= U^T U), float64,
    where H_s = (1 - shrink) * H + shrink * diag(H).

    Row i of U, divided by U[i, i], is the update that quantizing column i sends to the later
    columns (the paper's Cholesky reformulation of the OBS update).

    Raises:
        ValueError: shrink outside [0, 1], or the damped H is not positive definite even after
            raising damp 10^5-fold.
    """
    if not 0 <= shrink <= 1:
        raise ValueError(f"shrink must be in [0, 1], got {shrink}")
    hessian = np.asarray(hessian, dtype=np.float64)
    h = (1 - shrink) * hessian  # a new array: the off-diagonal part shrinks, the diagonal stays
    np.fill_diagonal(h, np.diag(hessian))
    diag = np.einsum("ii->i", h)  # a writable view of the diagonal
    dead = diag == 0
    h[dead, :] = 0
    h[:, dead] = 0
    diag[dead] = 1
    mean = float(diag.mean())
    for k in range(_MAX_DAMP_TRIES):
        try:
            h_inv = np.linalg.inv(h + damp * 10**k * mean * np.eye(len(h)))
            return np.linalg.cholesky((h_inv + h_inv.T) / 2).T  # fails unless positive definite
        except np.linalg.LinAlgError:
            continue
    raise ValueError(f"hessian ({len(h)}x{len(h)}) is not positive definite even with "
                     f"damp {damp * 10 ** (_MAX_DAMP_TRIES - 1):g}; hint: more or more "
                     "varied calibration text")


def group_params(cols: np.ndarray, bits: int, param_dtype: type = np.float16
                 ) -> tuple[np.ndarray, np.ndarray]:
    """MLX's round-to-nearest scale and bias of each row of cols (out, group_size), rounded
    to param_dtype as they will be stored; float32 (out,) each."""
    _, s, b = _rtn(np.asarray(cols, dtype=np.float32)[:, None, :], bits)
    return round_params(s[:, 0], param_dtype), round_params(b[:, 0], param_dtype)


def round_column(col: np.ndarray, s: np.ndarray, b: np.ndarray, bits: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Codes of one column (out,) on the grid s * q + b, and the float32 values they stand for
    (computed as kernels.quant.quantize and dequantize do)."""
    x = col.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = np.rint((x - b) / s)
    q = np.clip(np.nan_to_num(q, nan=0.0), 0, (1 << bits) - 1).astype(np.uint8)
    return q, s * q.astype(np.float32) + b
