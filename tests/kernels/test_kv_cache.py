"""KV caches built per layer (kernels/kv_cache.py): the sliding-window kind on both backends
against a float64 reference that keeps every position and masks the window explicitly."""

import numpy as np
import pytest

from stream_run import kernels
from stream_run.kernels import fused
from stream_run.kernels.kv_cache import Ring, window_mask
from stream_run.kernels.numpy_backend import NumpyBackend
from stream_run.kernels.quant import quantize

BACKENDS = [
    "numpy",
    pytest.param("mlx", marks=pytest.mark.skipif(
        "mlx" not in kernels.available_backends(), reason="mlx is not installed")),
]
H, HKV, D, W = 4, 2, 8, 5
SCALE = D**-0.5
TOL = {"rtol": 1e-5, "atol": 1e-5}
# prefill chunk sizes 1, W - 1, W, W + 3, then decode steps well past the window
SCHEDULES = [[1] * 14, [W - 1] + [1] * 9, [W] + [1] * 9, [W + 3] + [1] * 9,
             [2, W + 3, 1, W, W - 1, 1, 1, 1]]


@pytest.fixture(params=BACKENDS)
def ops(request):
    return kernels.get_backend(request.param)


def to_np(ops, x):
    return np.asarray(ops.to_numpy(x), dtype=np.float32)


