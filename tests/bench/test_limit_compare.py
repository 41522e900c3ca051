"""bench/limit_compare.py's pure parts: the decode passes' medians and the profile line, with
a Mixture-of-Experts model's expert hit rate and expert lookahead's guesses (the runs
themselves need root and cgroup v1)."""

from __future__ import annotations

from stream_run.bench import limit_compare as lc


def _pass(wall: float, bytes_read: int, late_hits: int, late_misses: int, guesses: int = 0,
          used: int = 0, wasted: int = 0) -> dict:
    rec = dict.fromkeys(lc.PASS_FIELDS, 0)
    rec.update(wall_s=wall, compute_s=wall / 2, io_stall_s=wall / 4, disk_busy_s=wall / 2,
               bytes_read=bytes_read, hits=late_hits + 10, misses=late_misses,
               late_hits=late_hits, late_misses=late_misses, lookahead_reads=guesses,
               lookahead_used=used, lookahead_wasted_bytes=wasted, prefetch_depth=2)
    rec.update(steps=34, depth_after=3, resident=18, streamed_file_bytes=0)
    return rec


def test_decode_profile_skips_the_prompt_pass_and_sums_expert_figures():
    prompt = _pass(5.0, 10**9, 0, 100, guesses=50, used=40, wasted=10**8)
    dec = [_pass(0.2, 2 * 10**7, 30, 10, 6, 4, 2 * 10**6),
           _pass(0.4, 4 * 10**7, 34, 6, 4, 3, 10**6)]
    p = lc._decode_profile([prompt, *dec], tokens=2)
    assert p["passes"] == 2
    assert abs(p["s_per_pass"] - 0.3) < 1e-9
    assert abs(p["expert_hit_rate"] - 64 / 80) < 1e-9  # summed over the decode passes
    assert p["lookahead"] == (10, 7, 3 * 10**6)
    line = lc._profile_line(p, ceiling_gbs=1.0)
    assert "expert hit rate 80.0 %" in line
    assert "lookahead 7 of 10 guessed reads picked (0.003 GB wasted)" in line


def test_a_dense_model_s_profile_line_has_no_expert_figures():
    p = lc._decode_profile([_pass(1.0, 10**9, 0, 0), _pass(0.5, 10**8, 0, 0)], tokens=1)
    line = lc._profile_line(p, ceiling_gbs=0.0)
    assert "expert" not in line and "lookahead" not in line


def test_a_stream_convert_directory_is_its_files(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "model-embed.safetensors").write_bytes(b"x" * 10)
    assert lc.model_files(str(tmp_path)) == [str(tmp_path / "manifest.json"),
                                             str(tmp_path / "model-embed.safetensors")]
    assert lc.model_files("/m.gguf") == ["/m.gguf"]


def test_an_unknown_llama_variant_is_named_with_exit_2(capsys):
    assert lc.main(["m.gguf", "--llama-variants", "no-repack,mmap"]) == 2
    err = capsys.readouterr().err
    assert "--llama-variants" in err and "'mmap'" in err
