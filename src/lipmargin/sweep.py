"""Grid sweeps over config values and seeds, resumable, with mean / std tables.

Layout of a sweep folder::

    DIR/sweep.json                      what was asked for (base config, grid, seeds)
    DIR/cells/<k=v,...>/seed-<s>/       one run folder per cell and seed (see train.fit)
    DIR/results.{json,csv,md}           one row per cell: mean and std over seeds

Invoking the same sweep again skips finished runs, resumes interrupted ones from their newest
intact checkpoint and starts the missing ones.  A folder (or a cell) holding runs of a different
config is never overwritten: :class:`~lipmargin.train.runfolder.RunExistsError`, or with
``overwrite=True`` the old folder is renamed to ``*.old-<time>`` first.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from lipmargin._io import atomic_write_text
from lipmargin.checkpoint import latest_checkpoint
from lipmargin.config import ConfigError, RunConfig, apply_overrides, config_from_dict, config_to_dict, load_yaml
from lipmargin.train import RunExistsError, eps_key, fit, move_aside, run_files, same_run_config

__all__ = ["parse_grid", "expand_grid", "cell_name", "run_sweep", "extends_sweep", "write_results", "audit_summary", "aggregate", "mean_std", "SweepError"]


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``--grid`` items as lists of values per config key.

    >>> parse_grid(["loss.eps=0.15,0.5", "loss.p=0.01"])
    {'loss.eps': [0.15, 0.5], 'loss.p': [0.01]}
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r} must look like section.key=v1,v2 (e.g. loss.p=0.01,0.3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        values = [load_yaml(v) for v in raw.split(",") if v.strip()]
        if not key or not values:
            raise ConfigError(f"--grid {item!r} needs a key and at least one value")
        if key in grid:
            raise ConfigError(f"--grid names {key!r} twice")
        grid[key] = values
    return grid


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """All combinations, in the order the keys and values were given.

    >>> expand_grid({"loss.eps": [0.15, 0.5], "loss.p": [0.01]})
    [{'loss.eps': 0.15, 'loss.p': 0.01}, {'loss.eps': 0.5, 'loss.p': 0.01}]
    """
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def cell_name(params: dict[str, Any]) -> str:
    """The folder name of a grid cell (``base`` for the empty grid).

    >>> cell_name({"loss.eps": 0.5, "loss.p": 0.01}), cell_name({})
    ('loss.eps=0.5,loss.p=0.01', 'base')
    """
    return ",".join(f"{k}={v}" for k, v in params.items()) or "base"


def _override_strings(params: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in params.items()]


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value).

    >>> mean_std([1.0, 3.0])
    {'mean': 2.0, 'std': 1.4142135623730951}
    """
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
    jobs: int = 1,
    overwrite: bool = False,
    batched: bool = False,
    group_size: int | None = None,
) -> dict[str, Any]:
    """Train every (cell, seed) into ``out_dir`` and write the results tables; returns results.

    ``jobs`` > 1 trains that many runs at once in separate processes (on one GPU they share it; with
    several visible GPUs they are spread over them).  ``on_event`` receives ``run`` events (one per
    run: done / start / resume / finished / failed), ``moved`` events (``overwrite``) and, with
    ``jobs=1``, the running run's :func:`~lipmargin.train.fit` events.  ``batched`` trains the runs
    that share model, data and schedule as one stacked model (see :mod:`lipmargin.train.batched`), at most
    ``group_size`` per group; the others train one by one.
    """
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1; got {seeds}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1; got {jobs}")
    if group_size is not None and (group_size < 1 or not batched):
        raise ConfigError(f"--group-size must be >= 1 and goes with --batched; got {group_size}")
    if batched and jobs > 1:
        raise ConfigError("--batched trains in one process; drop --jobs")
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
        current = json.loads(json.dumps(spec))
        if previous == current:
            pass
        elif previous is not None and extends_sweep(previous, current):
            # More values or seeds for the same base and keys: the finished cells are reused (each
            # is still checked against its config below), the new ones are trained.
            emit({"event": "extended", "run_dir": str(out)})
        else:
            if not overwrite:
                raise RunExistsError(f"{out} holds a different sweep (see {spec_path})", out, ["sweep.json"])
            emit({"event": "moved", "run_dir": str(out), "moved_to": str(move_aside(out))})
    # Build and validate every config before training anything, and before the folder records
    # this sweep (a refused grid leaves sweep.json as it was).
    plan: list[tuple[dict[str, Any], int, RunConfig, Path]] = []
    for params in expand_grid(grid):
        for seed in seed_list:
            values = apply_overrides(config_to_dict(base_cfg), _override_strings(params) + [f"train.seed={seed}"])
            cfg = config_from_dict(values)
            plan.append((params, seed, cfg, out / "cells" / cell_name(params) / f"seed-{seed}"))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(spec_path, json.dumps(spec, indent=1))

    # A cell holding a run of another config (a changed lipmargin default, a hand-edited folder)
    # is neither reused nor overwritten.
    foreign = [(run_dir, cfg) for _, _, cfg, run_dir in plan if run_files(run_dir) and not same_run_config(run_dir, cfg)]
    if foreign and not overwrite:
        run_dir = foreign[0][0]
        raise RunExistsError(
            f"{run_dir} holds a run of a different config than this sweep's"
            + (f" (and {len(foreign) - 1} more cells)" if len(foreign) > 1 else ""),
            run_dir, run_files(run_dir),
        )
    for run_dir, _ in foreign:
        emit({"event": "moved", "run_dir": str(run_dir), "moved_to": str(move_aside(run_dir))})

    todo: list[tuple[dict[str, Any], RunConfig, Path, bool]] = []
    for i, (params, seed, cfg, run_dir) in enumerate(plan):
        event = {"event": "run", "index": i + 1, "total": len(plan), "params": params, "seed": seed, "run_dir": str(run_dir)}
        if (run_dir / "summary.json").exists():
            emit({**event, "status": "done"})
            continue
        resume = latest_checkpoint(run_dir / "checkpoints") is not None
        todo.append((event, cfg, run_dir, resume))
    if batched:
        _run_batched(todo, group_size, emit)
    elif jobs == 1:
        for event, cfg, run_dir, resume in todo:
            emit({**event, "status": "resume" if resume else "start"})
            fit(cfg, run_dir, resume=resume, on_event=emit)
    else:
        _run_parallel(todo, jobs, emit)
    return write_results(out)


