"""stream-convert --quantizer gptq: calibration text through the model, one unit at a time.

The calibration text is tokenized with the model's tokenizer and cut into windows. Units are
converted in order, as stream-convert streams them:
- embed: converted as for rtn; the windows' hidden states start as rows of the table written.
- each block: run on the source weights (dequantized to float32) over the current hidden
  states, summing X^T X of the input of every linear (q/k/v share theirs, as do gate/up);
  each linear the recipe cannot copy losslessly is quantized by kernels.gptq against its sum;
  then the hidden states go through the block as written (quantized), the usual GPTQ practice,
  to feed the next block. (Measuring each input again with the linears before it already
  quantized, the reference code's --true-sequential, took twice as long and moved SmolLM2's
  perplexity by under 1 %, up or down by text; it is not done.)
- head: lm_head (untied) by GPTQ on the final-normed hidden states; a tied head is the
  embedding, converted with rtn at the start.
The block pass is the engine's own model code on the numpy backend; the Hessian sums are taken
by a backend proxy that watches each linear's input. Memory: one unit's weights in float32,
the hidden states (tokens x hidden size x 4 bytes) and the sums (in^2 x 8 bytes per input).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_run.convert.repack import (
    COMPANIONS,
    OutTensor,
    TensorPlan,
    convert_unit,
    source_float32,
)
from stream_run.engine.errors import ConvertError
from stream_run.engine.tokenizer import Tokenizer
from stream_run.kernels.gptq import (
    DEFAULT_BLOCK,
    DEFAULT_DAMP,
    DEFAULT_SHRINK,
    gptq_quantize_factored,
    inverse_hessian_factor,
)
from stream_run.kernels.numpy_backend import NumpyBackend
from stream_run.kernels.quant import (
    BlockWeight,
    HalfWeight,
    QuantizedWeight,
    dequantize,
    half_to_float32,
)
from stream_run.loaders import EMBED, HEAD, HostTensor, ModelSpec, layer_key
from stream_run.models import model_class
from stream_run.models.base import Batch, SeqRows

log = logging.getLogger(__name__)

GPTQ = "gptq"  # the --quantizer name
DEFAULT_TOKENS = 16384  # the GPTQ paper used 128 x 2048 (C4); more text is slower
WINDOW = 512  # tokens per calibration window (each starts at position 0)
FALLBACK = "rtn"  # what GPTQ leaves alone (embedding, tied head) is requantized by this


@dataclass(frozen=True)
class CalibrationText:
    """Token windows of a calibration file: ids (n_windows, window)."""

    path: str
    ids: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.ids.size)

    def describe(self) -> dict[str, Any]:
        """manifest.json's "calibration" entry."""
        return {"file": os.path.basename(self.path), "tokens": self.n_tokens,
                "windows": int(self.ids.shape[0]), "window": int(self.ids.shape[1]),
                "damp": DEFAULT_DAMP, "shrink": DEFAULT_SHRINK, "block_size": DEFAULT_BLOCK}


