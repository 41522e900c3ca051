"""models/rope.py against transformers' own RoPE initialisation, and GGUF yarn metadata."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from stream_run.loaders.errors import FormatError
from stream_run.loaders.gguf_file import _rope_scaling
from stream_run.models.rope import inv_freq, rope_parameters

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding  # noqa: E402

INV_RTOL = 1e-6  # float32 inv_freq; transformers computes in float32, we mostly in float64
FACTOR_RTOL = 1e-12


def _factors(n: int, lo: float, hi: float, seed: int) -> list[float]:
    return [float(x) for x in np.random.default_rng(seed).uniform(lo, hi, n).round(4)]


def _hf(rope: dict, head_dim: int, max_pos: int, seq_len: int | None = None, **top):
    """transformers' (inv_freq, attention_factor) for a LlamaConfig built with `rope`."""
    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=4,
                      head_dim=head_dim, max_position_embeddings=max_pos,
                      rope_parameters=copy.deepcopy(rope), **top)
    kind = cfg.rope_parameters["rope_type"]
    if kind == "default":
        # Not in ROPE_INIT_FUNCTIONS; each model carries its own, and Llama's ignores
        # partial_rotary_factor. Phi-3's reads it like the other init functions do.
        freqs, factor = Phi3RotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        freqs, factor = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", seq_len=seq_len)
    return freqs.numpy(), factor


def _check(got: tuple[np.ndarray, float], want: tuple[np.ndarray, float]) -> None:
    assert got[0].dtype == np.float32 and got[0].shape == want[0].shape
    np.testing.assert_allclose(got[0], want[0], rtol=INV_RTOL, atol=0)
    assert isinstance(got[1], float)
    assert got[1] == pytest.approx(want[1], rel=FACTOR_RTOL, abs=0)


