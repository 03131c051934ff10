"""Which torch thread count is fastest on a shared CPU: torch's default, one thread, or lipmargin's rule.

For each rule, a fresh worker process sets its threads, then times a digits epoch (the
``digits-cll`` preset that ``make demo`` trains: 2C2F, float64, batch 64) and a ``certify`` of the
digits test split with the sound bound.  It does so on the machine as it is ("idle": whatever
else runs is recorded) and again with ``--busy`` extra processes spinning ``while 1: pass``
(started and killed here).  Rules:

- ``default``: torch's own choice (one thread per core of the affinity mask),
- ``one``: one thread,
- ``auto``: :func:`lipmargin.threads.auto_threads` (the cores no other process is running on),
  evaluated in the worker right before it starts, as the CLI does.

    python benchmarks/threads.py [--busy 2] [--repeat 3] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = ("default", "one", "auto")


def worker(rule: str, repeat: int) -> dict:
    """Run in a fresh process: set the threads by ``rule``, time the workloads, return the numbers."""
    import torch

    from lipmargin.certify import certify, model_bound
    from lipmargin.config import load_config
    from lipmargin.threads import auto_threads, read_cpu_load
    from lipmargin.train import TRAIN_LOSSES, TrainStep, build_model, build_optimizer, eval_batches, load_run_data, train_one_epoch
    from lipmargin.data import DeviceLoader

    load = read_cpu_load()
    if rule == "one":
        torch.set_num_threads(1)
    elif rule == "auto":
        torch.set_num_threads(auto_threads())
    threads = torch.get_num_threads()

    cfg = load_config(None, preset="digits-cll")
    data = load_run_data(cfg)
    model = build_model(cfg, data.train.input_shape, data.train.num_classes).double()
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    loss = TRAIN_LOSSES[cfg.loss.name](cfg.loss)
    step = TrainStep(model, cfg.train.power_iters, cfg.train.precision)
    loader = DeviceLoader(data.train, cfg.train.batch_size, device=torch.device("cpu"), shuffle=True, seed=0)

    epochs = []
    for epoch in range(1, repeat + 2):  # the first is a warm-up
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        train_one_epoch(model, loader, optimizer, loss, epoch, len(loader), epochs=cfg.train.epochs,
                        batch_size=cfg.train.batch_size, penalty=cfg.loss.lipschitz_penalty,
                        penalty_power=cfg.loss.penalty_power, step_module=step)
        epochs.append(time.perf_counter() - t0)
    certs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        certify(model, eval_batches(data.eval, cfg.eval.batch_size, torch.device("cpu")), cfg.eval.eps,
                bound=model_bound(model, "sound"))
        certs.append(time.perf_counter() - t0)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"rule": rule, "threads": threads, "cpus": load.cpus, "runnable_at_start": load.runnable,
            "load1_at_start": load.load1, "epoch_s": median(epochs[1:]), "certify_s": median(certs)}


def _run_worker(rule: str, repeat: int, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", rule, "--repeat", str(repeat)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"rule": rule, "timeout_s": timeout}
    if proc.returncode != 0:
        raise RuntimeError(f"worker {rule} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _background() -> str:
    from lipmargin.threads import read_cpu_load

    load = read_cpu_load(samples=9, interval=0.05)
    others = "?" if load.runnable is None else f"{load.runnable - 1:g}"
    return f"{load.cpus} cpus, {others} other runnable tasks, loadavg1 {load.load1:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--busy", type=int, default=2, help="extra spinning processes for the loaded case")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per worker before it counts as too slow")
    ap.add_argument("--only", choices=["idle", "loaded"], help="measure only one of the two cases")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--worker", choices=RULES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeat)))
        return

    sys.path.insert(0, str(HERE.parent / "src"))
    from _common import report

    cases = [c for c in ("idle", "loaded") if args.only in (None, c)]
    for case in cases:
        busy: list[subprocess.Popen] = []
        if case == "loaded":
            busy = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(args.busy)]
            time.sleep(1.0)  # let them be counted as runnable
        try:
            observed = _background()
            rows = [_run_worker(rule, args.repeat, args.timeout) for rule in RULES]
        finally:
            for p in busy:
                p.kill()
                p.wait()
        for r in rows:
            if "timeout_s" in r:
                figure = (f"{case} (+{len(busy)} busy; observed {observed}): rule {r['rule']} did not finish "
                          f"within {r['timeout_s']:.0f} s")
            else:
                figure = (f"{case} (+{len(busy)} busy; observed {observed}): rule {r['rule']} -> {r['threads']} threads: "
                          f"digits epoch {r['epoch_s']:.2f} s, certify {r['certify_s']:.2f} s")
            report("threads", {"case": case, "busy": len(busy), "observed": observed, **r}, figure, record=not args.no_record)


if __name__ == "__main__":
    main()