def extends_sweep(previous: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether the sweep spec ``current`` only adds grid values or seeds to ``previous``: the same
    base config and grid keys, and every earlier value and seed still in it.

    >>> old = {"base": {"a": 1}, "grid": {"loss.p": [0.3, 0.03]}, "seeds": [0]}
    >>> extends_sweep(old, {"base": {"a": 1}, "grid": {"loss.p": [0.3, 0.03, 0.003]}, "seeds": [0, 1]})
    True
    >>> extends_sweep(old, {"base": {"a": 1}, "grid": {"loss.p": [0.3]}, "seeds": [0]})
    False
    >>> extends_sweep(old, {"base": {"a": 2}, "grid": {"loss.p": [0.3, 0.03]}, "seeds": [0]})
    False
    """
    grid_old, grid_new = previous.get("grid"), current.get("grid")
    if previous.get("base") != current.get("base") or not isinstance(grid_old, dict) or not isinstance(grid_new, dict):
        return False
    if list(grid_old) != list(grid_new):  # the same keys in the same order: the same cell names
        return False
    if any(v not in grid_new[k] for k, values in grid_old.items() for v in values):
        return False
    return all(s in current.get("seeds", []) for s in previous.get("seeds", []))


def write_results(out_dir: str | Path) -> dict[str, Any]:
    """(Re)write ``results.{json,csv,md}`` of a finished sweep from its runs' ``summary.json``.

    Runs audited by ``lipmargin audit`` (an ``audit.json`` beside the summary) add an ``audit``
    entry per cell: how many of its runs were audited, their violations and their worst tightness.
    """
    out = Path(out_dir)
    spec = json.loads((out / "sweep.json").read_text())
    grid, seed_list = spec["grid"], spec["seeds"]
    base_cfg = config_from_dict(spec["base"])
    cells = []
    for params in expand_grid(grid):
        runs = [out / "cells" / cell_name(params) / f"seed-{s}" for s in seed_list]
        missing = [str(r) for r in runs if not (r / "summary.json").exists()]
        if missing:
            raise ConfigError(f"{out}: unfinished runs, re-run the sweep to finish them: {', '.join(missing)}")
        summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
        cell = {"params": params, "runs": [str(r.relative_to(out)) for r in runs], **aggregate(summaries)}
        audits = [json.loads((r / "audit.json").read_text()) for r in runs if (r / "audit.json").exists()]
        if audits:
            cell["audit"] = audit_summary(audits)
        cells.append(cell)
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


def audit_summary(audits: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the ``audit.json`` payloads of a cell's runs."""
    return {
        "runs": len(audits),
        "violations": sum(int(a["violations"]) for a in audits),
        "samples_per_run": min(int(a["num_samples"]) for a in audits),
        "bound_method": sorted({a["bound_method"] for a in audits}),
        "tightness_max": max(float(a["tightness"]) for a in audits),
        "attacks": sorted({x for a in audits for x in a["attacks"]}),
    }


def _run_parallel(
    todo: Sequence[tuple[dict[str, Any], RunConfig, Path, bool]], jobs: int, emit: Callable[[dict[str, Any]], None]
) -> None:
    """Train ``todo`` in ``jobs`` spawned worker processes; with several GPUs, worker k uses GPU k mod n.

    A run that fails does not stop the others; the failures are raised together at the end.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--jobs > 1 cannot be combined with torchrun; run the sweep with one process per node")
    ctx = mp.get_context("spawn")
    devices = _visible_gpus()
    slots = ctx.Queue()
    for k in range(jobs):
        slots.put(devices[k % len(devices)] if devices else None)
    from lipmargin.threads import auto_threads

    threads = max(1, auto_threads() // jobs)  # the cores free now, shared by the workers
    failures: list[str] = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init, initargs=(slots, threads)) as pool:
        futures = {}
        for event, cfg, run_dir, resume in todo:
            emit({**event, "status": "resume" if resume else "start"})
            futures[pool.submit(_worker_fit, cfg, str(run_dir), resume)] = event
        for future in as_completed(futures):
            event = futures[future]
            try:
                future.result()
            except Exception as e:  # noqa: BLE001 - reported with the run it belongs to
                failures.append(f"{event['run_dir']}: {type(e).__name__}: {e}")
                emit({**event, "status": "failed", "error": str(e)})
            else:
                emit({**event, "status": "finished"})
    if failures:
        raise SweepError(f"{len(failures)} of {len(todo)} runs failed: " + "; ".join(failures))


def _run_batched(
    todo: Sequence[tuple[dict[str, Any], RunConfig, Path, bool]], group_size: int | None, emit: Callable[[dict[str, Any]], None]
) -> None:
    """Train ``todo`` in batched groups; a group of one trains as a plain run."""
    from lipmargin.train import plan_groups, train_group

    groups = plan_groups([cfg for _, cfg, _, _ in todo], group_size)
    failures: list[str] = []
    for g, idx in enumerate(groups):
        for i in idx:
            event, _, _, resume = todo[i]
            emit({**event, "status": "resume" if resume else "start", "group": g + 1})
        if len(idx) == 1:
            _, cfg, run_dir, resume = todo[idx[0]]
            fit(cfg, run_dir, resume=resume)
            failed: list[str] = []
        else:
            failed = train_group([(todo[i][1], todo[i][2]) for i in idx], on_event=emit, group=(g + 1, len(groups)))
        failures += failed
        for i in idx:
            event = todo[i][0]
            bad = [f for f in failed if f.startswith(f"{event['run_dir']}:")]
            emit({**event, "status": "failed" if bad else "finished", "group": g + 1})
    if failures:
        raise SweepError(f"{len(failures)} of {len(todo)} runs failed: " + "; ".join(failures))


class SweepError(RuntimeError):
    """Some runs of a parallel sweep failed; the message names each."""


def _visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [d.strip() for d in listed.split(",") if d.strip()] if listed else []
    count = torch.cuda.device_count()
    return names[:count] if names else [str(i) for i in range(count)]


def _worker_init(slots: Any, threads: int) -> None:
    import torch

    device = slots.get()
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device  # before this process touches CUDA
    torch.set_num_threads(threads)


def _worker_fit(cfg: RunConfig, run_dir: str, resume: bool) -> None:
    fit(cfg, run_dir, resume=resume)


def results_csv(results: dict[str, Any]) -> str:
    keys = list(results["grid"])
    eps = results["eval_eps"]
    header = keys + ["n", "clean_mean", "clean_std"]
    for e in eps:
        header += [f"cra_{e}_mean", f"cra_{e}_std"]
    header += ["lipschitz_mean", "lipschitz_std", "audited_runs", "audit_violations"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for c in results["cells"]:
        row = [c["params"][k] for k in keys] + [c["n"], c["clean_accuracy"]["mean"], c["clean_accuracy"]["std"]]
        for e in eps:
            row += [c["certified_accuracy"][e]["mean"], c["certified_accuracy"][e]["std"]]
        row += [c["lipschitz"]["mean"], c["lipschitz"]["std"]]
        row += [c["audit"]["runs"], c["audit"]["violations"]] if "audit" in c else [0, ""]
        writer.writerow(row)
    return buf.getvalue()


def _pm(stat: dict[str, float], scale: float = 100.0, digits: int = 1) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def results_markdown(results: dict[str, Any]) -> str:
    from lipmargin.certify import radius_text

    keys = list(results["grid"])
    eps = results["eval_eps"]
    audited = any("audit" in c for c in results["cells"])
    head = keys + ["seeds", "clean %"] + [f"CRA@{radius_text(float(e))} %" for e in eps] + ["Lipschitz"] + (["audit violations"] if audited else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in results["cells"]:
        cols = [str(c["params"][k]) for k in keys] + [str(c["n"]), _pm(c["clean_accuracy"])]
        cols += [_pm(c["certified_accuracy"][e]) for e in eps]
        cols.append(f"{c['lipschitz']['mean']:.4g} ± {c['lipschitz']['std']:.2g}")
        if audited:
            a = c.get("audit")
            cols.append(f"{a['violations']} ({a['runs']}/{c['n']} runs, {a['samples_per_run']} samples each)" if a else "not audited")
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"
