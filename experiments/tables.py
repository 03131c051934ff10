"""Print the markdown tables of docs/results.md from the summaries committed under docs/results/.

    python experiments/tables.py [docs/results]

Every number comes from a sweep's results.json (mean ± sample std over seeds) or from a run's
summary.json / audit.json; nothing is typed in by hand.
"""

from __future__ import annotations

import json
import math
import sys
import statistics
from pathlib import Path

from lipmargin.losses import cll_sigma

RADII = ["0.141177", "0.282353", "0.423529", "0.5", "1"]
RADII_LABEL = ["36/255", "72/255", "108/255", "0.5", "1.0"]


# The paper's two-moons CRA at eps 0.15 per slack p (its slack-sweep figure).
PAPER_MOONS_CRA = {0.75: 90.2, 0.25: 98.8, 0.01: 99.7, 0.0001: 99.9}

def load(path: Path) -> dict:
    return json.loads(path.read_text())


def pm(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def audit_text(cell: dict) -> str:
    a = cell.get("audit")
    if not a:
        return "**not audited**"
    return f"{a['violations']} ({a['runs']}/{cell['n']} runs × {a['samples_per_run']})"


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fmnist(root: Path) -> None:
    # "GPU" / "CPU" in the setting column: where each sweep ran (docs/results.md, Machines); the
    # sweep folders do not record it.
    choice = load(root / "p_choice.json")
    pval = load(root / "pval" / "results.json")
    rows = []
    for c in pval["cells"]:
        eps, p = c["params"]["loss.eps"], c["params"]["loss.p"]
        key = choice[str(eps)]["radius"]
        chosen = "**chosen**" if choice[str(eps)]["p"] == p else ""
        rows.append([str(eps), str(p), pm(c["clean_accuracy"]), f"{key}: {pm(c['certified_accuracy'][key])}",
                     f"{c['lipschitz']['mean']:.1f}", chosen])
    print("### Validation sweep for CLL's p (54,000 train / 6,000 held-out validation images, 1 seed)\n")
    print(table(["train eps", "p", "val clean %", "val CRA % at radius", "K (sound)", ""], rows))
    print()
    cells = {
        0.15: [("CLL", load(root / "cll-eps0.15" / "results.json")["cells"][0], f"p {choice['0.15']['p']}; GPU")],
        0.5: [("CLL", load(root / "cll-eps0.5" / "results.json")["cells"][0], f"p {choice['0.5']['p']}; GPU")],
    }
    gloro = load(root / "gloro" / "results.json")["cells"]
    ce = load(root / "ce" / "results.json")["cells"][0]
    for c in gloro:
        cells[c["params"]["loss.eps"]].append(("GloRo", c, "annealed eps; CPU"))
    for eps in cells:
        cells[eps].append(("CE + λK²", ce, "λ 1e-3, no eps; GPU"))
    # CLL on 1-Lipschitz backbones (same recipe, the 4C3F's chosen p), when those sweeps exist.
    for sweep in sorted(root.glob("*-cll-eps*")):
        if sweep.name.startswith("cll-"):
            continue
        model, eps = sweep.name.split("-cll-eps")
        cell = load(sweep / "results.json")["cells"][0]
        cells[float(eps)].append((f"CLL on {model}", cell, f"p {choice[eps]['p']}; CPU"))
    for eps, entries in cells.items():
        print(f"### Trained at eps {eps} (test set, 10,000 images, sound bounds; mean ± std over 3 seeds)\n")
        rows = []
        for name, c, note in entries:
            rows.append([name, note, pm(c["clean_accuracy"])] + [pm(c["certified_accuracy"][r]) for r in RADII]
                        + [f"{c['lipschitz']['mean']:.1f} ± {c['lipschitz']['std']:.1f}", audit_text(c)])
        a, b = entries[0][1], entries[1][1]
        diff = ["**CLL − GloRo** (4C3F)", "difference of means ± √(s₁²+s₂²)"]
        for get in [lambda c: c["clean_accuracy"]] + [lambda c, r=r: c["certified_accuracy"][r] for r in RADII]:
            sa, sb = get(a), get(b)
            diff.append(f"{(sa['mean'] - sb['mean']) * 100:+.1f} ± {math.hypot(sa['std'], sb['std']) * 100:.1f}")
        rows.append(diff + ["", ""])
        print(table(["loss", "setting", "clean %"] + [f"CRA@{r} %" for r in RADII_LABEL] + ["K (sound)", "audit violations"], rows))
        print()


def _run_cell(runs: list[Path]) -> dict | None:
    """A sweep-style cell (mean ± std, audit totals) of finished run folders outside a sweep (HKR)."""
    from lipmargin.sweep import aggregate, audit_summary

    done = [r for r in runs if (r / "summary.json").is_file()]
    if not done:
        return None
    cell = aggregate([load(r / "summary.json") for r in done])
    audits = [load(r / "audit.json") for r in done if (r / "audit.json").is_file()]
    if audits:
        cell["audit"] = audit_summary(audits)
    return cell


def _sweep_cells(path: Path) -> list[dict]:
    """The cells of a sweep folder over the runs finished so far (a cell without one is left out);
    ``n`` says how many seeds each has."""
    from lipmargin.sweep import cell_name, expand_grid

    if not (path / "sweep.json").is_file():
        return []
    spec = load(path / "sweep.json")
    cells = []
    for params in expand_grid(spec["grid"]):
        cell = _run_cell([path / "cells" / cell_name(params) / f"seed-{s}" for s in spec["seeds"]])
        if cell is not None:
            cells.append({"params": params, **cell})
    return cells


def fmnist_converged(root: Path) -> None:
    """Issue 19's Fashion-MNIST comparison: every loss at one budget, CLL's p and HKR's alpha /
    margin chosen on a held-out split, 3 seeds, and CLL minus the best baseline at each eps."""
    budget = load(root / "budget.json")
    choice = load(root / "p_choice.json")
    rows = []
    for c in _sweep_cells(root / "pval"):
        eps, p = c["params"]["loss.eps"], c["params"]["loss.p"]
        key = choice[str(eps)]["radius"]
        rows.append(["CLL", str(eps), f"p {p}", f"{c['clean_accuracy']['mean'] * 100:.1f}", f"{c['certified_accuracy'][key]['mean'] * 100:.1f}",
                     f"{c['lipschitz']['mean']:.1f}", "**chosen**" if choice[str(eps)]["p"] == p else ""])
    hkr_choice = load(root / "hkr_choice.json") if (root / "hkr_choice.json").is_file() else {}
    print(f"### CLL validation runs ({budget['val_text']}; 1 seed; CRA at the radius nearest the training eps)\n")
    print(table(["loss", "train eps", "setting", "val clean %", "val CRA %", "K (sound)", ""], rows))
    print()
    # HKR has no eps of its own: each (alpha, margin) run competes for both training eps.
    rows = []
    runs = [r for r in (root / "hkr-val").glob("eps*/seed-0") if (r / "summary.json").is_file()]
    for s in sorted((load(r / "summary.json") for r in runs), key=lambda s: (-s["params"]["alpha"], s["params"]["margin"])):
        a, m = s["params"]["alpha"], s["params"]["margin"]
        chosen = [eps for eps, c in sorted(hkr_choice.items()) if (c["alpha"], c["margin"]) == (a, m)]
        rows.append([f"{a}", f"{m}", f"{s['clean_accuracy'] * 100:.1f}", f"{s['certified_accuracy']['0.141177'] * 100:.1f}",
                     f"{s['certified_accuracy']['0.5'] * 100:.1f}", f"{s['lipschitz']:.2f}",
                     " ".join(f"**chosen for eps {eps}**" for eps in chosen)])
    if rows:
        print("### HKR validation runs (deel-torchlip's network; the same split and budget; 1 seed)\n")
        print(table(["alpha", "min_margin", "val clean %", "val CRA@36/255 %", "val CRA@0.5 %", "K (sound)", ""], rows))
        print()
    gloro = {c["params"]["loss.eps"]: c for c in _sweep_cells(root / "gloro")}
    authors = {c["params"]["loss.eps"]: c for c in _sweep_cells(root / "gloro-authors")}
    # Each of the authors' two gradient variants alone (fmnist_main.sh gloro-variants).
    variants = {name: {c["params"]["loss.eps"]: c for c in _sweep_cells(root / f"gloro-{name}")} for name in ("head", "unrolled")}
    ce = _sweep_cells(root / "ce")
    for eps, key in ((0.15, "0.141177"), (0.5, "0.5")):
        # name, setting, cell, is a baseline, the folder holding its seed-N runs
        entries: list[tuple[str, str, dict | None, bool, str]] = []
        cll = _sweep_cells(root / f"cll-eps{eps}")
        entries.append(("CLL", f"p {choice[str(eps)]['p']}", cll[0] if cll else None, False, f"cll-eps{eps}/cells/base"))
        entries.append(("GloRo", "annealed eps; lipmargin's gradients", gloro.get(eps), True, f"gloro/cells/loss.eps={eps}"))
        entries.append(("GloRo", "annealed eps; authors' gradients", authors.get(eps), True, f"gloro-authors/cells/loss.eps={eps}"))
        for name, text in (("head", "head gradient only"), ("unrolled", "power-iteration gradient only")):
            entries.append(("GloRo", f"annealed eps; {text}", variants[name].get(eps), True, f"gloro-{name}/cells/loss.eps={eps}"))
        hkr = _run_cell(sorted((root / f"hkr-eps{eps}").glob("seed-*")))
        hc = hkr_choice.get(str(eps), {})
        entries.append(("HKR (deel-torchlip)", f"alpha {hc.get('alpha')}, margin {hc.get('margin')}; tutorial net", hkr, True,
                        f"hkr-eps{eps}"))
        entries.append(("CE + λK²", "λ 1e-3, no eps", ce[0] if ce else None, True, "ce/cells/base"))
        for sweep in sorted(root.glob(f"*-cll-eps{eps}")):
            if not sweep.name.startswith("cll-") and _sweep_cells(sweep):
                entries.append((f"CLL on {sweep.name.split('-cll-eps')[0]}", f"p {choice[str(eps)]['p']}", _sweep_cells(sweep)[0], False,
                                f"{sweep.name}/cells/base"))
        rows = []
        for name, setting, c, _, _ in entries:
            if c is None:
                rows.append([name, setting, "not run yet"] + [""] * (len(RADII) + 3))
                continue
            # One seed has no spread: its row shows the value alone.
            fmt = pm if c["n"] > 1 else (lambda s: f"{s['mean'] * 100:.1f}")
            k = f"{c['lipschitz']['mean']:.3g} ± {c['lipschitz']['std']:.2g}" if c["n"] > 1 else f"{c['lipschitz']['mean']:.3g}"
            rows.append([name, setting, fmt(c["clean_accuracy"])] + [fmt(c["certified_accuracy"][r]) for r in RADII]
                        + [k, f"{c['n']}", audit_text(c)])
        # The best baseline is picked among cells with all 3 seeds (a one-seed ablation row has no spread).
        baselines = [(name, setting, c) for name, setting, c, base, _ in entries if base and c is not None and c["n"] >= 3]
        if entries[0][2] is not None and baselines:
            name, setting, best = max(baselines, key=lambda e: e[2]["certified_accuracy"][key]["mean"])
            diff = _diff_row(f"**CLL − best baseline** ({name}, {setting})", entries[0][2], best)
            rows.append(diff[:1] + [""] + diff[1:] + ["", "", ""])
        print(f"### Trained at eps {eps} ({budget['final_text']}; mean ± std over seeds)\n")
        print(table(["loss", "setting", "clean %"] + [f"CRA@{r} %" for r in RADII_LABEL] + ["K (sound)", "seeds", "audit violations"], rows))
        print()
        rows = []
        for name, setting, _, _, folder in entries:
            row = _audit_row(root / folder, float(key))
            if row:
                rows.append([name, setting.split("; ")[-1]] + row)
        if rows:
            print(f"### Audit of the eps-{eps} finals (`lipmargin audit` at {key}: PGD-L2 + AutoAttack's APGD-CE / APGD-T, "
                  "and every certified image at its own radius; LOBO for K from below)\n")
            print(table(["loss", "setting", "runs audited", "images per run", "CRA on them %", "robust under attack %",
                         "attack − certified (points)", "violations", "LOBO lower / K (max)"], rows))
            print()


def _ms(values: list[float]) -> str:
    """``mean ± sample std`` of percentages; one value alone, with no spread."""
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def _audit_row(cell: Path, radius: float) -> list[str] | None:
    """The audits at ``radius`` of the finished runs under ``cell`` (seed-N folders): certified and
    attacked accuracy on the audited images, their gap, the violations and the worst LOBO tightness."""
    audits = []
    for run in sorted(cell.glob("seed-*")):
        if run.name[5:].isdigit() and (run / "audit.json").is_file():
            a = load(run / "audit.json")
            labels = [k for k in a["certified_accuracy"] if abs(float(k) - radius) < 5e-6]
            if labels:
                audits.append((a, labels[0]))
    if not audits:
        return None
    cert = [a["certified_accuracy"][k] * 100 for a, k in audits]
    robust = [a["empirical_robust_accuracy"][k] * 100 for a, k in audits]
    gap = [r - c for r, c in zip(robust, cert)]
    attacks = sorted({x for a, _ in audits for x in a["attacks"]})
    return [f"{len(audits)} ({', '.join(attacks)})", f"{min(a['num_samples'] for a, _ in audits)}", _ms(cert), _ms(robust), _ms(gap),
            f"{sum(int(a['violations']) for a, _ in audits)}", f"{max(float(a['tightness']) for a, _ in audits):.2f}"]


def moons(root: Path) -> None:
    paper_k = {0.75: 3.4, 0.25: 13.0, 0.01: 35.3, 0.0001: 66.0}
    rows = []
    for c in load(root / "results.json")["cells"]:
        p = c["params"]["loss.p"]
        rows.append([str(p), f"{1 / cll_sigma(0.15, p):.1f}", f"{paper_k[p]}",
                     f"{c['lipschitz']['mean']:.0f} ± {c['lipschitz']['std']:.0f}", pm(c["clean_accuracy"]),
                     pm(c["certified_accuracy"]["0.15"]), f"{PAPER_MOONS_CRA[p]}", audit_text(c)])
    print("### Two moons, CLL eps 0.15 (20,000 test points; mean ± std over 3 seeds)\n")
    print(table(["p", "1/σ (calibrated K)", "paper K^(h∘f)", "trained K of f (sound)", "clean %", "CRA@0.15 %",
                 "paper CRA %", "audit violations"], rows))
    print()


def moons_authors(root: Path) -> None:
    """The moons-slack preset (the authors' recipe) against the paper's CRA, with the difference."""
    rows = []
    for c in load(root / "results.json")["cells"]:
        p, cra = c["params"]["loss.p"], c["certified_accuracy"]["0.15"]
        rows.append([str(p), pm(c["clean_accuracy"]), pm(cra), f"{PAPER_MOONS_CRA[p]}", f"{cra['mean'] * 100 - PAPER_MOONS_CRA[p]:+.1f}",
                     f"{c['lipschitz']['mean']:.0f} ± {c['lipschitz']['std']:.0f}", audit_text(c)])
    print("### Two moons, preset moons-slack (authors' recipe; 20,000 test points; mean ± std over 3 seeds)\n")
    print(table(["p", "clean %", "CRA@0.15 % (sound)", "paper CRA %", "difference", "trained K of f (sound)", "audit violations"], rows))
    print()


def moons_seeds(roots: list[Path], p: float = 0.75) -> None:
    """Every seed of one moons-slack cell, across sweeps (the preset's 3 and any more), with its audit."""
    runs = sorted(((load(s), s.parent) for root in roots for s in (root / "cells" / f"loss.p={p:g}").glob("seed-*/summary.json")),
                  key=lambda r: r[0]["seed"])
    rows = []
    for summary, run in runs:
        audit = run / "audit.json"
        a = load(audit) if audit.is_file() else None
        rows.append([str(summary["seed"]), f"{summary['clean_accuracy'] * 100:.1f}",
                     f"{summary['certified_accuracy']['0.15'] * 100:.1f}", f"{summary['lipschitz']:.0f}",
                     f"{a['violations']} ({a['num_samples']})" if a else "**not audited**"])
    cra = _ms([s["certified_accuracy"]["0.15"] * 100 for s, _ in runs])
    print(f"### Two moons, preset moons-slack, p {p:g}: every seed ({len(runs)}; CRA@0.15 {cra}, paper {PAPER_MOONS_CRA[p]})\n")
    print(table(["seed", "clean %", "CRA@0.15 % (sound)", "trained K of f (sound)", "audit violations (points)"], rows))
    print()


def _diff_row(label: str, a: dict, b: dict) -> list[str]:
    """``a - b`` per column: difference of means ± sqrt(s_a^2 + s_b^2)."""
    row = [label]
    for get in [lambda c: c["clean_accuracy"]] + [lambda c, r=r: c["certified_accuracy"][r] for r in RADII]:
        sa, sb = get(a), get(b)
        row.append(f"{(sa['mean'] - sb['mean']) * 100:+.1f} ± {math.hypot(sa['std'], sb['std']) * 100:.1f}")
    return row


def digits_validation(roots: list[Path], choice: dict) -> None:
    """The validation sweeps (20 % of the training set held out) behind the digits choices."""
    rows = []
    for root in roots:
        res = load(root / "results.json")
        base = res.get("base", {})
        for c in res["cells"]:
            params = dict(c["params"])
            name = "CLL" if "loss.p" in params else "GloRo"
            if name == "GloRo":
                variant = "authors' gradients" if "authors" in root.name else "lipmargin default"
                setting = f"eps annealed: {str(params['loss.eps_anneal']).lower()}; {variant}"
            else:
                setting = f"p {params['loss.p']}"
            rows.append([name, setting, pm(c["clean_accuracy"]), pm(c["certified_accuracy"]["0.5"]), pm(c["certified_accuracy"]["0.141177"]),
                         f"{c['lipschitz']['mean']:.1f}"])
    print("### Digits validation sweeps (1,150 train / 287 held-out validation images; mean ± std over 3 seeds)\n")
    print(table(["loss", "setting", "val clean %", "val CRA@0.5 %", "val CRA@36/255 %", "K (sound)"], rows))
    print()
    variant = {"plain": "lipmargin's default gradients", "authors": "the authors' gradients"}[choice["gloro"]["variant"]]
    print(f"Chosen by validation CRA at 0.5: CLL p {choice['cll']['p']}; GloRo with eps annealed "
          f"{str(choice['gloro']['eps_anneal']).lower()} and {variant}.\n")


def digits(cll: Path, gloro: Path, cll_label: str = "CLL (p 0.01)", gloro_label: str = "GloRo") -> None:
    rows = []
    cells = []
    for name, root in ((cll_label, cll), (gloro_label, gloro)):
        c = load(root / "results.json")["cells"][0]
        cells.append(c)
        rows.append([name, pm(c["clean_accuracy"])] + [pm(c["certified_accuracy"][r]) for r in RADII]
                    + [f"{c['lipschitz']['mean']:.1f} ± {c['lipschitz']['std']:.1f}", audit_text(c)])
    rows.append(_diff_row("**CLL − GloRo**", cells[0], cells[1]) + ["", ""])
    print("### Digits (8x8, 2C2F, eps 0.5, 60 epochs, float64; 360 test images; mean ± std over 3 seeds)\n")
    print(table(["loss", "clean %"] + [f"CRA@{r} %" for r in RADII_LABEL] + ["K (sound)", "audit violations"], rows))
    print()


def backbones(root: Path) -> None:
    rows = []
    for run in sorted(d for d in root.iterdir() if d.is_dir()):
        s = load(run / "summary.json")
        audit = run / "audit.json"
        a = load(audit) if audit.is_file() else None
        rows.append([run.name, f"{s['num_parameters']:,}", f"{s['clean_accuracy'] * 100:.1f}",
                     f"{s['certified_accuracy']['0.141177'] * 100:.1f}", f"{s['lipschitz']:.3g}",
                     f"{a['violations']} ({a['num_samples']} images, tightness {a['tightness']:.2f})" if a else "**not audited**"])
    print("### Every registered model, one epoch on Fashion-MNIST\n")
    print(table(["model", "parameters", "clean %", "CRA@36/255 %", "K (sound)", "audit violations"], rows))
    print()


def peer(root: Path) -> None:
    """The deel-torchlip comparison: one JSON line per model in each ``*.jsonl`` under ``root``."""
    for path in sorted(root.glob("*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        rows = []
        for r in records:
            audit = (f"{r['audit_violations']} ({r['audit_samples']} images)" if "audit_violations" in r
                     else "**not audited**")
            rows.append([r["name"], f"{r['num_parameters']:,}", f"{r['clean_accuracy'] * 100:.1f}"]
                        + [f"{r[f'cra_{label}'] * 100:.1f}" for label in RADII_LABEL]
                        + [f"{r['sound_lipschitz']:.3g}", f"{r['train_seconds']:.0f}", audit])
        first = records[0]
        print(f"### Peer: deel-torchlip ({path.stem}; {first['epochs']} epochs, batch {first['batch_size']}; {first['machine']})\n")
        print(table(["model", "parameters", "clean %"] + [f"CRA@{label} %" for label in RADII_LABEL]
                    + ["sound max Lip(f_i − f_j)", "train s", "audit violations"], rows))
        print()

def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results")
    fmnist(root / "fmnist")
    if (root / "fmnist-25ep" / "budget.json").is_file():
        fmnist_converged(root / "fmnist-25ep")
    if (root / "moons-slack-authors" / "results.json").is_file():
        moons_authors(root / "moons-slack-authors")
        more = root / "moons-slack-authors-p0.75-seeds3-12"
        if more.is_dir():
            moons_seeds([root / "moons-slack-authors", more])
    moons(root / "moons-slack")
    digits(root / "digits-cll", root / "digits-gloro")
    tuned = root / "digits-tuned"
    if (tuned / "choice.json").is_file():
        choice = load(tuned / "choice.json")
        digits_validation(sorted(d for d in tuned.glob("*-val*") if d.is_dir()), choice)
        digits(tuned / "cll", tuned / "gloro", f"CLL (p {choice['cll']['p']}, validated)",
               "GloRo (validated: annealed eps, default gradients)" if choice["gloro"]["variant"] == "plain" and choice["gloro"]["eps_anneal"]
               else f"GloRo (validated: {choice['gloro']})")
    backbones(root / "backbones-1epoch")
    if (root / "peer").is_dir():
        peer(root / "peer")


if __name__ == "__main__":
    main()