def read_text(path: str) -> str:
    """The calibration file as text.

    Raises:
        ConvertError: the file cannot be read, is not UTF-8, or holds only whitespace (names
            it).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise ConvertError(f"calibration file {path}: not UTF-8 text (byte {exc.start})"
                           ) from None
    except OSError as exc:
        raise ConvertError(f"calibration file {path}: cannot read it: "
                           f"{exc.strerror or exc}") from None
    if not text.strip():
        raise ConvertError(f"calibration file {path}: the text is empty")
    return text


def calibration_windows(path: str, text: str, tokenizer: Tokenizer, n_tokens: int,
                        window: int = WINDOW) -> CalibrationText:
    """The first n_tokens (at most) of text as whole windows of `window` tokens; a text shorter
    than one window is one window of all its tokens.

    Raises:
        ConvertError: n_tokens < 1, or the text gives fewer than 2 tokens.
    """
    if n_tokens < 1:
        raise ConvertError(f"calibration tokens must be >= 1, got {n_tokens}")
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)[:n_tokens]
    if ids.size < 2:
        raise ConvertError(f"calibration file {path}: {ids.size} token(s); GPTQ needs more "
                           "text (a few thousand tokens)")
    window = min(window, ids.size)
    n_windows = ids.size // window
    return CalibrationText(path, ids[:n_windows * window].reshape(n_windows, window))


def requantizes(p: TensorPlan) -> bool:
    """The plan quantizes a 2-D weight that cannot be copied losslessly."""
    return p.target is not None and not p.lossless and len(p.shape) == 2


def needs_calibration(plans: Mapping[str, list[TensorPlan]]) -> bool:
    """Some block linear or an untied lm_head is requantized (GPTQ has work to do)."""
    return any(requantizes(p) for key, unit in plans.items() if key != EMBED for p in unit)


class _NoCache:
    """The KV cache of a one-block pass over a whole window from position 0: keeps nothing."""

    offset = 0
    nbytes = 0

    def update(self, layer_idx: int, k: Any, v: Any) -> tuple[Any, Any]:
        return k, v

    def advance(self, n: int) -> None:
        pass

    def trim(self, n: int) -> None:
        pass


class _HessianOps:
    """A backend proxy: every op is the numpy backend's; linear also adds x^T x of its input to
    the sum of the weight it multiplies (watched weights are known by identity). Linears fed
    the same input (q/k/v, gate/up) share one sum."""

    def __init__(self, ops: NumpyBackend) -> None:
        self.ops = ops
        self.watch: dict[int, str] = {}  # id(weight) -> name in the unit
        self.sums: list[np.ndarray] = []  # per distinct input, in the order of the pass
        self.input_of: dict[str, int] = {}  # weight name -> index in sums
        self._x: Any = None  # the last input seen
        self._n = 0  # distinct inputs seen in this window's pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ops, name)

    def linear(self, x: np.ndarray, w: Any, bias: np.ndarray | None = None) -> np.ndarray:
        name = self.watch.get(id(w))
        if name is not None:
            if x is not self._x:
                x2 = x.reshape(-1, x.shape[-1])  # (N, in)
                xtx = (x2.T @ x2).astype(np.float64)
                if self._n < len(self.sums):
                    self.sums[self._n] += xtx
                else:
                    self.sums.append(xtx)
                self._x, self._n = x, self._n + 1
            self.input_of[name] = self._n - 1
        return self.ops.linear(x, w, bias)

    def next_window(self) -> None:
        """Called before each window's pass (its inputs come in the same order)."""
        self._x, self._n = None, 0

    def reset(self, weights: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The sums so far by weight name (shared arrays); then watch the linears of weights
        (2-D arrays) with new sums (input_of becomes a new dict)."""
        out = {name: self.sums[i] for name, i in self.input_of.items()}
        self.watch = {id(w): n for n, w in weights.items() if getattr(w, "ndim", 0) == 2}
        self.sums, self.input_of = [], {}
        self.next_window()
        return out


class GPTQConverter:
    """Converts a model's units in order (embed, blocks, head), carrying the calibration
    windows' hidden states from each unit to the next."""

    def __init__(self, spec: ModelSpec, calibration: CalibrationText) -> None:
        self.spec = spec
        self.ids = calibration.ids
        self.ops = NumpyBackend()
        self.probe = _HessianOps(self.ops)
        cls = model_class(spec.model_type)
        self.source_model = cls(spec, self.probe)  # sums the Hessians
        self.model = cls(spec, self.ops)  # runs the written (quantized) block
        self.h: np.ndarray | None = None  # (n_windows, window, hidden)

    def convert(self, key: str, plans: list[TensorPlan], raw: Mapping[str, HostTensor]
                ) -> tuple[list[OutTensor], dict[str, dict[str, Any]]]:
        """convert_unit for unit `key`, the requantized linears by GPTQ.

        Raises:
            ConvertError: as convert_unit; a linear GPTQ cannot quantize (names it).
        """
        if key == EMBED:
            out, entries = convert_unit(plans, raw, FALLBACK)
            table = self.ops.prepare(*written_unit(plans, out, entries))["embed_tokens.weight"]
            self.h = self.ops.embed(table, self.ids)
            return out, entries
        assert self.h is not None, "the embedding is converted first"
        todo = [p for p in plans if requantizes(p)]
        if key == HEAD and not todo:
            return convert_unit(plans, raw, FALLBACK)
        source = source_float32(plans, raw)
        sums = self._head_sums(source) if key == HEAD else self._block_sums(key, source)
        out, entries = convert_unit(plans, raw, FALLBACK,
                                    requantized=self._quantize(todo, source, sums))
        if key != HEAD:
            written = self.ops.prepare(*written_unit(plans, out, entries))
            self.h = self._run_block(self.model, key, {k: as_float32(v) for k, v in
                                                       written.items()})
        return out, entries

    def _quantize(self, todo: list[TensorPlan], source: Mapping[str, np.ndarray],
                  sums: Mapping[str, np.ndarray]) -> dict[str, QuantizedWeight]:
        """GPTQ of each planned weight that has a Hessian sum (one factor per shared sum)."""
        factors: dict[int, np.ndarray] = {}
        gptq = {}
        for p in (p for p in todo if p.rel in sums):
            h = sums[p.rel]
            if id(h) not in factors:
                factors[id(h)] = self._factor(p, h)
            gptq[p.rel] = self._gptq(p, source[p.rel], factors[id(h)])
        return gptq

    def _block_sums(self, key: str, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """X^T X of each linear's input over the windows, block `key` run on weights."""
        self.probe.reset(weights)
        self._run_block(self.source_model, key, weights, self.probe.next_window)
        return self.probe.reset({})

    def _head_sums(self, source: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        h = self.ops.rms_norm(self.h, source["norm.weight"], self.spec.rms_norm_eps)
        x = h.reshape(-1, h.shape[-1]).astype(np.float64)
        return {"lm_head.weight": x.T @ x}

    def _run_block(self, model: Any, key: str, weights: Mapping[str, Any],
                   before: Callable[[], None] | None = None) -> np.ndarray:
        """The hidden states after block `key`, one window at a time (before() first)."""
        assert self.h is not None
        layer_idx = int(key.removeprefix("layers."))
        out = np.empty_like(self.h)
        for w in range(len(self.ids)):
            if before is not None:
                before()
            batch = Batch([SeqRows(self.ids[w], _NoCache())])
            out[w:w + 1] = model.block(layer_idx, batch, model.pass_context(batch),
                                       self.h[w:w + 1], {layer_key(layer_idx): weights})
        return out

    def _factor(self, p: TensorPlan, hessian: np.ndarray) -> np.ndarray:
        try:
            return inverse_hessian_factor(hessian, DEFAULT_DAMP, DEFAULT_SHRINK)
        except ValueError as exc:
            raise ConvertError(f"tensor {p.name!r}: GPTQ failed: {exc}") from None

    def _gptq(self, p: TensorPlan, w: np.ndarray, factor: np.ndarray) -> QuantizedWeight:
        assert p.target is not None
        try:
            return gptq_quantize_factored(w, factor, p.target.bits, p.target.group_size)
        except ValueError as exc:
            raise ConvertError(f"tensor {p.name!r}: GPTQ failed: {exc}") from None


def written_unit(plans: list[TensorPlan], out: list[OutTensor],
                 entries: Mapping[str, dict[str, Any]]
                 ) -> tuple[dict[str, HostTensor], dict[str, Any] | None]:
    """A converted unit as a backend's prepare() takes it: raw tensors by name in the unit,
    and the unit's quantization (bits and group size per packed module)."""
    rel_of = {}
    for p in plans:
        rel_of[p.name] = p.rel
        module, rel_module = p.name.removesuffix(".weight"), p.rel.removesuffix(".weight")
        rel_of.update({f"{module}.{c}": f"{rel_module}.{c}" for c in COMPANIONS})
    raw, quant = {}, {}
    for name, dtype, shape, data in out:
        rel = rel_of[name]
        raw[rel] = HostTensor(dtype, shape, np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        if dtype == "U32":
            e = entries[name]
            quant[rel.removesuffix(".weight")] = {"bits": e["bits"], "group_size": e["group_size"]}
    return raw, ({"bits": 0, "group_size": 0, **quant} if quant else None)


def as_float32(w: Any) -> Any:
    """A prepared weight as the float32 array the numpy backend computes with (dequantized
    once, rather than once per window)."""
    if isinstance(w, QuantizedWeight):
        return dequantize(w)
    if isinstance(w, HalfWeight):
        return half_to_float32(w)
    if isinstance(w, BlockWeight):
        from stream_run.kernels.gguf_blocks import dequantize_rows

        return dequantize_rows(w)
    return w
