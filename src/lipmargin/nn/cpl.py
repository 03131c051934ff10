"""CPL: convex potential layers (Meunier et al., ICML 2022).

Soundness: ``x -> x - h W^T relu(W x + b)`` has ``J = I - h W^T D W`` (``D`` a ReLU derivative
in ``[0, 1]``, Clarke's generalised Jacobian included), symmetric with eigenvalues in
``[1 - h ||W||^2, 1]``, so ``||J|| <= max(1, h b^2 - 1)`` for any ``b >= ||W||``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipmargin.lipschitz import no_autocast, operator_norm_estimate, power_iteration, register_layer_rule
from lipmargin.lipschitz import conv2d_norm_bound, linear_norm_bound
from lipmargin.nn._common import _check_odd, _check_positive, _max_one, _unit_estimate, f64

__all__ = ["cpl_step_size", "CPLLinear", "CPLConv2d"]


def cpl_step_size(sigma: Tensor, safety: float) -> Tensor:
    """CPL step ``h = 2 / (safety * sigma)^2`` for a norm estimate ``sigma`` of ``W``.

    The layer is 1-Lipschitz iff ``h <= 2 / ||W||^2``, i.e. iff ``||W|| <= safety * sigma``.  The
    power iteration gives ``sigma <= ||W||``; ``safety > 1`` absorbs most of its residual error in
    training, and eval mode raises ``safety * sigma`` to a sound bound of ``||W||`` when needed.
    """
    sigma = sigma.clamp_min(torch.finfo(sigma.dtype).tiny)
    return 2.0 / (safety * sigma) ** 2


class _ConvexPotential(nn.Module):
    """Shared machinery of the CPL layers: the step size ``h`` and its persistent power iteration.

    Training mode (the paper's scheme): each forward advances the unit vector ``u`` (a buffer in
    input space) by ``power_iters`` steps under ``no_grad`` and uses ``sigma = ||W u|| / ||u||``
    (``u`` detached: differentiable in ``W``, an estimate from below) in
    ``h = cpl_step_size(sigma, safety)``.

    Eval mode: the same, without advancing ``u``, except that ``safety * sigma`` is raised to a
    *sound* bound ``b >= ||W||`` (:func:`~lipmargin.lipschitz.conv2d_norm_bound` /
    :func:`~lipmargin.lipschitz.linear_norm_bound`) when it is below it.  A power iteration on a
    convolution converges slowly (its top singular values cluster) and lags one optimiser step
    behind ``W``, so ``sigma`` can be a few per cent low; the clamp makes the eval-mode layer
    (the function that certificates describe) provably 1-Lipschitz, and changes nothing while the
    estimate is good.  ``b`` is cached per version of the weight, so repeated evaluation is cheap.

    Why no estimate can make a certificate false: the sound bound of the layer is not assumed to
    be 1, it is ``max(1, h b^2 - 1)`` computed from the ``h`` the eval-mode layer actually uses
    (read through the same cache) and a freshly computed sound ``b``; a stale cache can only make
    it larger than 1, never wrong.
    """

    u: Tensor
    weight: nn.Parameter
    safety: float
    power_iters: int

    def _init_cpl(self, name: str, safety: float, power_iters: int, init_iters: int, u: Tensor) -> None:
        if not safety >= 1.0:
            raise ValueError(f"{name}: safety must be >= 1, got {safety}")
        if power_iters < 0 or init_iters < 0:
            raise ValueError(f"{name}: power_iters and init_iters must be >= 0, got {power_iters}, {init_iters}")
        self.safety, self.power_iters = float(safety), int(power_iters)
        self.register_buffer("u", u / u.norm())
        self._bound_cache: tuple[tuple, float] | None = None
        self._advance(init_iters)

    def _apply_w(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def _apply_wt(self, y: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def _weight_norm_bound(self) -> float:
        """A sound bound on ``||W||`` as an operator on the layer's inputs."""
        raise NotImplementedError

    def _operator(self, weight: Tensor) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
        """``(W, W^T)`` as functions for the power iteration of :mod:`lipmargin.lipschitz`."""
        return (lambda x: self._apply_w(x, weight)), (lambda y: self._apply_wt(y, weight))

    @torch.no_grad()
    def _advance(self, n_iter: int) -> None:
        forward, adjoint = self._operator(self.weight.detach())
        self.u.copy_(power_iteration(forward, adjoint, self.u, n_iter))

    def weight_norm_bound(self) -> float:
        """``b >= ||W||``, cached per (storage, version, dtype, device) of the weight."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, str(w.device), tuple(w.shape))
        if self._bound_cache is None or self._bound_cache[0] != key:
            self._bound_cache = (key, self._weight_norm_bound())
        return self._bound_cache[1]

    def sigma_estimate(self, dtype: torch.dtype | None = None) -> Tensor:
        """``||W u|| / ||u||`` for the stored ``u`` (differentiable in ``W``; in ``dtype`` if given)."""
        w = self.weight if dtype is None else self.weight.to(dtype)
        u = self.u.detach() if dtype is None else self.u.detach().to(dtype)
        return operator_norm_estimate(self._operator(w)[0], u)

    def step_size(self, dtype: torch.dtype | None = None, *, eval_mode: bool | None = None) -> Tensor:
        """The step ``h`` the forward pass uses (in the current mode unless ``eval_mode`` is given).

        Computed in ``dtype`` if given: the sound bound evaluates the eval-mode step in float64,
        the same operations a float64 copy of the layer runs.
        """
        sigma = self.sigma_estimate(dtype)
        if (not self.training) if eval_mode is None else eval_mode:
            # Round b up by a few ulps of the working precision so the clamp never falls below it.
            b = self.weight_norm_bound() * (1.0 + 4.0 * torch.finfo(sigma.dtype).eps)
            sigma = torch.maximum(sigma, torch.full_like(sigma, b / self.safety))
        return cpl_step_size(sigma, self.safety)

    def _forward_step(self) -> Tensor:
        with no_autocast(self.weight):
            if self.training and self.power_iters > 0:
                self._advance(self.power_iters)
            return self.step_size()


class CPLLinear(_ConvexPotential):
    """Convex Potential Layer, dense (Meunier et al., ICML 2022): ``x - h W^T relu(W x + b)``.

    ``W`` is ``(inner_features, features)``; the layer maps ``features -> features``.  ``h`` comes
    from :func:`cpl_step_size` with a persistent power iteration (``power_iters`` steps per
    training forward, ``init_iters`` at construction); in eval mode it is clamped by a sound norm
    bound.  See :class:`_ConvexPotential` for why the estimate cannot break a certificate.

    >>> import torch
    >>> from lipmargin.lipschitz import operator_norm_bound
    >>> layer = CPLLinear(4, 6).eval()
    >>> layer(torch.randn(2, 4)).shape
    torch.Size([2, 4])
    >>> operator_norm_bound(layer, (4,)) <= 1 + 1e-6
    True
    """

    def __init__(
        self,
        features: int,
        inner_features: int,
        bias: bool = True,
        *,
        safety: float = 1.01,
        power_iters: int = 1,
        init_iters: int = 50,
    ) -> None:
        super().__init__()
        self.features = _check_positive(features, "features", "CPLLinear")
        self.inner_features = _check_positive(inner_features, "inner_features", "CPLLinear")
        self.weight = nn.Parameter(torch.empty(self.inner_features, self.features))
        self.bias = nn.Parameter(torch.empty(self.inner_features)) if bias else None
        # torch's nn.Linear initialisation, as in the reference code.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.features)
            nn.init.uniform_(self.bias, -bound, bound)
        self._init_cpl("CPLLinear", safety, power_iters, init_iters, torch.randn(self.features))

    def _apply_w(self, x: Tensor, weight: Tensor) -> Tensor:
        return x @ weight.t()

    def _apply_wt(self, y: Tensor, weight: Tensor) -> Tensor:
        return y @ weight

    def _weight_norm_bound(self) -> float:
        return linear_norm_bound(self.weight.detach())

    def forward(self, x: Tensor) -> Tensor:
        h = self._forward_step()
        return x - h * (F.relu(F.linear(x, self.weight, self.bias)) @ self.weight)

    def extra_repr(self) -> str:
        return f"features={self.features}, inner_features={self.inner_features}, safety={self.safety}"


class CPLConv2d(_ConvexPotential):
    """Convex Potential Layer, convolutional (Meunier et al., ICML 2022).

    ``x - h C^T relu(C x + b)`` with ``C`` the stride-1 'same' convolution ``channels ->
    inner_channels`` and ``C^T`` its exact adjoint (``conv_transpose2d`` with the same padding).
    The power-iteration vector has the shape of one input image, so ``input_size`` (H, W) is fixed
    at construction.  See :class:`_ConvexPotential` for the step size and its soundness.
    """

    def __init__(
        self,
        channels: int,
        inner_channels: int,
        input_size: Sequence[int],
        kernel_size: int = 3,
        bias: bool = True,
        *,
        safety: float = 1.01,
        power_iters: int = 1,
        init_iters: int = 50,
    ) -> None:
        super().__init__()
        self.channels = _check_positive(channels, "channels", "CPLConv2d")
        self.inner_channels = _check_positive(inner_channels, "inner_channels", "CPLConv2d")
        self.kernel_size = _check_odd(kernel_size, "CPLConv2d")
        self.padding = self.kernel_size // 2
        if len(input_size) != 2 or min(int(s) for s in input_size) < 1:
            raise ValueError(f"CPLConv2d: input_size must be (H, W) with H, W >= 1, got {tuple(input_size)}")
        self.input_size = (int(input_size[0]), int(input_size[1]))
        k = self.kernel_size
        self.weight = nn.Parameter(torch.empty(self.inner_channels, self.channels, k, k))
        self.bias = nn.Parameter(torch.empty(self.inner_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.channels * k * k)
            nn.init.uniform_(self.bias, -bound, bound)
        self._init_cpl("CPLConv2d", safety, power_iters, init_iters, torch.randn(1, self.channels, *self.input_size))

    def _apply_w(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, padding=self.padding)

    def _apply_wt(self, y: Tensor, weight: Tensor) -> Tensor:
        return F.conv_transpose2d(y, weight, padding=self.padding)

    def _weight_norm_bound(self) -> float:
        return conv2d_norm_bound(self.weight.detach(), (self.channels, *self.input_size), padding=self.padding)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(
                f"CPLConv2d was built for {self.input_size} images (its power-iteration vector has that "
                f"shape), got input of shape {tuple(x.shape)}"
            )
        h = self._forward_step()
        z = F.relu(F.conv2d(x, self.weight, self.bias, padding=self.padding))
        return x - h * F.conv_transpose2d(z, self.weight, padding=self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, inner_channels={self.inner_channels}, kernel_size={self.kernel_size}, "
            f"input_size={self.input_size}, safety={self.safety}"
        )


def _cpl_linear_bound(m: nn.Module, input_shape: tuple[int, ...]) -> float:
    h = float(m.step_size(f64, eval_mode=True).detach())  # type: ignore[operator]
    b = linear_norm_bound(m.weight.detach())  # type: ignore[arg-type]
    return _max_one(h * b * b - 1.0)


def _cpl_conv_bound(m: nn.Module, input_shape: tuple[int, ...]) -> float:
    h = float(m.step_size(f64, eval_mode=True).detach())  # type: ignore[operator]
    b = conv2d_norm_bound(m.weight.detach(), tuple(input_shape), padding=m.padding)  # type: ignore[arg-type]
    return _max_one(h * b * b - 1.0)


register_layer_rule(CPLLinear, estimate=_unit_estimate, bound=_cpl_linear_bound)
register_layer_rule(CPLConv2d, estimate=_unit_estimate, bound=_cpl_conv_bound)
