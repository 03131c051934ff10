"""MLPs with MaxMin activations: the two-moons net of the paper and a generic one."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lipmargin.models._registry import register_variant
from lipmargin.models.lipnet import LipschitzNet, _init
from lipmargin.nn import MaxMin

__all__ = ["MLPS", "mlp"]

#: name -> (description, default widths, whether ``widths`` is an option).
MLPS: dict[str, tuple[str, tuple[int, ...], bool]] = {
    "moons-mlp": ("two-moons MLP 2-10-20-40-40-20-10-2 with MaxMin", (10, 20, 40, 40, 20, 10), False),
    "mlp": ("MLP with MaxMin; option widths (default 256, 256)", (256, 256), True),
}


def mlp(input_shape: Sequence[int], num_classes: int, *, widths: Sequence[int]) -> LipschitzNet:
    """Flatten, then ``nn.Linear`` + MaxMin per entry of ``widths`` (even), then the linear head.

    >>> net = mlp((2,), 2, widths=(4, 6))
    >>> [type(m).__name__ for m in net.features]
    ['Linear', 'MaxMin', 'Linear', 'MaxMin']
    """
    d = 1
    for s in input_shape:
        d *= int(s)
    layers: list[nn.Module] = [nn.Flatten()] if len(input_shape) > 1 else []
    for out in widths:
        if int(out) % 2:
            raise ValueError(f"MLP widths must be even for MaxMin; got {list(widths)}")
        layers += [nn.Linear(d, int(out)), MaxMin()]
        d = int(out)
    features = nn.Sequential(*layers)
    head = nn.Linear(d, num_classes)
    _init(features)
    _init(head)
    return LipschitzNet(features, head, input_shape)


for _name, (_description, _widths, _free) in MLPS.items():
    if _free:
        register_variant(_name, _description, mlp, defaults={"widths": _widths})
    else:
        register_variant(_name, _description, mlp, defaults={}, fixed={"widths": _widths})
