"""Radii are shown as the field writes them (36/255) with the float next to them; JSON keys keep
their numeric form (issue 17 item 7)."""

from __future__ import annotations

import json

import pytest

from lipmargin.certify import radius_text
from lipmargin.cli import main
from lipmargin.train import eps_key


@pytest.mark.parametrize("k", [1, 8, 36, 72, 108, 127, 200, 254])
def test_multiples_of_one_over_255_read_as_such_also_from_json_keys(k: int) -> None:
    eps = k / 255
    for value in (eps, float(eps_key(eps))):  # the 6-digit key a summary.json holds
        text = radius_text(value)
        assert text.startswith(f"{k}/255 (") and text.endswith(")")
        assert float(text[text.index("(") + 1 : -1]) == pytest.approx(eps, rel=1e-3)


@pytest.mark.parametrize("eps, text", [(0.5, "0.5"), (0.15, "0.15"), (1.0, "1"), (0.3, "0.3"), (0.1234567, "0.123457")])
def test_other_radii_stay_plain_numbers(eps: float, text: str) -> None:
    assert radius_text(eps) == text


def test_certify_prints_36_over_255_and_keeps_the_json_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certify", "pretrained:digits-2c2f-cll", "--eps", "36/255,0.5"]) == 0
    out = capsys.readouterr().out
    assert "certified accuracy @ 36/255 (0.1412)" in out and "certified accuracy @ 0.5 " in out
    assert main(["certify", "pretrained:digits-2c2f-cll", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert list(payload["certified_accuracy"]) == ["0.141177", "0.282353", "0.423529", "0.5", "1"]


def test_eps_36_over_0_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certify", "pretrained:digits-2c2f-cll", "--eps", "36/0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "36/0" in err[0]
