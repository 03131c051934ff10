"""Peer comparison: deel-torchlip (HKR loss, orthogonal layers) vs lipmargin (CLL) on Fashion-MNIST.

Both are trained for the same number of epochs with the same batch size, then certified by the
same code: lipmargin's sound certifier (``certify(..., method="sound")``).  The peer's network is
not trusted to be 1-Lipschitz: its ``vanilla_export()`` is converted into a
:class:`lipmargin.LipschitzNet` made of plain ``nn.Conv2d`` / ``nn.Linear`` layers, whose operator
norms lipmargin bounds from the exported weights.

- deel-torchlip: the network, loss and optimiser of its Fashion-MNIST tutorial
  (``docs/notebooks/wasserstein_classification_fashionMNIST.ipynb``): SpectralConv2d(16) - GroupSort2
  - ScaledL2NormPool2d - SpectralConv2d(32) - GroupSort2 - ScaledL2NormPool2d - SpectralLinear(64)
  - GroupSort2 - FrobeniusLinear(10, disjoint_neurons=True), ``HKRMulticlassLoss(alpha=0.99,
  min_margin=0.25)`` (the tutorial's "robust" setting), Adam(lr=1e-3), no augmentation.
- lipmargin: 4C3F narrowed to a similar parameter count (``width=16, dense_width=56``), trained
  by ``lipmargin.train.fit`` with the ``fmnist-4c3f-cll`` preset (CLL, AdamW 1e-3, crop-2 augmentation).

Conversion of the exported peer network (checked: the converted net's logits equal the exported
net's):
- ``GroupSort2`` -> ``lipmargin.GroupSort(2)``.  Both sort consecutive channel pairs, but deel puts
  ``[min, max]`` and lipmargin ``[max, min]``; the swap is a permutation, absorbed exactly into the
  input columns of the next affine layer.
- ``LPPool2d(2)`` (the export of ``ScaledL2NormPool2d``) has no lipmargin rule.  This script
  registers one for a local subclass with the proven constant 1: each output is the L2 norm of its
  own window (a 1-Lipschitz map) and the windows are disjoint (stride = kernel).
- ``padding="same"`` (3x3, stride 1) becomes the equivalent explicit ``padding=1``.

    python benchmarks/peer_deel_torchlip.py [--epochs 2] [--batch-size 128] [--audit N] [--no-record]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from importlib import metadata

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _common import report
from lipmargin import GroupSort, LipschitzNet, certify, create_model, fit, load_config, load_run, model_bound
from lipmargin.data import DeviceLoader, load_dataset
from lipmargin.lipschitz import register_layer_rule
from lipmargin.models import MODELS, register_model

from deel import torchlip  # noqa: E402  (pip install --no-deps deel-torchlip)

EPS = (36 / 255, 72 / 255, 108 / 255, 0.5, 1.0)
EPS_NAMES = ("36/255", "72/255", "108/255", "0.5", "1.0")
LM_MODEL = "4C3F-peer"


# --------------------------------------------------------------------------------------------
# The peer's network and training loop (its tutorial's recipe)
# --------------------------------------------------------------------------------------------


def deel_model(pool: str, width_mult: int = 1) -> torchlip.Sequential:
    """The tutorial's network (``pool="l2"``) or its space-to-depth variant, channel / unit counts
    times ``width_mult`` (1: the tutorial's 16 / 32 / 64)."""
    w = width_mult
    if pool == "l2":  # the tutorial's choice
        down1: list[nn.Module] = [torchlip.ScaledL2NormPool2d(kernel_size=(2, 2))]
        down2: list[nn.Module] = [torchlip.ScaledL2NormPool2d(kernel_size=(2, 2))]
        c2_in, flat = 16 * w, 32 * w * 7 * 7
    else:  # InvertibleDownSampling: space-to-depth, keeps every value
        down1, down2 = [torchlip.InvertibleDownSampling(2)], [torchlip.InvertibleDownSampling(2)]
        c2_in, flat = 64 * w, 128 * w * 7 * 7
    return torchlip.Sequential(
        torchlip.SpectralConv2d(1, 16 * w, kernel_size=(3, 3), padding="same"),
        torchlip.GroupSort2(),
        *down1,
        torchlip.SpectralConv2d(c2_in, 32 * w, kernel_size=(3, 3), padding="same"),
        torchlip.GroupSort2(),
        *down2,
        nn.Flatten(),
        torchlip.SpectralLinear(flat, 64 * w),
        torchlip.GroupSort2(),
        torchlip.FrobeniusLinear(64 * w, 10, bias=True, disjoint_neurons=True),
        k_coef_lip=1.0,
    )


def train_deel(model: nn.Module, loader: DeviceLoader, epochs: int, alpha: float, min_margin: float) -> float:
    """The tutorial's loop (HKR on one-hot targets, Adam 1e-3); returns training seconds."""
    loss_fn = torchlip.HKRMulticlassLoss(alpha=alpha, min_margin=min_margin)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    seconds = 0.0
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        total, correct, n = 0.0, 0, 0
        for x, y in loader:
            output = model(x)
            loss = loss_fn(output, F.one_hot(y, num_classes=10))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * y.shape[0]
            correct += int((output.argmax(1) == y).sum())
            n += y.shape[0]
        seconds += time.perf_counter() - t0
        print(f"  deel epoch {epoch}: loss {total / n:.4f}, train acc {correct / n:.4f}, {seconds:.0f} s", flush=True)
    return seconds


# --------------------------------------------------------------------------------------------
# Conversion of the exported peer network into a LipschitzNet
# --------------------------------------------------------------------------------------------


class DisjointL2Pool2d(nn.LPPool2d):
    """``LPPool2d(norm_type=2)`` with stride = kernel: ``y_o = ||x_{window o}||_2``.

    Lipschitz constant 1 (proof): ``|y_o - y'_o| <= ||x_o - x'_o||`` (the triangle inequality of the
    norm) and the windows are disjoint, so ``sum_o (y_o - y'_o)^2 <= ||x - x'||^2``.
    """

    def __init__(self, kernel_size: tuple[int, int]) -> None:
        super().__init__(2, kernel_size, stride=kernel_size)


register_layer_rule(DisjointL2Pool2d, constant=lambda m: 1.0)


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)  # type: ignore[return-value]
    if conv.padding == "valid":
        return (0, 0)
    # "same": total padding dilation * (k - 1) per axis; torch puts an odd extra pixel on the
    # right, which a symmetric integer padding cannot express.
    if conv.stride != (1, 1) or any(d * (k - 1) % 2 for k, d in zip(conv.kernel_size, conv.dilation)):
        raise TypeError(f"cannot express padding='same' of {conv} as a symmetric integer padding")
    return tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))  # type: ignore[return-value]


