"""One streaming-study point in a fresh process, so that its peak RSS (VmHWM) is its own.

    python -m stream_run.bench.stream_point '{"model": ..., "budget_bytes": ..., ...}'

Prints the point as one JSON line; a bad model or budget is one line on stderr, exit 2.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict


def main(argv: list[str] | None = None) -> int:
    from stream_run.bench.streaming import PointConfig, run_point
    from stream_run.cli.common import USER_ERRORS

    args = sys.argv[1:] if argv is None else argv
    try:
        cfg = PointConfig(**json.loads(args[0]))
        point = run_point(cfg, fresh_process=True)
    except USER_ERRORS as exc:
        print(f"stream-bench: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(point)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
