"""Numerics: MLX affine quantization, GGUF block conversion, and the numpy and MLX backends.

A leaf package: it imports numpy, numba and (lazily, inside the MLX backend) mlx, nothing else.
"""

from __future__ import annotations

import importlib.util

from stream_run.kernels.backend import Backend
from stream_run.kernels.quant import (
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    QuantizedWeight,
    dequantize,
    quantize,
)

BACKENDS = ("auto", "numpy", "mlx")

__all__ = [
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "Backend",
    "QuantizedWeight",
    "available_backends",
    "dequantize",
    "get_backend",
    "quantize",
]


def available_backends() -> list[str]:
    """Backend names that can be constructed here ("mlx" only when mlx is installed)."""
    names = ["numpy"]
    if importlib.util.find_spec("mlx") is not None:
        names.append("mlx")
    return names


def get_backend(name: str = "auto", threads: int | None = None) -> Backend:
    """A compute backend by name; threads: the numba kernels' thread count (numpy backend;
    None leaves numba's default, all CPUs).

    "auto" is MLX when it has a GPU (Metal or CUDA), else numpy: MLX's CPU matmul is far slower
    than numpy's BLAS.

    Raises:
        ValueError: unknown name, or "mlx" without mlx installed.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    if name == "auto":
        name = "numpy"
        if "mlx" in available_backends():
            from stream_run.kernels.mlx_backend import has_gpu

            name = "mlx" if has_gpu() else "numpy"
    if name == "mlx":
        if "mlx" not in available_backends():
            raise ValueError("backend 'mlx' needs the mlx package; hint: pip install mlx")
        from stream_run.kernels.mlx_backend import MLXBackend

        return MLXBackend()
    from stream_run.kernels.numpy_backend import NumpyBackend

    return NumpyBackend(threads)