# (rope dict without rope_theta, max_position_embeddings, seq_len)
CASES = {
    "default": ({"rope_type": "default"}, 4096, None),
    "linear-2": ({"rope_type": "linear", "factor": 2.0}, 8192, None),
    "linear-4": ({"rope_type": "linear", "factor": 4.0}, 16384, None),
    "llama3.1-8": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                   131072, None),
    "llama3.2-32": ({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                    131072, None),
    "dynamic-2-init": ({"rope_type": "dynamic", "factor": 2.0}, 4096, None),
    "dynamic-4-long": ({"rope_type": "dynamic", "factor": 4.0}, 4096, 10000),
    "yarn-qwen3-4": ({"rope_type": "yarn", "factor": 4.0,
                      "original_max_position_embeddings": 32768}, 131072, None),
    "yarn-2-no-orig": ({"rope_type": "yarn", "factor": 2.0}, 32768, None),
    "yarn-8-attn": ({"rope_type": "yarn", "factor": 8.0, "attention_factor": 0.8,
                     "original_max_position_embeddings": 4096}, 32768, None),
    "yarn-32-untruncated": ({"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": 4096}, 131072, None),
    "yarn-betas": ({"rope_type": "yarn", "factor": 4.0, "beta_fast": 16, "beta_slow": 2,
                    "original_max_position_embeddings": 2048}, 8192, None),
    "yarn-deepseek-v2": ({"rope_type": "yarn", "factor": 40.0, "mscale": 0.707,
                          "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1,
                          "original_max_position_embeddings": 4096}, 163840, None),
    "yarn-mscale-ratio": ({"rope_type": "yarn", "factor": 32.0, "mscale": 1.0,
                           "mscale_all_dim": 0.5, "original_max_position_embeddings": 4096},
                          131072, None),
    "yarn-factor-from-lengths": ({"rope_type": "yarn", "factor": None, "mscale": 1.0,
                                  "mscale_all_dim": 1.0,
                                  "original_max_position_embeddings": 4096}, 16384, None),
}


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("partial", [1.0, 0.5, 0.75])
@pytest.mark.parametrize("theta", [10000.0, 1000000.0])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, theta, partial, head_dim):
    rope, max_pos, seq_len = CASES[case]
    want = _hf({**rope, "rope_theta": theta, "partial_rotary_factor": partial}, head_dim,
               max_pos, seq_len)
    _check(rope_parameters(head_dim, theta, rope, max_pos, partial, seq_len=seq_len), want)
    assert want[0].shape == (int(head_dim * partial) // 2,)


def _longrope(rotary_dim: int, **extra) -> dict:
    return {"rope_type": "longrope", "original_max_position_embeddings": 4096,
            "short_factor": _factors(rotary_dim // 2, 1.0, 1.2, 0),
            "long_factor": _factors(rotary_dim // 2, 1.0, 60.0, 1), **extra}


@pytest.mark.parametrize(("head_dim", "partial"), [(96, 1.0), (64, 0.5), (128, 0.75)])
@pytest.mark.parametrize("seq_len", [None, 100, 4096, 4097, 131072])
@pytest.mark.parametrize("extra", [{}, {"factor": 8.0}, {"attention_factor": 1.5},
                                   {"factor": 1.0}])
def test_longrope_matches_transformers(head_dim, partial, seq_len, extra):
    rope = _longrope(int(head_dim * partial), **extra)
    want = _hf({**rope, "rope_theta": 10000.0, "partial_rotary_factor": partial}, head_dim,
               131072, seq_len)
    got = rope_parameters(head_dim, 10000.0, rope, 131072, partial, seq_len=seq_len)
    _check(got, want)
    # the long factors exactly when the sequence outgrows the original context
    short = rope_parameters(head_dim, 10000.0, rope, 131072, partial)
    assert np.array_equal(got[0], short[0]) == (seq_len is None or seq_len <= 4096)
    assert got[1] == short[1]


def test_longrope_phi3_top_level_original_length_and_su_alias():
    # Phi-3: `original_max_position_embeddings` sits next to rope_scaling, which says "su"
    rope = _longrope(96)
    del rope["original_max_position_embeddings"]
    want = _hf({**rope, "rope_theta": 10000.0}, 96, 131072, 5000,
               original_max_position_embeddings=4096)
    for kind in ("longrope", "su"):
        got = rope_parameters(96, 10000.0, {**rope, "rope_type": kind}, 131072, seq_len=5000,
                              original_max_position_embeddings=4096)
        _check(got, want)
    assert want[1] == pytest.approx(np.sqrt(1 + np.log(32) / np.log(4096)), rel=1e-12)


def test_legacy_rope_scaling_spelling():
    # transformers 4 config.json: rope_theta top-level, rope_scaling with `type`
    scaling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    cfg = LlamaConfig(hidden_size=512, num_attention_heads=4, head_dim=128,
                      max_position_embeddings=131072, rope_theta=1e6,
                      rope_scaling=copy.deepcopy(scaling))
    want = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    _check(rope_parameters(128, 1e6, scaling, 131072), (want[0].numpy(), want[1]))


def test_transformers5_rope_parameters_spelling():
    # transformers 5 config.json: no top-level rope_theta, it is inside rope_parameters
    cfg = LlamaConfig(hidden_size=512, num_attention_heads=4, head_dim=128,
                      max_position_embeddings=131072, rope_theta=1e6,
                      rope_scaling={"type": "yarn", "factor": 4.0,
                                    "original_max_position_embeddings": 32768})
    saved = cfg.to_dict()
    assert "rope_theta" not in saved and "rope_scaling" not in saved
    want = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    got = rope_parameters(128, 10000.0, saved["rope_parameters"], 131072)  # dict's theta wins
    _check(got, (want[0].numpy(), want[1]))


def test_yarn_attention_factor_formulas():
    assert rope_parameters(64, 1e4, {"rope_type": "yarn", "factor": 4.0}, 4096)[1] == \
        pytest.approx(0.1 * np.log(4.0) + 1, rel=1e-15)
    deepseek = {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707,
                "original_max_position_embeddings": 4096}
    assert rope_parameters(64, 1e4, deepseek, 163840)[1] == 1.0
    assert rope_parameters(64, 1e4, {**deepseek, "attention_factor": 0.9}, 163840)[1] == 0.9


def test_inv_freq_unchanged():
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0}
    for scaling in (None, {"rope_type": "linear", "factor": 2.0}, llama3):
        got = inv_freq(64, 500000.0, scaling)
        assert got.dtype == np.float32 and got.shape == (32,)
    # llama3 without original_max_position_embeddings still means Llama 3's 8192 here
    want = _hf({**llama3, "rope_theta": 500000.0, "original_max_position_embeddings": 8192},
               64, 131072)
    np.testing.assert_allclose(inv_freq(64, 500000.0, llama3), want[0], rtol=INV_RTOL)


def test_unsupported_types_are_named():
    with pytest.raises(ValueError, match=r"unsupported rope_scaling type 'proportional'; "
                                         r"supported: default, linear, llama3, dynamic, yarn, "
                                         r"longrope$"):
        rope_parameters(64, 1e4, {"rope_type": "proportional", "factor": 1.0}, 4096)
    with pytest.raises(ValueError, match=r"unsupported rope_scaling type 'yarn'; "
                                         r"supported: default, linear, llama3$"):
        inv_freq(64, 1e4, {"type": "yarn", "factor": 4.0})


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="rotary dimension 25 .* must be even"):
        rope_parameters(50, 1e4, None, 4096, 0.5)
    with pytest.raises(ValueError, match="short_factor has 48 entries.*needs 24"):
        rope_parameters(96, 1e4, _longrope(96), 131072, 0.5)


# --- GGUF metadata -> HF rope dict ----------------------------------------------------------

def _meta(**keys) -> dict:
    # GGUF floats are float32; the reader hands them over widened to float64
    return {f"qwen2.rope.scaling.{k}": float(np.float32(v)) if isinstance(v, float) else v
            for k, v in keys.items()}


@pytest.mark.parametrize(("meta", "want"), [
    (_meta(type="yarn", factor=4.0, original_context_length=32768),
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    (_meta(type="yarn", factor=32.0, original_context_length=4096, yarn_beta_fast=32.0,
           yarn_beta_slow=1.0, yarn_attn_factor=0.8, yarn_ext_factor=-1.0),
     {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
      "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 0.8}),
    (_meta(type="yarn", factor=40.0, original_context_length=4096,
           yarn_log_multiplier=0.1 * 0.707, yarn_ext_factor=1.0),
     {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
      "mscale": 0.707, "mscale_all_dim": 0.707}),
    (_meta(type="linear", factor=2.0, yarn_beta_fast=32.0),
     {"rope_type": "linear", "factor": 2.0}),
])
def test_gguf_yarn_metadata(meta, want):
    assert _rope_scaling(meta, "qwen2", {}, "x.gguf") == want


def test_gguf_yarn_matches_hf_config():
    # DeepSeek-V2's rope as llama.cpp's converter writes it, back through rope_parameters
    hf = {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707,
          "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 4096}
    meta = _meta(type="yarn", factor=40.0, original_context_length=4096, yarn_beta_fast=32.0,
                 yarn_beta_slow=1.0, yarn_log_multiplier=0.1 * 0.707)
    got = rope_parameters(64, 1e4, _rope_scaling(meta, "qwen2", {}, "x.gguf"), 163840)
    _check(got, _hf({**hf, "rope_theta": 1e4}, 64, 163840))


def test_gguf_yarn_ext_factor_rejected():
    meta = _meta(type="yarn", factor=4.0, original_context_length=4096, yarn_ext_factor=0.5)
    with pytest.raises(FormatError, match="yarn_ext_factor=0.5"):
        _rope_scaling(meta, "qwen2", {}, "x.gguf")
