"""python -m stream_run.bench.matvec: one row per setting, each a positive rate over the bytes
it read."""

import re

from stream_run.bench.matvec import main


def test_matvec_bench_prints_a_rate_per_setting(capsys):
    assert main(["--threads", "1", "--bits", "4,8", "--layers", "1", "-r", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if re.match(r"\| (1 blocks|tied head) \|", line)]
    assert [r.split("|")[1:4] for r in rows] == [
        [" 1 blocks ", " 4 ", " 1 "], [" tied head ", " 4 ", " 1 "],
        [" 1 blocks ", " 8 ", " 1 "], [" tied head ", " 8 ", " 1 "]]
    for row in rows:
        mb, rate = float(row.split("|")[4]), float(row.split("|")[5].split()[0])
        assert mb > 0 and rate > 0