def to_lipschitz_net(exported: nn.Sequential, in_shape: tuple[int, int, int]) -> LipschitzNet:
    """Rebuild a deel ``vanilla_export()`` as a LipschitzNet computing the same logits.

    ``perm`` tracks how the converted activations are ordered relative to the peer's:
    ``converted[:, i] == peer[:, perm[i]]``; the next affine layer takes ``W[:, perm]``.
    """
    layers = list(exported.children())
    feats: list[nn.Module] = []
    perm: Tensor | None = None
    x = torch.zeros(1, *in_shape)  # a probe in the peer's ordering, for shapes
    for i, m in enumerate(layers):
        last = i == len(layers) - 1
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros" or m.groups != 1:
                raise TypeError(f"unsupported convolution {m}")
            conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, _explicit_padding(m),
                             m.dilation, bias=m.bias is not None)
            w = m.weight.detach()
            conv.weight.data = (w[:, perm] if perm is not None else w).clone()
            if m.bias is not None:
                conv.bias.data = m.bias.detach().clone()
            feats.append(conv)
            perm = None
        elif isinstance(m, nn.Linear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            w = m.weight.detach()
            lin.weight.data = (w[:, perm] if perm is not None else w).clone()
            if m.bias is not None:
                lin.bias.data = m.bias.detach().clone()
            if last:
                x = m(x)
                break
            feats.append(lin)
            perm = None
        elif isinstance(m, torchlip.GroupSort):
            if m._coefficient_lip != 1.0:
                raise TypeError(f"GroupSort with k_coef_lip={m._coefficient_lip} is not converted")
            if perm is not None:
                raise TypeError("GroupSort on permuted channels is not converted")
            c = x.shape[1]
            g = c if m.group_size is None or m.group_size > c else m.group_size
            feats.append(GroupSort(g))
            # deel sorts ascending, lipmargin descending: reverse within each group.
            perm = torch.arange(c).view(c // g, g).flip(1).reshape(-1)
        elif isinstance(m, nn.LPPool2d):
            k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size, m.kernel_size)
            s = k if m.stride is None else (m.stride if isinstance(m.stride, tuple) else (m.stride, m.stride))
            if m.norm_type != 2 or tuple(s) != tuple(k) or m.ceil_mode:
                raise TypeError(f"no Lipschitz rule for {m} (only L2 pooling over disjoint windows)")
            feats.append(DisjointL2Pool2d(tuple(k)))  # channel-wise: perm carries through
        elif isinstance(m, nn.PixelUnshuffle):
            from lipmargin.nn import InvertibleDownsample  # only for --deel-pool invertible

            f = m.downscale_factor
            feats.append(InvertibleDownsample(f))
            if perm is not None:  # output channel c*f^2 + j comes from input channel c
                perm = (perm.view(-1, 1) * f * f + torch.arange(f * f)).reshape(-1)
        elif isinstance(m, nn.Flatten):
            feats.append(nn.Flatten())
            if perm is not None:  # flat index c*HW + p
                hw = x[0, 0].numel()
                perm = (perm.view(-1, 1) * hw + torch.arange(hw)).reshape(-1)
        else:
            raise TypeError(f"no lipmargin rule for the peer's layer {type(m).__name__} ({m})")
        x = m(x)
    else:
        raise TypeError("the exported network does not end with a linear layer")
    return LipschitzNet(nn.Sequential(*feats), lin, in_shape)


# --------------------------------------------------------------------------------------------
# Sanity checks on the sound bound
# --------------------------------------------------------------------------------------------


def empirical_checks(model: LipschitzNet, pairwise: Tensor, x: Tensor, seed: int = 0) -> dict[str, float]:
    """Lower estimates of the Lipschitz constants; each must stay <= the sound bound.

    - ``pair_ratio``: ``max_{i,j} |D_i - D_j| / ||a - b||`` with ``D = f(a) - f(b)``, over random
      pairs (test images vs. nearby points and vs. other test images), divided by the bound of
      the worst logit difference.
    - ``grad_ratio``: ``||grad (f_c - f_j)(x)|| / pairwise[c, j]`` for the prediction ``c`` and
      every other class ``j`` at test images (a gradient norm is a lower bound of the constant).
    """
    gen = torch.Generator().manual_seed(seed)
    m64 = copy.deepcopy(model).double().eval()
    x = x.double()
    lip = float(pairwise.max())
    with torch.no_grad():
        near = x + 1e-3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        far = x[torch.randperm(x.shape[0], generator=gen)]
        ratios = []
        for b in (near, far):
            d = m64(x) - m64(b)  # (B, C)
            dist = (x - b).flatten(1).norm(dim=1)
            ok = dist > 0
            ratios.append(((d.amax(1) - d.amin(1))[ok] / dist[ok]).max())
        pair = float(torch.stack(ratios).max()) / lip
    xg = x.clone().requires_grad_(True)
    logits = m64(xg)
    pred = logits.argmax(1)
    worst = 0.0
    for j in range(logits.shape[1]):
        diff = logits.gather(1, pred[:, None]).squeeze(1) - logits[:, j]  # (B,)
        (g,) = torch.autograd.grad(diff.sum(), xg, retain_graph=True)
        gnorm = g.flatten(1).norm(dim=1)
        bound = pairwise[pred, j]
        keep = (pred != j) & torch.isfinite(gnorm) & (bound > 0)
        if keep.any():
            worst = max(worst, float((gnorm[keep] / bound[keep]).max()))
    return {"pair_ratio": pair, "grad_ratio": worst}


def certify_row(model: LipschitzNet, test_batches: list[tuple[Tensor, Tensor]]) -> dict[str, object]:
    bound = model_bound(copy.deepcopy(model), "sound")
    res = certify(model, test_batches, list(EPS), bound=bound)
    return {
        "clean_accuracy": res.clean_accuracy,
        **{f"cra_{n}": res.certified_accuracy[e] for n, e in zip(EPS_NAMES, EPS)},
        "sound_lipschitz": bound.lipschitz,  # bound on max_{i,j} Lip(f_i - f_j)
        "sound_feature_lipschitz": bound.feature,
        "sound_per_layer": [round(v, 9) for v in bound.per_layer],
        "_bound": bound,
    }


def report_checks(checks: dict[str, float]) -> None:
    """Print the empirical / sound ratios and stop if either exceeds 1 (the bound would be wrong)."""
    print(f"  empirical / sound: random pairs {checks['pair_ratio']:.4f}, gradient norms {checks['grad_ratio']:.4f} (both must be <= 1)")
    if checks["pair_ratio"] > 1 or checks["grad_ratio"] > 1:
        raise SystemExit("an empirical ratio exceeds the sound bound: the bound is wrong")


def audit_row(model: LipschitzNet, bound: object, test_batches: list[tuple[Tensor, Tensor]], train: object, n: int) -> dict[str, object]:
    """`lipmargin audit` of the first ``n`` test images (PGD at every radius and at each own radius, LOBO)."""
    from lipmargin.certify.audit import audit_model
    from lipmargin.data import to_float

    x = torch.cat([b[0] for b in test_batches])[:n]
    y = torch.cat([b[1] for b in test_batches])[:n]
    lobo = to_float(train.inputs[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:200]])
    res = audit_model(model.cpu(), x.cpu(), y.cpu(), list(EPS), lobo_inputs=lobo, bound=bound, pgd_steps=20,
                      pgd_restarts=2, lobo_pairs=100, lobo_steps=50, clamp=(0.0, 1.0))
    return {"audit_samples": res.num_samples, "audit_violations": res.violations, "audit_tightness": res.tightness}


