"""benchmarks/_common.insert_log_row: a benchmark's row lands in the log table, not after the prose."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_common", Path(__file__).parents[1] / "benchmarks" / "_common.py")
bench_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_common)


def test_row_goes_after_the_last_table_row_and_before_the_prose() -> None:
    text = "# R\n\n## Benchmark log\n\n" + bench_common.HEADER + "| a | b | c | d | e |\n\n## Notes\nprose\n"
    out = bench_common.insert_log_row(text, "| new | b | c | d | e |")
    lines = out.splitlines()
    assert lines.index("| new | b | c | d | e |") == lines.index("| a | b | c | d | e |") + 1
    assert out.endswith("## Notes\nprose\n")


def test_missing_table_is_created_at_the_end() -> None:
    out = bench_common.insert_log_row("# R\nsome text\n", "| new | b | c | d | e |")
    assert out.startswith("# R\nsome text\n\n## Benchmark log\n\n| date |")
    assert out.endswith("| new | b | c | d | e |\n")
    # and a second row lands below the first
    out2 = bench_common.insert_log_row(out, "| two | b | c | d | e |")
    assert out2.endswith("| new | b | c | d | e |\n| two | b | c | d | e |\n")
