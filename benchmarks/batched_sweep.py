"""A sweep trained run by run vs the same sweep trained as batched groups (``sweep --batched``).

Each case trains the sweep twice in this process, sequentially and batched, into a temporary
folder, and prints one JSON line: both wall times, the speed-up, whether the two results tables are
identical, the machine and its load (the 1-minute load average before and after).

    python benchmarks/batched_sweep.py                       # moons + digits on the CPU
    python benchmarks/batched_sweep.py --case moons --epochs 50
    python benchmarks/batched_sweep.py --case fmnist-4c3f-gpu --root /path/to/fashion-mnist --epochs 1

Cases:
    moons             the two-moons slack sweep: preset moons-slack (4 values of p) x 3 seeds = 12 runs
    digits            preset digits-cll (2C2F, float64) x 3 seeds = 3 runs
    fmnist-4c3f-gpu   4C3F on Fashion-MNIST, loss.eps in {0.1412, 0.2824, 0.4235, 0.5} x 3 seeds =
                      12 runs on cuda; also reports the time of one run alone (target: 12 batched
                      runs in <= 2x the time of one)

Targets (issue 16): >= 5x on moons and >= 2x on digits on a 2-core CPU with --threads 1.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _common import report
from lipmargin.config import config_to_dict, load_config
from lipmargin.sweep import parse_grid, run_sweep

CASES: dict[str, dict[str, Any]] = {
    "moons": {"preset": "moons-slack", "grid": None, "seeds": 3, "device": "cpu"},
    "digits": {"preset": "digits-cll", "grid": [], "seeds": 3, "device": "cpu"},
    "fmnist-4c3f-gpu": {
        "preset": "fmnist-4c3f-cll", "grid": ["loss.eps=0.1411765,0.2823529,0.4235294,0.5"], "seeds": 3, "device": "cuda",
    },
}


def _timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_case(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    case = CASES[name]
    overrides = [f"train.device={args.device or case['device']}"]
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.root is not None:
        overrides.append(f"data.root={args.root}")
    cfg = load_config(None, preset=case["preset"], overrides=overrides)
    base = config_to_dict(cfg)
    grid = parse_grid(list(cfg.sweep.grid) if case["grid"] is None else case["grid"])
    seeds = case["seeds"]
    load_before = os.getloadavg()[0]
    result: dict[str, Any] = {"case": name, "runs": seeds * math.prod(len(v) for v in grid.values()), "epochs": cfg.train.epochs}
    if name.endswith("-gpu"):
        result["one_run_s"] = _timed(lambda: run_sweep(base, {}, 1, work / "one"))
    result["sequential_s"] = _timed(lambda: run_sweep(base, grid, seeds, work / "seq"))
    result["batched_s"] = _timed(lambda: run_sweep(base, grid, seeds, work / "bat", batched=True, group_size=args.group_size))
    result["speedup"] = result["sequential_s"] / result["batched_s"]
    if "one_run_s" in result:
        result["batched_over_one_run"] = result["batched_s"] / result["one_run_s"]
    seq_table = (work / "seq" / "results.md").read_text()
    bat_table = (work / "bat" / "results.md").read_text()
    result["same_table"] = seq_table == bat_table
    if not result["same_table"]:
        result["tables"] = {"sequential": seq_table, "batched": bat_table}
    result["load_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    result["threads"] = torch.get_num_threads()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="repeatable; default: moons and digits")
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs for every run (default: the preset's)")
    parser.add_argument("--root", default=None, help="data.root (Fashion-MNIST IDX files for the GPU case)")
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--device", default=None, help="train.device for every run (default: the case's, cpu or cuda)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--keep", default=None, help="keep the sweep folders under this folder")
    parser.add_argument("--no-record", action="store_true", help="do not append rows to RESULTS.md")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for name in args.case or ["moons", "digits"]:
        work = Path(args.keep) / name if args.keep else Path(tempfile.mkdtemp(prefix=f"batched-{name}-"))
        if work.exists() and args.keep:
            shutil.rmtree(work)
        try:
            result = run_case(name, args, work)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        figure = (f"{name}: {result['runs']} runs x {result['epochs']} epochs, sequential {result['sequential_s']:.1f} s, "
                  f"batched {result['batched_s']:.1f} s, speed-up {result['speedup']:.2f}x, same table: {result['same_table']}, "
                  f"load {result['load_1min'][0]}-{result['load_1min'][1]}")
        if "one_run_s" in result:
            figure += f", one run alone {result['one_run_s']:.1f} s (batched = {result['batched_over_one_run']:.2f}x one run)"
        report("batched_sweep", result, figure, record=not args.no_record)


if __name__ == "__main__":
    main()