def figure(name: str, r: dict[str, object], extra: str = "") -> str:
    cra = ", ".join(f"{n} {r[f'cra_{n}']:.3f}" for n in EPS_NAMES)
    return (
        f"{name}: clean {r['clean_accuracy']:.3f}; sound CRA {cra}; sound Lip(f_i-f_j) {r['sound_lipschitz']:.3f}"
        f"{extra}; {r['num_parameters']} params, {r['epochs']} ep x batch {r['batch_size']}, "
        f"train {r['train_seconds']:.0f} s"
        + (f"; audit ({r['audit_samples']} test images): violations {r['audit_violations']}, tightness {r['audit_tightness']:.3f}"
           if "audit_violations" in r else "")
    )


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--alpha", type=float, default=0.99, help="HKR alpha (tutorial's robust setting)")
    ap.add_argument("--min-margin", type=float, default=0.25, help="HKR min_margin (tutorial's robust setting)")
    ap.add_argument("--deel-pool", default="l2", choices=["l2", "invertible"])
    ap.add_argument("--lm-width", type=int, default=16)
    ap.add_argument("--lm-dense", type=int, default=56)
    ap.add_argument("--train-subset", type=int, default=0, help="first N training images only (smoke runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", choices=["deel", "lipmargin"], default=None)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--audit", type=int, default=0, help="also audit the certificates of the first N test images (0: no audit)")
    args = ap.parse_args()
    device = torch.device(args.device)
    deel_version = metadata.version("deel-torchlip")
    print(f"deel-torchlip {deel_version}, torch {torch.__version__}, device {device}", flush=True)

    train = load_dataset("fashion-mnist", None, "train")
    if args.train_subset:
        train = train.subset(torch.arange(args.train_subset))
    test = load_dataset("fashion-mnist", None, "test")
    in_shape = tuple(train.input_shape)
    test_batches = [(x.cpu(), y.cpu()) for x, y in DeviceLoader(test, 1000)]
    x_check = test_batches[0][0][:256]

    # GroupSort conventions, checked on random input.
    z = torch.randn(4, 8, 3, 3)
    swap = torch.arange(8).view(4, 2).flip(1).reshape(-1)
    same = torch.equal(torchlip.GroupSort2()(z), GroupSort(2)(z))
    swapped = torch.equal(GroupSort(2)(z), torchlip.GroupSort2()(z)[:, swap])
    print(f"GroupSort2 (deel) == GroupSort(2) (lipmargin): {same}; equal after swapping each pair: {swapped}")
    if not swapped:
        raise SystemExit("GroupSort pairing differs from the assumed convention; conversion would be wrong")

    rows = []
    if args.skip != "deel":
        torch.manual_seed(args.seed)
        net = deel_model(args.deel_pool).to(device)
        n_params = sum(p.numel() for p in net.parameters())
        print(f"deel-torchlip model: {n_params} parameters; training {args.epochs} epochs", flush=True)
        loader = DeviceLoader(train, args.batch_size, device=device, shuffle=True, seed=args.seed)
        secs = train_deel(net, loader, args.epochs, args.alpha, args.min_margin)
        net.eval()
        exported = net.vanilla_export().cpu().eval()
        converted = to_lipschitz_net(exported, in_shape)
        exported64 = copy.deepcopy(exported).double()
        with torch.no_grad():
            ref = exported64(x_check.double())
            got = copy.deepcopy(converted).double()(x_check.double())
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
        print(f"  converted LipschitzNet reproduces the exported logits (max |diff| {float((got - ref).abs().max()):.1e})")
        r = certify_row(converted, test_batches)
        bound = r.pop("_bound")
        # The peer's own certificate (tutorial): (top1 - top2) / 2, from feature Lip 1 and unit head rows.
        with torch.no_grad():
            logits = torch.cat([exported64(x.double()) for x, _ in test_batches])  # (N, C)
        top, pred = logits.topk(2, dim=1).values, logits.argmax(1)
        target = torch.cat([y for _, y in test_batches])
        claimed_radius = (top[:, 0] - top[:, 1]) / 2
        claimed_cra = {n: float(((claimed_radius > e) & (pred == target)).float().mean()) for n, e in zip(EPS_NAMES, EPS)}
        head_rows = converted.head.weight.detach().double().norm(dim=1)
        checks = empirical_checks(converted, bound.pairwise, x_check)
        print(f"  sound per-layer bounds: {r['sound_per_layer']}")
        print(f"  sound feature bound {bound.feature:.6f} (claimed 1); head row norms {head_rows.min():.6f}..{head_rows.max():.6f} (claimed 1)")
        report_checks(checks)
        r.update(
            model=f"deel-torchlip {deel_version} ({args.deel_pool} pool)",
            loss=f"HKRMulticlassLoss(alpha={args.alpha}, min_margin={args.min_margin})",
            num_parameters=n_params, epochs=args.epochs, batch_size=args.batch_size, train_seconds=secs,
            claimed_feature_lipschitz=1.0, claimed_pairwise_lipschitz=2.0,
            peer_certificate_cra=claimed_cra, head_row_norm_max=float(head_rows.max()),
            empirical_pair_ratio=checks["pair_ratio"], empirical_grad_ratio=checks["grad_ratio"],
        )
        extra = (f" (feature {bound.feature:.4f}, claimed 1); peer's own (top1-top2)/2 CRA "
                 + ", ".join(f"{n} {claimed_cra[n]:.3f}" for n in EPS_NAMES))
        if args.audit:
            r.update(audit_row(converted, bound, test_batches, train, args.audit))
        rows.append(("deel-torchlip HKR", r, extra))

    if args.skip != "lipmargin":
        if LM_MODEL not in MODELS:
            @register_model(LM_MODEL, f"4C3F with width {args.lm_width}, dense {args.lm_dense} (peer-sized)")
            def _peer_4c3f(in_shape: tuple[int, ...], num_classes: int) -> LipschitzNet:
                return create_model("4C3F", in_shape, num_classes, width=args.lm_width, dense_width=args.lm_dense)

        cfg = load_config(preset="fmnist-4c3f-cll", overrides=[
            f"model.name={LM_MODEL}", f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
            f"train.seed={args.seed}", f"train.device={args.device}", f"eval.eps={list(EPS)}",
        ])
        if args.train_subset:
            raise SystemExit("--train-subset applies to the deel run only (fit loads the full dataset); use --skip lipmargin")
        with tempfile.TemporaryDirectory() as out:
            print(f"lipmargin {LM_MODEL}: training {args.epochs} epochs with fit()", flush=True)
            summary = fit(cfg, out, on_event=lambda e: print(
                f"  lipmargin epoch {e['epoch']}: loss {e['train_loss']:.4f}, train acc {e['train_accuracy']:.4f}, "
                f"{e['seconds']:.0f} s", flush=True) if e.get("event") == "epoch" else None)
            _, model, _ = load_run(out)
        r = certify_row(model, test_batches)
        bound = r.pop("_bound")
        checks = empirical_checks(model, bound.pairwise, x_check)
        print(f"  sound per-layer bounds: {r['sound_per_layer']}")
        report_checks(checks)
        r.update(
            model=f"lipmargin {LM_MODEL} (width {args.lm_width}, dense {args.lm_dense})",
            loss="CLL (fmnist-4c3f-cll preset)", num_parameters=summary["num_parameters"],
            epochs=args.epochs, batch_size=args.batch_size, train_seconds=summary["train_seconds"],
            empirical_pair_ratio=checks["pair_ratio"], empirical_grad_ratio=checks["grad_ratio"],
        )
        if args.audit:
            r.update(audit_row(model, bound, test_batches, train, args.audit))
        rows.append(("lipmargin CLL", r, ""))

    for name, r, extra in rows:
        report("peer_deel_torchlip", {"name": name, **r}, figure(name, r, extra), record=not args.no_record)


if __name__ == "__main__":
    main()
