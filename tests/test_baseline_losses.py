"""Baseline losses against hand computations, and each trains through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lipmargin import CertRegLoss, HKRLoss, LMTLoss, cert_reg_loss, hkr_loss, lmt_loss
from lipmargin.cli import main

LOGITS = torch.tensor([[2.0, 1.0, -0.5]], dtype=torch.float64)
TARGET = torch.tensor([0])
BOUND = torch.tensor([[0.0, 2 * math.sqrt(2), 2 * math.sqrt(5)]], dtype=torch.float64)  # K=2, METHOD's W


def test_lmt_adds_eps_times_bound_to_non_target_logits() -> None:
    z = torch.tensor([[2.0, 1.0 + 0.1 * 2 * math.sqrt(2), -0.5 + 0.1 * 2 * math.sqrt(5)]], dtype=torch.float64)
    expected = F.cross_entropy(z, TARGET)
    torch.testing.assert_close(lmt_loss(LOGITS, TARGET, BOUND, 0.1), expected)
    torch.testing.assert_close(LMTLoss(0.1)(LOGITS, TARGET, BOUND), expected)
    # eps -> 0 recovers plain cross entropy
    torch.testing.assert_close(lmt_loss(LOGITS, TARGET, BOUND, 1e-12), F.cross_entropy(LOGITS, TARGET))


def test_hkr_hand_value() -> None:
    # hinge: relu(0.5 - 2) + relu(0.5 + 1) + relu(0.5 - 0.5) = 1.5; KR: 2 - (1 - 0.5)/2 = 1.75
    assert float(hkr_loss(LOGITS, TARGET, alpha=10.0, min_margin=1.0)) == pytest.approx(10 * 1.5 - 1.75)
    assert float(HKRLoss(2.0, 1.0)(LOGITS, TARGET)) == pytest.approx(2 * 1.5 - 1.75)


def test_cert_reg_subtracts_the_certified_radius() -> None:
    radius = min(1.0 / (2 * math.sqrt(2)), 2.5 / (2 * math.sqrt(5)))
    expected = F.cross_entropy(LOGITS, TARGET) - 0.5 * radius
    torch.testing.assert_close(cert_reg_loss(LOGITS, TARGET, BOUND, 0.5), expected)
    torch.testing.assert_close(CertRegLoss(0.5)(LOGITS, TARGET, BOUND), expected)
    # a misclassified sample gets no reward (relu of a negative radius)
    wrong = torch.tensor([1])
    torch.testing.assert_close(cert_reg_loss(LOGITS, wrong, BOUND, 0.5), F.cross_entropy(LOGITS, wrong))


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="eps"):
        lmt_loss(LOGITS, TARGET, BOUND, 0.0)
    with pytest.raises(ValueError, match="min_margin"):
        hkr_loss(LOGITS, TARGET, min_margin=0.0)
    with pytest.raises(ValueError, match="gamma"):
        cert_reg_loss(LOGITS, TARGET, BOUND, -1.0)
    with pytest.raises(ValueError, match="reduction"):
        hkr_loss(LOGITS, TARGET, reduction="avg")


@pytest.mark.parametrize("name", ["lmt", "hkr", "ce-cr"])
def test_each_baseline_trains_from_the_cli(name: str, tmp_path, capsys) -> None:
    out = tmp_path / name
    rc = main(["train", "--preset", "moons-cll", "--set", f"loss.name={name}", "--set", "train.epochs=2",
               "--set", "train.batch_size=500", "--out", str(out), "--quiet"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss"] == name and 0 <= summary["certified_accuracy"]["0.15"] <= summary["clean_accuracy"]
