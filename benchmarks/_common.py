"""Shared helpers for the benchmarks: machine description, timing, the RESULTS.md table."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "| date | benchmark | figure | machine | command |\n|---|---|---|---|---|\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    desc = f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        desc = f"{torch.cuda.get_device_name()} + " + desc
    return desc


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeat: int) -> float:
    """Median seconds of ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def report(name: str, result: dict[str, Any], figure: str, *, record: bool = True) -> None:
    """Print one JSON object and append a row to RESULTS.md."""
    result = {"benchmark": name, "machine": machine(), "command": command(), **result}
    print(json.dumps(result))
    if not record:
        return
    row = f"| {_dt.date.today().isoformat()} | {name} | {figure} | {machine()} | `{command()}` |"
    RESULTS.write_text(insert_log_row(RESULTS.read_text() if RESULTS.exists() else "", row))


def insert_log_row(text: str, row: str) -> str:
    """``text`` with ``row`` added as the last row of its benchmark-log table (created if missing).

    The row goes right after the table's last line, so prose written below the table stays below it.
    """
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("| date |"))
    except StopIteration:
        return text.rstrip("\n") + "\n\n## Benchmark log\n\n" + HEADER + row + "\n"
    end = start
    while end + 1 < len(lines) and lines[end + 1].startswith("|"):
        end += 1
    return "\n".join(lines[: end + 1] + [row] + lines[end + 1:]) + "\n"