def reference(q, keys, values, positions, window):
    """float64 attention of q (L, H, D) at positions over every key so far (T, Hkv, D) with an
    explicit mask: key j is visible iff 0 <= p - j < window (None: full causal)."""
    G = q.shape[1] // keys.shape[1]
    k = np.repeat(keys, G, axis=1).astype(np.float64)  # (T, H, D)
    v = np.repeat(values, G, axis=1).astype(np.float64)
    s = np.einsum("lhd,thd->hlt", q.astype(np.float64), k) * SCALE
    d = np.asarray(positions)[:, None] - np.arange(len(keys))[None, :]
    visible = (d >= 0) if window is None else (d >= 0) & (d < window)
    s = np.where(visible[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hlt,thd->lhd", p, v)  # (L, H, D)


def random_qkv(rng, L):
    return (rng.standard_normal((L, H, D)).astype(np.float32),
            rng.standard_normal((L, HKV, D)).astype(np.float32),
            rng.standard_normal((L, HKV, D)).astype(np.float32))


def test_sliding_memory_is_bounded_by_the_window(ops):
    cache = ops.make_kv_cache(3, 1, HKV, D, 1000, windows=[None, 16, W])
    assert cache.windows == [None, 16, W]
    assert cache.nbytes == 2 * 4 * HKV * D * (1000 + 16 + W)
    assert [layer.nbytes for layer in cache.layers] == [2 * 4 * HKV * D * n
                                                        for n in (1000, 16, W)]
    # a window the context never exceeds is a full layer of max_len positions
    small = ops.make_kv_cache(2, 1, HKV, D, 8, windows=[8, 4096])
    assert small.windows == [None, None] and small.nbytes == 2 * 2 * 4 * HKV * D * 8
    assert ops.make_kv_cache(2, 1, HKV, D, 8).windows == [None, None]


def test_bad_windows_are_refused(ops):
    with pytest.raises(ValueError, match="windows has 1 entries for 2 layers"):
        ops.make_kv_cache(2, 1, HKV, D, 8, windows=[4])
    with pytest.raises(ValueError, match="sliding window must be >= 1, got 0"):
        ops.make_kv_cache(2, 1, HKV, D, 8, windows=[None, 0])


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("path", ["update", "attend"])
def test_sliding_attention_matches_masked_reference(ops, schedule, path):
    """Layer 0 slides (window W), layer 1 is full; each pass is written through update +
    ops.attention (the unfused path) or kv.attend (the fused path's)."""
    rng = np.random.default_rng(len(schedule) * 10 + schedule[0])
    windows = [W, None]
    kv = ops.make_kv_cache(2, 1, HKV, D, sum(schedule) + 2, windows=windows)
    history = {i: ([], []) for i in range(2)}
    for L in schedule:
        positions = np.arange(kv.offset, kv.offset + L)
        for layer_idx, window in enumerate(windows):
            q, k, v = random_qkv(rng, L)
            history[layer_idx][0].append(k)
            history[layer_idx][1].append(v)
            if path == "update":
                keys, values = kv.update(layer_idx, *(ops.from_numpy(a.transpose(1, 0, 2)[None])
                                                      for a in (k, v)))
                if window is not None:
                    assert keys.shape[2] <= window + L - 1  # the window, not the history
                o = ops.attention(ops.from_numpy(q.transpose(1, 0, 2)[None]), keys, values,
                                  SCALE, keys.shape[2] - L, window)
                got = to_np(ops, o)[0].transpose(1, 0, 2)
            else:
                o = kv.attend(layer_idx, *(ops.from_numpy(a) for a in (q, k, v)), SCALE)
                got = to_np(ops, o).reshape(L, H, D)
            want = reference(q, np.concatenate(history[layer_idx][0]),
                             np.concatenate(history[layer_idx][1]), positions, window)
            np.testing.assert_allclose(got, want, **TOL)
        kv.advance(L)
    assert kv.offset == sum(schedule) > 2 * W


@pytest.mark.parametrize("offset, L, window", [(0, 6, 3), (4, 1, 2), (7, 4, 5), (2, 9, 1)])
def test_attention_window_argument(ops, offset, L, window):
    """ops.attention with keys of [0, offset + L) and a window: the explicit mask."""
    rng = np.random.default_rng(offset + L)
    q, _, _ = random_qkv(rng, L)
    k = rng.standard_normal((offset + L, HKV, D)).astype(np.float32)
    v = rng.standard_normal((offset + L, HKV, D)).astype(np.float32)
    got = ops.attention(*(ops.from_numpy(a.transpose(1, 0, 2)[None]) for a in (q, k, v)),
                        SCALE, offset, window)
    want = reference(q, k, v, np.arange(offset, offset + L), window)
    np.testing.assert_allclose(to_np(ops, got)[0].transpose(1, 0, 2), want, **TOL)


def write_step(ops, kv, rng, L):
    """One pass of L rows through both layers of kv (update path); returns layer 0's output."""
    outs = []
    for layer_idx in range(len(kv.layers)):
        q, k, v = random_qkv(rng, L)
        keys, values = kv.update(layer_idx, *(ops.from_numpy(a.transpose(1, 0, 2)[None])
                                              for a in (k, v)))
        outs.append(to_np(ops, ops.attention(ops.from_numpy(q.transpose(1, 0, 2)[None]), keys,
                                             values, SCALE, keys.shape[2] - L, W)))
    return outs[0]


def test_trim_rolls_back_within_the_ring(ops):
    kv = ops.make_kv_cache(2, 1, HKV, D, 40, windows=[W, None])
    write_step(ops, kv, np.random.default_rng(0), 3)
    kv.advance(3)
    kv.trim(3)  # before the ring wraps, any rollback is possible
    assert kv.offset == 0
    for _ in range(2 * W):
        write_step(ops, kv, np.random.default_rng(1), 1)
        kv.advance(1)
    redo = write_step(ops, kv, np.random.default_rng(2), 1)
    kv.advance(1)
    kv.trim(1)  # one token always: the ring still holds the window the redo needs
    np.testing.assert_array_equal(write_step(ops, kv, np.random.default_rng(2), 1), redo)
    kv.advance(1)
    with pytest.raises(ValueError, match=r"cannot trim 2 tokens: layer 0: .*window 5.* no "
                                         r"longer holds position 5.*hint"):
        kv.trim(2)
    assert kv.offset == 2 * W + 1
    with pytest.raises(ValueError, match="cannot trim 12 tokens from a KV cache holding 11"):
        kv.trim(12)


def test_a_dropped_pass_of_several_rows_is_reported(ops):
    """update writes the ring during the pass; if the pass is dropped (no advance), a redo at
    the same offset would miss keys it overwrote: the layer says so instead of attending."""
    kv = ops.make_kv_cache(1, 1, HKV, D, 40, windows=[W])
    rng = np.random.default_rng(3)
    for _ in range(2 * W):
        write_step(ops, kv, rng, 1)
        kv.advance(1)
    write_step(ops, kv, rng, 3)  # dropped: no advance
    with pytest.raises(ValueError, match=r"no longer holds position 6, which a pass at offset "
                                         r"10 needs"):
        write_step(ops, kv, rng, 3)


def test_ring_slots_wrap():
    ring = Ring(4)
    assert ring.slots(2, 6) == [(2, 4), (0, 2)]
    assert ring.store(3, 7) == [(2, 4, 3), (0, 2, 5)]  # the last 4 of 7 rows
    assert (ring.start, ring.end) == (6, 10)
    assert ring.first_needed(10) == 7
    np.testing.assert_array_equal(window_mask(2, 4, 2, 2),
                                  [[False, True, True, False], [False, False, True, True]])


def quantized(rng, out, inn):
    return quantize((rng.standard_normal((out, inn)) / np.sqrt(inn)).astype(np.float32), 4, 32)


@pytest.mark.parametrize("schedule", [[1] * 12, [3, 1, 1, 2, 1, 1, 1, 1]])
def test_block_decode_on_a_sliding_layer(monkeypatch, schedule):
    """The one-call fused block (numpy DecodeBlock) on a ring: one row goes through
    fused.decoder_block (its slot in the ring, attention over all slots held), several rows
    through the three calls; both against block_attention_input + the float64 reference."""
    calls = []
    real = fused.decoder_block
    monkeypatch.setattr(fused, "decoder_block", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(9)
    E, inter = 32, 64
    ops = NumpyBackend()
    w = {"q": quantized(rng, H * D, E), "k": quantized(rng, HKV * D, E),
         "v": quantized(rng, HKV * D, E), "o": quantized(rng, E, H * D),
         "mlp": [quantized(rng, inter, E), quantized(rng, inter, E), quantized(rng, E, inter)]}
    ln = (1 + 0.1 * rng.standard_normal(E)).astype(np.float32)
    inv_freq = (1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32)
    kv = ops.make_kv_cache(1, 1, HKV, D, sum(schedule), windows=[W])
    keys, values = [], []
    for L in schedule:
        x = rng.standard_normal((L, E)).astype(np.float32)
        freqs = np.arange(kv.offset, kv.offset + L, dtype=np.float32)[:, None] * inv_freq
        attn_in = (x, ln, 1e-5, [w["q"], w["k"], w["v"]], [None] * 3, [None, None],
                   np.cos(freqs), np.sin(freqs), H, HKV)
        q, k, v = ops.block_attention_input(*attn_in)
        keys.append(k)
        values.append(v)
        attn = reference(q, np.concatenate(keys), np.concatenate(values),
                         np.arange(kv.offset, kv.offset + L), W).reshape(L, H * D)
        want = ops.block_output(x, attn.astype(np.float32), w["o"], None, ln, 1e-5, w["mlp"])
        got = ops.block_decode(*attn_in, kv, 0, SCALE, w["o"], None, ln, w["mlp"])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        kv.advance(L)
    assert len(calls) == schedule.count(1)
