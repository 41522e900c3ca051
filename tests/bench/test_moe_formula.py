"""bench/moe_formula.py: a limit_compare --passes log's rows checked against the formula."""

from __future__ import annotations

from stream_run.bench import moe_formula as mf


def _line(i: int, read: int, hits: int, misses: int, expert_read: int, plan: str) -> str:
    return (f"  pass {i}: wall_s 0.5, bytes_read {read}, late_hits {hits}, late_misses {misses}, "
            f"late_bytes_read {expert_read}, streamed_file_bytes {plan}")


LOG = "\n".join(["| stream-run (budget 1 GB) | 0.5 | 0.01 | 1.0 | ok | 1/1/1 |",
                 _line(0, 5000, 0, 40, 4000, "None"), _line(1, 330, 30, 10, 300, "50"),
                 _line(2, 230, 20, 20, 200, "50"), _line(0, 100, 0, 1, 100, "0")])


def test_rows_split_at_pass_0_and_the_prompt_pass_is_left_out():
    rows = mf.parse_rows(LOG)
    assert [len(r) for r in rows] == [3, 1]
    r = mf.check(rows[0], tokens=2, active_bytes=400.0)  # 40 picks of 10 bytes a token
    assert abs(r["hit_rate"] - 50 / 80) < 1e-12
    assert r["measured"] == 280.0 and r["dense_read"] == 30.0 and r["plan_dense"] == 50.0
    assert abs(r["predicted_experts"] - 150.0) < 1e-9  # 400 x (1 - 0.625)
    assert abs(r["ratio"] - 280 / 180) < 1e-12
    assert abs(r["ratio_plan"] - 280 / 200) < 1e-12


def test_a_log_without_pass_lines_is_named_with_exit_2(tmp_path, capsys):
    log = tmp_path / "run.log"
    log.write_text("| stream-run | 0.5 |\n")
    assert mf.main(["m.gguf", str(log)]) == 2
    assert "no pass lines" in capsys.readouterr().err
