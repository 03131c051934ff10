"""``lipmargin presets``, ``models``, ``datasets``: one registered name and its description a line."""

from __future__ import annotations

import argparse

from lipmargin.cli.common import command, no_args


def _print_listing(rows: dict[str, str]) -> None:
    width = max(len(n) for n in rows)
    for name, text in rows.items():
        print(f"{name:<{width}}  {text}")


@command("presets", "list the named presets", no_args)
def _presets(args: argparse.Namespace) -> int:
    from lipmargin.config import list_presets, preset_description

    _print_listing({name: preset_description(name) for name in list_presets()})
    return 0


@command("models", "list the registered models", no_args)
def _models(args: argparse.Namespace) -> int:
    from lipmargin.models import MODELS

    _print_listing({name: MODELS[name].description for name in sorted(MODELS)})
    return 0


@command("datasets", "list the registered datasets", no_args)
def _datasets(args: argparse.Namespace) -> int:
    from lipmargin.data import DATASETS

    _print_listing({
        name: spec.description + (f" (default root {spec.default_root})" if spec.default_root else "")
        for name, spec in sorted(DATASETS.items())
    })
    return 0
