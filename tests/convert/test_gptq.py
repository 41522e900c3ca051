"""GPTQ (kernels/gptq.py) against a plain unblocked reference written here, and stream-convert
--quantizer gptq end to end on tiny models: the Hessian of a later block's input is rebuilt with
the independent float64 reference model on the converted (quantized) earlier blocks."""

import json
import re

import numpy as np
import pytest
from tokenizers import Tokenizer

from stream_run.cli.convert import main
from stream_run.convert.convert import convert_model
from stream_run.engine.errors import ConvertError
from stream_run.kernels.gptq import gptq_quantize
from stream_run.kernels.quant import check_quantized, dequantize, quantize, unpack
from tests.convert.test_convert import PROMPT, greedy
from tests.packed_models import load_packed, raw_tensors
from tests.reference_model import reference_greedy, reference_logits
from tests.tiny_models import TEXT


def gptq_reference(w: np.ndarray, h: np.ndarray, bits: int, group: int,
                   damp: float = 0.01) -> np.ndarray:
    """GPTQ as the paper's first, unblocked form (the OBQ update on the explicit inverse of the
    Hessian of the columns left), each group's grid from quantize() on its columns as updated
    when the group starts; returns the dequantized weight."""
    W = w.astype(np.float64)
    n = W.shape[1]
    h_inv = np.linalg.inv(h + damp * np.mean(np.diag(h)) * np.eye(n))
    out = np.empty_like(W, dtype=np.float32)
    for j in range(n):
        if j % group == 0:
            qw = quantize(W[:, j:j + group].astype(np.float32), bits, group)
            s, b = qw.scales[:, 0], qw.biases[:, 0]
        x = W[:, j].astype(np.float32)
        q = np.clip(np.rint((x - b) / s), 0, 2**bits - 1).astype(np.float32)
        out[:, j] = s * q + b
        W[:, j + 1:] -= np.outer((W[:, j] - out[:, j]) / h_inv[j, j], h_inv[j, j + 1:])
        h_inv -= np.outer(h_inv[:, j], h_inv[j, :]) / h_inv[j, j]  # drop column j
    return out


