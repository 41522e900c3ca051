"""stream-convert: an HF, MLX-quantized, GGUF or packed model -> the packed layer format.

The output (see loaders/packed.py) holds one safetensors file per unit in MLX's affine layout,
config.json with mlx-lm's "quantization" section, model.safetensors.index.json, the tokenizer,
and manifest.json with a sha256 per unit file; it loads in stream-run and in mlx-lm as it is.
Units are read, converted and written one at a time, so memory stays about one unit. The output
is built in a temp dir next to OUT and renamed into place only when complete.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from stream_run.convert.calibrate import (
    DEFAULT_TOKENS,
    GPTQ,
    WINDOW,
    CalibrationText,
    GPTQConverter,
    calibration_windows,
    needs_calibration,
    read_text,
)
from stream_run.convert.recipes import Quant, make_recipe
from stream_run.convert.repack import (
    DEFAULT_QUANTIZER,
    QUANTIZERS,
    TensorPlan,
    convert_unit,
    plan_unit,
)
from stream_run.engine.errors import ConvertError
from stream_run.engine.tokenizer import Tokenizer
from stream_run.loaders import LayerIndex, ModelSource, UnitReader
from stream_run.loaders.packed import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    is_packed_dir,
    unit_file_name,
    write_safetensors,
)
from stream_run.loaders.safetensors_file import DTYPE_SIZES
from stream_run.models import REGISTRY, open_model

log = logging.getLogger(__name__)

# copied from HF / MLX / packed sources when present
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "tokenizer.model")
QUANTIZER_NAMES = (*QUANTIZERS, GPTQ)
DEFAULT_GROUP_SIZE = 64  # QUANTIZERS work per tensor, GPTQ per model


def convert_model(src: str, out: str, *, bits: int = 4, group_size: int | None = None,
                  recipe: str = "uniform", force: bool = False, progress: bool = True,
                  quantizer: str = DEFAULT_QUANTIZER, calibration: str | None = None,
                  calibration_tokens: int = DEFAULT_TOKENS) -> dict:
    """Convert the model at src into the packed layer format at out.

    Args:
        src: an HF or MLX-quantized model directory, a .gguf file, or a packed directory.
        out: the directory to create. It must not exist unless force is set; with force, an
            existing stream-convert output there is replaced once the new one is complete.
        bits, group_size: the recipe's quantization (MLX affine: 2-8 bits, group 32/64/128).
            group_size None: 64, except that a tensor already in affine blocks at no more
            bits (a Q4_1 GGUF at --bits 4) keeps its own group size: an exact copy.
        recipe: "uniform", "mixed", "none" or a JSON recipe file (see convert/recipes.py).
        progress: show a progress bar on stderr when it is a terminal.
        quantizer: how a weight that cannot be copied losslessly is requantized: "mse"
            (kernels.quant.quantize_search, lower squared weight error), "rtn"
            (kernels.quant.quantize, bit-exact with mx.quantize) or "gptq" (kernels.gptq on
            the linears of the blocks and an untied lm_head, calibrated on `calibration`;
            rtn for the rest). Recorded in the manifest.
        calibration: gptq's calibration text file (required for gptq, refused otherwise).
        calibration_tokens: gptq uses at most this many tokens of it.

    Returns:
        The manifest written to out/manifest.json.

    Raises:
        ConvertError: bad bits, group size, recipe, quantizer, calibration file, output
            path, or a tensor that cannot be converted (names it). FormatError /
            MissingTensorError: a bad source model.
        ReadError: reading the source failed. OSError: writing the output failed.
    """
    quant_recipe = make_recipe(recipe, bits, group_size or DEFAULT_GROUP_SIZE)
    if quantizer not in QUANTIZER_NAMES:
        raise ConvertError(f"quantizer={quantizer!r} is not supported; expected one of "
                           f"{', '.join(QUANTIZER_NAMES)}")
    if (quantizer == GPTQ) != (calibration is not None):
        raise ConvertError("quantizer 'gptq' needs a calibration text file" if calibration
                           is None else f"a calibration file is only used by quantizer 'gptq', "
                           f"not {quantizer!r}")
    text = None if calibration is None else read_text(calibration)
    out_abs = _check_paths(src, out, force)
    source = open_model(src)
    index = source.index
    if any(t.dtype == "U8" for u in index.units.values() for t in u.tensors.values()):
        raise ConvertError(f"{src}: MXFP4 experts (uint8 *_blocks + *_scales) are computed as "
                           "stored and not converted; hint: run the checkpoint directly")
    plans = {key: plan_unit(index, unit, quant_recipe, keep_source_groups=group_size is None)
             for key, unit in index.units.items()}
    calib = None
    if calibration is not None and text is not None:  # gptq: tokens ready before any write
        window = min(WINDOW, index.spec.max_position_embeddings)
        calib = calibration_windows(calibration, text, Tokenizer(source.tokenizer),
                                    calibration_tokens, window)
    tmp = _make_temp_dir(out_abs)
    try:
        units = _write_units(index, plans, tmp, progress, quantizer, calib)
        quant = quantization_section(plans)
        _write_json(os.path.join(tmp, "config.json"), model_config(source, quant))
        tensors = [t for u in units.values() for t in u["tensors"].values()]
        _write_json(os.path.join(tmp, "model.safetensors.index.json"), {
            "metadata": {"total_size": sum(math.prod(t["shape"]) * DTYPE_SIZES[t["dtype"]]
                                           for t in tensors), "format": FORMAT_NAME},
            "weight_map": {name: u["file"] for u in units.values() for name in u["tensors"]}})
        write_tokenizer(source, tmp)
        spec = dataclasses.asdict(index.spec)
        spec["quantization"] = quant
        manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                    "source": {"name": os.path.basename(os.path.normpath(src)),
                               "format": source_format(source)},
                    "recipe": quant_recipe.describe(), "quantizer": quantizer,
                    **({"calibration": calib.describe()} if calib is not None else {}),
                    "quantization": quant, "spec": spec,
                    "tensors": {  # what became of the quantized tensors (the CLI says it)
                        "copied_exactly": sum(p.target is not None and p.lossless
                                              for ps in plans.values() for p in ps),
                        "requantized": sum(p.target is not None and not p.lossless
                                           for ps in plans.values() for p in ps)},
                    "nbytes": sum(u["nbytes"] for u in units.values()), "units": units}
        _write_json(os.path.join(tmp, MANIFEST), manifest)  # last: the dir is complete
        with _signals_held():  # OUT is either as it was or complete, never half swapped
            _replace(tmp, out_abs)
    except BaseException:
        with _signals_held():  # a second Ctrl-C must not leave half the temp dir behind
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_units(index: LayerIndex, plans: dict[str, list[TensorPlan]], tmp: str,
                 progress: bool, quantizer: str, calib: CalibrationText | None = None
                 ) -> dict[str, dict[str, Any]]:
    """Read, convert and write each unit in turn (in index order: embed, blocks, head, as
    GPTQ's calibration pass needs); returns the manifest's "units"."""
    from tqdm import tqdm

    units: dict[str, dict[str, Any]] = {}
    gptq = None
    if calib is not None and needs_calibration(plans):
        gptq = GPTQConverter(index.spec, calib)
    elif calib is not None:
        log.info("gptq: every block weight is copied losslessly; nothing to calibrate")
    reader = UnitReader(index)
    bar = tqdm(total=index.nbytes, unit="B", unit_scale=True, desc="stream-convert",
               disable=not (progress and sys.stderr.isatty()), leave=False)
    try:
        for key, unit_plans in plans.items():
            raw = reader.read(key)
            tensors, entries = convert_unit(unit_plans, raw, quantizer) if gptq is None \
                else gptq.convert(key, unit_plans, raw)
            del raw
            name = unit_file_name(key)
            with _writing(os.path.join(tmp, name)):
                nbytes, digest = write_safetensors(os.path.join(tmp, name), tensors)
            del tensors  # the unit's raw buffer returns to the reader's pool
            units[key] = {"file": name, "nbytes": nbytes, "sha256": digest, "tensors": entries}
            log.info("%s: %d bytes -> %d bytes", key, index.units[key].nbytes, nbytes)
            bar.update(index.units[key].nbytes)
    finally:
        bar.close()
        reader.close()
    return units


def _check_paths(src: str, out: str, force: bool) -> str:
    """OUT as an absolute path, after refusing the outputs that could lose data."""
    out_abs = os.path.abspath(out)
    src_real, out_real = os.path.realpath(src), os.path.realpath(out)
    if out_real == src_real or out_real.startswith(src_real + os.sep):
        raise ConvertError(f"{out}: OUT is SRC or inside it ({src}); choose another OUT")
    if src_real.startswith(out_real + os.sep):
        raise ConvertError(f"{out}: SRC {src} lies inside OUT; choose another OUT")
    parent = os.path.dirname(out_abs)
    if not os.path.isdir(parent):
        raise ConvertError(f"{out}: the parent directory {parent} does not exist")
    if not os.path.lexists(out_abs):
        return out_abs
    if not force:
        raise ConvertError(f"{out}: already exists; hint: --force replaces it, or choose "
                           "another OUT")
    if os.path.islink(out_abs) or not os.path.isdir(out_abs):
        raise ConvertError(f"{out}: exists and is not a directory; refusing to replace it")
    if os.listdir(out_abs) and not is_packed_dir(out_abs):
        raise ConvertError(
            f"{out}: exists and is not a stream-convert output (no {FORMAT_NAME} {MANIFEST}); "
            "refusing to replace it even with --force; hint: remove it yourself or choose "
            "another OUT")
    return out_abs


def _make_temp_dir(out_abs: str) -> str:
    """An empty dir beside OUT (same filesystem, so the final rename is atomic), created with
    the usual permissions (mkdtemp's are 0700)."""
    while True:
        path = f"{out_abs}.converting-{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def _replace(tmp: str, out_abs: str) -> None:
    """Move the finished tmp dir to out_abs; an existing out_abs goes only after that works."""
    if not os.path.lexists(out_abs):
        os.rename(tmp, out_abs)
        return
    old = tmp + ".old"
    os.rename(out_abs, old)
    try:
        os.rename(tmp, out_abs)
    except BaseException:
        os.rename(old, out_abs)
        raise
    shutil.rmtree(old, ignore_errors=True)  # OUT is complete: this is only tidying up
    if os.path.lexists(old):
        log.warning("could not remove all of the previous output, left at %s", old)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends, then act (main thread only: elsewhere
    handlers cannot be set, and signals are handled in the main thread anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {sig: signal.signal(sig, lambda n, _f: held.append(n))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if held:
            signal.raise_signal(held[0])


@contextlib.contextmanager
def _writing(path: str) -> Iterator[None]:
    """An OSError while writing an output file names the file (write() and fsync() errors,
    ENOSPC among them, carry no file name)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), path) from None


def quantization_section(plans: dict[str, list[TensorPlan]]) -> dict[str, Any] | None:
    """mlx-lm's config "quantization": the commonest bits/group_size as the default, an entry
    per module that differs, and False for a 2-D weight left at full precision."""
    weights = [p for unit in plans.values() for p in unit if len(p.shape) == 2]
    counts = collections.Counter(p.target for p in weights if p.target is not None)
    if not counts:
        return None
    default: Quant = counts.most_common(1)[0][0]
    section: dict[str, Any] = {"group_size": default.group_size, "bits": default.bits}
    for p in weights:
        module = p.name.removesuffix(".weight")
        if p.target is None:
            section[module] = False
        elif p.target != default:
            section[module] = {"group_size": p.target.group_size, "bits": p.target.bits}
    return section


def source_format(source: ModelSource) -> str:
    if source.path.endswith(".gguf"):
        return "gguf"
    if is_packed_dir(source.path):
        return "packed"
    return "mlx" if source.index.spec.quantization else "hf"


def model_config(source: ModelSource, quant: dict[str, Any] | None) -> dict[str, Any]:
    """config.json: the source's own (HF dirs) or one built from the spec (GGUF)."""
    spec = source.index.spec
    if source.path.endswith(".gguf"):
        # the whole config the spec was built from (a model file's own fields too), flat
        fields = {k: v for k, v in dataclasses.asdict(spec).items()
                  if v is not None and k not in ("quantization", "config")}
        cfg = {"architectures": [REGISTRY.hf_class(spec.model_type)], "torch_dtype": "float16",
               **spec.config, **fields}
    else:
        with open(os.path.join(source.path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        cfg.pop("quantization_config", None)
    cfg.pop("quantization", None)
    if quant is not None:
        cfg["quantization"] = quant
    return cfg


def write_tokenizer(source: ModelSource, out_dir: str) -> None:
    """Copy the tokenizer files of a model dir; for GGUF write tokenizer.json and configs that
    loaders.tokenizer.load_tokenizer_dir reads back into the same ids."""
    if not source.path.endswith(".gguf"):
        for name in TOKENIZER_FILES:
            path = os.path.join(source.path, name)
            if os.path.exists(path):
                with _writing(os.path.join(out_dir, name)):
                    shutil.copyfile(path, os.path.join(out_dir, name))
        return
    tok = source.tokenizer
    path = os.path.join(out_dir, "tokenizer.json")
    try:
        tok.tokenizer.save(path)
    except Exception as exc:  # tokenizers raises a plain Exception: "... (os error 28)"
        code = re.search(r"\(os error (\d+)\)", str(exc))
        raise OSError(int(code.group(1)) if code else errno.EIO, str(exc), path) from None
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                           "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                           "add_bos_token": tok.add_bos_token,
                           "model_max_length": source.index.spec.max_position_embeddings}
    if tok.chat_template is not None:
        cfg["chat_template"] = tok.chat_template
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), cfg)
    _write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": source.index.spec.bos_token_id, "eos_token_id": tok.eos_token_ids})


def _write_json(path: str, data: dict[str, Any]) -> None:
    with _writing(path), open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


# --- CLI ------------------------------------------------------------------------------------


