"""Grid sweeps over config values and seeds, resumable, with mean / std tables.

Layout of a sweep folder::

    DIR/sweep.json                      what was asked for (base config, grid, seeds)
    DIR/cells/<k=v,...>/seed-<s>/       one run folder per cell and seed (see train.fit)
    DIR/results.{json,csv,md}           one row per cell: mean and std over seeds

Invoking the same sweep again skips finished runs, resumes interrupted ones from their newest
intact checkpoint and starts the missing ones.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from lipmargin.checkpoint import atomic_write_text, latest_checkpoint
from lipmargin.config import ConfigError, RunConfig, apply_overrides, config_from_dict, config_to_dict
from lipmargin.train import eps_key, fit

__all__ = ["parse_grid", "expand_grid", "cell_name", "run_sweep", "aggregate", "mean_std"]


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["loss.eps=0.15,0.5", "loss.p=0.01"]`` -> ``{"loss.eps": [0.15, 0.5], "loss.p": [0.01]}``."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r} must look like section.key=v1,v2 (e.g. loss.p=0.01,0.3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        values = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
        if not key or not values:
            raise ConfigError(f"--grid {item!r} needs a key and at least one value")
        if key in grid:
            raise ConfigError(f"--grid names {key!r} twice")
        grid[key] = values
    return grid


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """All combinations, in the order the keys and values were given."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def cell_name(params: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items()) or "base"


def _override_strings(params: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in params.items()]


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    n = len(values)
    if n == 0:
        return {"mean": math.nan, "std": math.nan}
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var)}


def aggregate(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    eps_keys = list(summaries[0]["certified_accuracy"]) if summaries else []
    return {
        "n": len(summaries),
        "clean_accuracy": mean_std([s["clean_accuracy"] for s in summaries]),
        "certified_accuracy": {e: mean_std([s["certified_accuracy"][e] for s in summaries]) for e in eps_keys},
        "lipschitz": mean_std([s["lipschitz"] for s in summaries]),
    }


def run_sweep(
    base: dict[str, Any],
    grid: dict[str, list[Any]],
    seeds: int,
    out_dir: str | Path,
    *,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train every (cell, seed) into ``out_dir`` and write the results tables; returns results."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1; got {seeds}")
    out = Path(out_dir)
    emit = on_event or (lambda event: None)
    base_cfg = config_from_dict(base)
    seed_list = [base_cfg.train.seed + i for i in range(seeds)]
    spec = {"base": config_to_dict(base_cfg), "grid": grid, "seeds": seed_list}
    spec_path = out / "sweep.json"
    if spec_path.exists():
        try:
            previous = json.loads(spec_path.read_text())
            # Through the current schema, so that a key added to lipmargin since (with its
            # default) does not make the same sweep look different.
            previous["base"] = config_to_dict(config_from_dict(previous["base"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            previous = None
        if previous != json.loads(json.dumps(spec)):
            raise ConfigError(f"{out} holds a different sweep (see {spec_path}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(spec_path, json.dumps(spec, indent=1))

    # Build and validate every config before training anything.
    plan: list[tuple[dict[str, Any], int, RunConfig, Path]] = []
    for params in expand_grid(grid):
        for seed in seed_list:
            values = apply_overrides(config_to_dict(base_cfg), _override_strings(params) + [f"train.seed={seed}"])
            cfg = config_from_dict(values)
            plan.append((params, seed, cfg, out / "cells" / cell_name(params) / f"seed-{seed}"))

    for i, (params, seed, cfg, run_dir) in enumerate(plan):
        event = {"event": "run", "index": i + 1, "total": len(plan), "params": params, "seed": seed, "run_dir": str(run_dir)}
        if (run_dir / "summary.json").exists():
            emit({**event, "status": "done"})
            continue
        resume = latest_checkpoint(run_dir / "checkpoints") is not None
        emit({**event, "status": "resume" if resume else "start"})
        fit(cfg, run_dir, resume=resume)

    cells = []
    for params in expand_grid(grid):
        runs = [out / "cells" / cell_name(params) / f"seed-{s}" for s in seed_list]
        summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
        cells.append({"params": params, "runs": [str(r.relative_to(out)) for r in runs], **aggregate(summaries)})
    results = {
        "grid": grid,
        "seeds": seed_list,
        "eval_eps": [eps_key(e) for e in base_cfg.eval.eps],
        "cells": cells,
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out / "results.csv", results_csv(results))
    atomic_write_text(out / "results.md", results_markdown(results))
    return results


def results_csv(results: dict[str, Any]) -> str:
    keys = list(results["grid"])
    eps = results["eval_eps"]
    header = keys + ["n", "clean_mean", "clean_std"]
    for e in eps:
        header += [f"cra_{e}_mean", f"cra_{e}_std"]
    header += ["lipschitz_mean", "lipschitz_std"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for c in results["cells"]:
        row = [c["params"][k] for k in keys] + [c["n"], c["clean_accuracy"]["mean"], c["clean_accuracy"]["std"]]
        for e in eps:
            row += [c["certified_accuracy"][e]["mean"], c["certified_accuracy"][e]["std"]]
        row += [c["lipschitz"]["mean"], c["lipschitz"]["std"]]
        writer.writerow(row)
    return buf.getvalue()


def _pm(stat: dict[str, float], scale: float = 100.0, digits: int = 1) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def results_markdown(results: dict[str, Any]) -> str:
    keys = list(results["grid"])
    eps = results["eval_eps"]
    head = keys + ["seeds", "clean %"] + [f"CRA@{e} %" for e in eps] + ["Lipschitz"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in results["cells"]:
        cols = [str(c["params"][k]) for k in keys] + [str(c["n"]), _pm(c["clean_accuracy"])]
        cols += [_pm(c["certified_accuracy"][e]) for e in eps]
        cols.append(f"{c['lipschitz']['mean']:.4g} ± {c['lipschitz']['std']:.2g}")
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"