def correlated_inputs(rng, n: int, dim: int) -> np.ndarray:
    """Inputs with strongly correlated features and uneven scales, like a model's."""
    x = rng.standard_normal((n, dim // 4)) @ rng.standard_normal((dim // 4, dim))
    return (x + 0.3 * rng.standard_normal((n, dim))).astype(np.float32) \
        * rng.uniform(0.2, 3.0, dim).astype(np.float32)


def output_error(x: np.ndarray, w: np.ndarray, w_hat: np.ndarray) -> float:
    return float(np.linalg.norm(x.astype(np.float64) @ (w - w_hat).T.astype(np.float64)))


@pytest.mark.parametrize("bits, group, block", [(4, 32, 128), (3, 64, 64), (2, 32, 48)])
def test_matches_the_unblocked_reference(bits, group, block):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((24, 256)).astype(np.float32)
    x = correlated_inputs(rng, 512, 256)
    h = x.T.astype(np.float64) @ x
    got = gptq_quantize(w, h, bits, group, block_size=block, shrink=0, param_dtype=np.float32)
    np.testing.assert_allclose(dequantize(got), gptq_reference(w, h, bits, group),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits, group", [(3, 32), (4, 64), (4, 128), (8, 64)])
def test_output_error_is_below_rtn_on_correlated_inputs(bits, group):
    rng = np.random.default_rng(100 + bits)
    w = (rng.standard_normal((64, 256)) / 16).astype(np.float32)
    x = correlated_inputs(rng, 1024, 256)
    gptq = dequantize(gptq_quantize(w, x.T.astype(np.float64) @ x, bits, group))
    rtn = dequantize(quantize(w, bits, group))
    assert output_error(x, w, gptq) < 0.8 * output_error(x, w, rtn)


@pytest.mark.parametrize("hessian", ["identity", "diagonal", "zero"])
def test_a_hessian_without_correlations_gives_rtn(hessian):
    """No off-diagonal terms: no error is passed on, every column is rounded alone (a zero
    diagonal, an input never seen, counts as 1)."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    h = {"identity": np.eye(128), "diagonal": np.diag(rng.uniform(0.1, 10, 128)),
         "zero": np.zeros((128, 128))}[hessian]
    got, want = gptq_quantize(w, h, 4, 64, param_dtype=np.float32), quantize(w, 4, 64)
    for part in ("packed", "scales", "biases"):
        np.testing.assert_array_equal(getattr(got, part), getattr(want, part), err_msg=part)


def test_full_shrink_is_rtn_and_partial_shrink_sits_between():
    """shrink = 1 keeps only diag(H): round-to-nearest exactly. Between 0 and 1 the error on
    the calibration inputs themselves is above plain GPTQ's and below RTN's."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((32, 256)).astype(np.float32)
    x = correlated_inputs(rng, 1024, 256)
    h = x.T.astype(np.float64) @ x
    full = gptq_quantize(w, h, 4, 64, shrink=1, param_dtype=np.float32)
    np.testing.assert_array_equal(full.packed, quantize(w, 4, 64).packed)
    err = {s: output_error(x, w, dequantize(gptq_quantize(w, h, 4, 64, shrink=s)))
           for s in (0, 0.5, 1)}
    assert err[0] < err[0.5] < err[1]
    with pytest.raises(ValueError, match=r"shrink must be in \[0, 1\], got 1.5"):
        gptq_quantize(w, h, 4, 64, shrink=1.5)


def test_layout_is_quantize_s_with_float16_parameters():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((40, 192)).astype(np.float32)
    x = correlated_inputs(rng, 300, 192)
    got = gptq_quantize(w, x.T @ x, 5, 32)
    want = quantize(w, 5, 32)
    assert (got.bits, got.group_size, got.shape) == (want.bits, want.group_size, want.shape)
    for part in ("packed", "scales", "biases"):
        assert getattr(got, part).shape == getattr(want, part).shape
        assert getattr(got, part).dtype == getattr(want, part).dtype
    check_quantized(got)
    for part in (got.scales, got.biases):  # stored as float16 exactly
        np.testing.assert_array_equal(part.astype(np.float16).astype(np.float32), part)
    assert unpack(got.packed, 5, 192).max() <= 31
    assert dequantize(got).shape == w.shape


@pytest.mark.parametrize("h, match", [(np.eye(64), r"expected a finite \(128, 128\) matrix"),
                                      (np.full((128, 128), np.nan), r"expected a finite"),
                                      (-np.eye(128), r"not positive definite")])
def test_bad_hessians_are_refused(h, match):
    with pytest.raises(ValueError, match=match):
        gptq_quantize(np.ones((8, 128), np.float32), h, 4, 64)


# --- stream-convert --quantizer gptq ------------------------------------------------------

@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text((TEXT + " ") * 12)
    return path


def convert(src, out, calib, **kw) -> dict:
    return convert_model(str(src), str(out), progress=False, quantizer="gptq",
                         calibration=str(calib), **kw)


def packed_codes(out, name: str, bits: int) -> np.ndarray:
    files = {n: t for f in out.glob("model-*.safetensors") for n, t in raw_tensors(f).items()}
    dtype, shape, raw = files[name]
    return unpack(np.frombuffer(raw, "<u4").reshape(shape), bits, shape[1] * 32 // bits)


def input_hessian(src, out, calib, module: str, weights_src: dict,
                  through_source: bool = False) -> np.ndarray:
    """X^T X of the input of `module` (a q_proj or lm_head) over the calibration windows,
    computed by the float64 reference model on the converted model's blocks before it (or on
    the source's): the reference's final norm is set to the module's norm, its head to the
    identity."""
    cfg, got = load_packed(out)
    got = weights_src if through_source else got
    m = re.match(r"model\.layers\.(\d+)\.", module)
    n_layers = int(m.group(1)) if m else cfg["num_hidden_layers"]
    norm = f"model.layers.{n_layers}.input_layernorm.weight" if m else "model.norm.weight"
    E = cfg["hidden_size"]
    w = {k: v for k, v in got.items() if not k.startswith("lm_head")}
    w.update({"model.norm.weight": weights_src[norm], "lm_head.weight": np.eye(E)})
    ref_cfg = {**cfg, "num_hidden_layers": n_layers, "tie_word_embeddings": False}
    ids = Tokenizer.from_file(str(src / "tokenizer.json")).encode(calib.read_text()).ids
    manifest = json.loads((out / "manifest.json").read_text())["calibration"]
    L = manifest["window"]
    assert manifest["tokens"] == L * (min(len(ids), 512) // L)
    h = np.zeros((E, E))
    for i in range(0, manifest["tokens"], L):
        x = reference_logits(ref_cfg, w, ids[i:i + L])  # (L, E): the module's input
        h += x.T @ x
    return h


@pytest.mark.parametrize("variant, module", [("llama", "model.layers.1.self_attn.q_proj"),
                                             ("llama", "lm_head"),
                                             ("qwen2", "model.layers.1.self_attn.k_proj")])
def test_a_later_linear_is_gptq_on_its_input_through_the_quantized_blocks(
        tiny_model_dir, tmp_path, calib, variant, module):
    src, _, weights = tiny_model_dir(variant)
    out = tmp_path / "out"
    manifest = convert(src, out, calib, bits=3, group_size=32, calibration_tokens=512)
    assert manifest["quantizer"] == "gptq"
    assert manifest["calibration"]["file"] == "calib.txt"
    w = weights[f"{module}.weight"]
    got = packed_codes(out, f"{module}.weight", 3)

    def codes_agree(h: np.ndarray) -> float:
        return float(np.mean(got == unpack(gptq_quantize(w, h, 3, 32).packed, 3, w.shape[1])))

    # float32 engine vs float64 reference: a rare code may round the other way (none so far)
    assert codes_agree(input_hessian(src, out, calib, module, weights)) > 0.995
    # measured: 0.94-0.97 with inputs through the source blocks, 0.91-0.94 for RTN's codes
    assert codes_agree(input_hessian(src, out, calib, module, weights, True)) < 0.98
    assert np.mean(got == unpack(quantize(w, 3, 32).packed, 3, w.shape[1])) < 0.96


def test_converted_model_runs_like_the_reference_on_its_weights(tiny_model_dir, tmp_path, calib):
    src, _, weights = tiny_model_dir("llama")
    out = tmp_path / "out"
    manifest = convert(src, out, calib, recipe="mixed", calibration_tokens=300)
    assert manifest["calibration"] == {"file": "calib.txt", "tokens": 256, "windows": 1,
                                       "window": 256, "damp": 0.01, "shrink": 0.75,
                                       "block_size": 128}
    cfg, got = load_packed(out)
    # the embedding is rtn's (no Hessian for a lookup)
    want = dequantize(quantize(weights["model.embed_tokens.weight"], 8, 64))
    np.testing.assert_allclose(got["model.embed_tokens.weight"], want, atol=2e-3)
    assert greedy(out, n=16) == reference_greedy(cfg, got, PROMPT, 16)


def test_lossless_targets_skip_calibration(tmp_path, calib):
    """An MLX 4-bit group-64 source to 4-bit group 64: every block weight is copied."""
    from tests.tiny_models import write_mlx_quantized_model

    src = tmp_path / "mlx"
    write_mlx_quantized_model(src, "llama", bits=4, group_size=64)
    manifest = convert(src, tmp_path / "out", calib)
    assert manifest["quantizer"] == "gptq"
    for f in src.glob("model*.safetensors"):
        for name, t in raw_tensors(f).items():
            if name.startswith("model.layers.0.") and name.endswith(("weight", "scales")):
                assert raw_tensors(tmp_path / "out" / "model-layers.0.safetensors")[name] == t


def test_library_errors_name_the_problem(tiny_model_dir, tmp_path, calib):
    src, _, _ = tiny_model_dir("llama")
    with pytest.raises(ConvertError, match="quantizer 'gptq' needs a calibration text file"):
        convert_model(str(src), str(tmp_path / "o"), quantizer="gptq", progress=False)
    with pytest.raises(ConvertError, match="only used by quantizer 'gptq', not 'rtn'"):
        convert_model(str(src), str(tmp_path / "o"), calibration=str(calib), progress=False)
    with pytest.raises(ConvertError, match=r"calibration file .*nope\.txt: cannot read it: No "
                                           r"such file"):
        convert(src, tmp_path / "o", tmp_path / "nope.txt")
    (tmp_path / "blank.txt").write_text(" \n")
    with pytest.raises(ConvertError, match=r"blank\.txt: the text is empty"):
        convert(src, tmp_path / "o", tmp_path / "blank.txt")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, match", [
    (["--quantizer", "gptq"], "--quantizer gptq needs --calibration FILE"),
    (["--calibration", "{calib}"], "--calibration is only used by --quantizer gptq, not rtn"),
    (["--quantizer", "gptq", "--calibration", "{calib}", "--calibration-tokens", "0"],
     "--calibration-tokens must be >= 1, got 0"),
    (["--quantizer", "gptq", "--calibration", "{tmp}/nope.txt"],
     "calibration file {tmp}/nope.txt: cannot read it"),
])
def test_cli_errors_are_one_line(tiny_model_dir, tmp_path, calib, capsys, flags, match):
    src, _, _ = tiny_model_dir("llama")
    argv = [str(src), str(tmp_path / "out")] + [f.format(calib=calib, tmp=tmp_path)
                                                for f in flags]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse-level usage errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("stream-convert: error: ")
    assert match.format(tmp=tmp_path) in err
    assert not (tmp_path / "out").exists()


# --- stream-eval --compare --quantizer ----------------------------------------------------

def test_stream_eval_compare_passes_the_quantizer_on(tiny_model_dir, tmp_path, calib, capsys):
    from stream_run.cli.eval import main as eval_main

    src, _, _ = tiny_model_dir("llama")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    argv = [str(src), "--text", str(text), "--ctx", "32", "--json", "--compare", "4:g32",
            "--quantizer", "gptq", "--calibration", str(calib), "--calibration-tokens", "64"]
    assert eval_main(argv) == 0
    source, q4 = json.loads(capsys.readouterr().out)["rows"]
    assert q4["recipe"] == "4:g32" and q4["tokens_scored"] == source["tokens_scored"]


@pytest.mark.parametrize("flags, match", [
    (["--compare", "4", "--quantizer", "gptq"], "--quantizer gptq needs --calibration FILE"),
    (["--compare", "4", "--calibration", "{calib}"], "only used by --quantizer gptq"),
    (["--quantizer", "mse"], "--quantizer is only used with --compare"),
    (["--compare", "4", "--quantizer", "gptq", "--calibration", "{tmp}/nope.txt"],
     "calibration file {tmp}/nope.txt: cannot read it"),
])
def test_stream_eval_quantizer_flag_errors(tiny_model_dir, tmp_path, calib, capsys, flags,
                                           match):
    from stream_run.cli.eval import main as eval_main

    src, _, _ = tiny_model_dir("llama")
    argv = [str(src), "--text", str(calib)] + [f.format(calib=calib, tmp=tmp_path)
                                               for f in flags]
    assert eval_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert match.format(tmp=tmp_path) in err
