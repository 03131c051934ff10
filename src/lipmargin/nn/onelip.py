"""1-Lipschitz layer families: AOL, CPL, SLL, SOC, the HouseHolder activation, 1-Lipschitz reshaping.

Every layer registers a :class:`~lipmargin.lipschitz.LayerRule` with

- ``estimate``: a constant 1 (a scalar tensor on the layer's device and dtype).  Each family is
  1-Lipschitz by construction (SOC up to its truncated series), so training needs no estimate.
- ``bound(module, in_shape)``: a number provably >= the Lipschitz constant of the layer's *actual*
  effective operator, computed from its parameters and buffers with the sound norm bounds of
  :mod:`lipmargin.lipschitz.bounds`; never assumed to be 1.  It is computed in float64 from the stored values,
  exactly as the float64 copy that :func:`lipmargin.certify.certify` evaluates computes them.

What a bound describes: the layer's **eval-mode** function with its current parameters and buffers
(certificates evaluate models in eval mode).  CPL and SOC scale their weights with a persistent power
iteration, as in their papers; a training-mode forward first advances it (changing the function
slightly) and SOC then sums fewer series terms.  In eval mode both cap that scale with a sound norm
bound (cached per weight version), so that a lagging estimate cannot make the certified function
expansive; the cap is inactive while the estimate is good.

Soundness arguments, one per family (``J`` is the Jacobian; a continuous, piecewise-smooth map is
``L``-Lipschitz when ``||J|| <= L`` wherever ``J`` exists, including Clarke's generalised Jacobians
with ReLU derivatives ``D`` anywhere in ``[0, 1]``):

- AOL: the layer is linear plus bias; the bound is the sound operator norm of the rescaled weight.
- CPL: ``x -> x - h W^T relu(W x + b)`` has ``J = I - h W^T D W``, symmetric with eigenvalues in
  ``[1 - h ||W||^2, 1]``, so ``||J|| <= max(1, h b^2 - 1)`` for any ``b >= ||W||``.
- SLL: ``x -> x - 2 W^T T^{-1} relu(W x + b)`` has ``J = I - 2 W^T (T^{-1} D) W``, symmetric with
  eigenvalues in ``[1 - 2 ||T^{-1/2} W||^2, 1]``, so ``||J|| <= max(1, 2 n^2 - 1)`` for any
  ``n >= ||T^{-1/2} W||`` (the SLL theorem gives ``||T^{-1/2} W|| <= 1``; we compute ``n``).
- SOC: with the exactly skew-symmetric ``A``, ``exp(A)`` is orthogonal, so the truncated series
  obeys ``||S_T(A)|| <= 1 + sum_{k > T} a^k / k!`` for any ``a >= ||A||``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipmargin.lipschitz import ROUNDING_MARGIN, conv2d_norm_bound, linear_norm_bound, no_autocast, register_layer_rule

__all__ = [
    "aol_linear_scale",
    "aol_conv_scale",
    "sll_linear_scale",
    "sll_conv_scale",
    "cpl_step_size",
    "skew_kernel",
    "conv_matrix",
    "exp_series_tail_bound",
    "soc_bound_from_norm",
    "AOLLinear",
    "AOLConv2d",
    "CPLLinear",
    "CPLConv2d",
    "SLLLinear",
    "SLLConv2d",
    "SOCConv2d",
    "HouseHolder",
    "InvertibleDownsample",
    "ChannelPad",
    "ZeroPadding",
    "ScaledAvgPool2d",
]

f64 = torch.float64


# --------------------------------------------------------------------------------------------
# Pure functions: one formula each
# --------------------------------------------------------------------------------------------


def _safe_rsqrt(x: Tensor) -> Tensor:
    """``x^{-1/2}`` where ``x > 0`` and 0 elsewhere (an all-zero row or column stays zero).

    The clamp keeps the unused branch finite, so ``torch.where`` never sees an ``inf`` whose
    gradient would turn into NaN.
    """
    return torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).rsqrt(), torch.zeros_like(x))


def _safe_reciprocal(x: Tensor) -> Tensor:
    return torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).reciprocal(), torch.zeros_like(x))


def _conv_gram(kernel: Tensor) -> Tensor:
    """All-shift Gram of a conv kernel over its output channels: ``(C_out, C_out, 2k-1, 2k-1)``.

    Entry ``[a, b, s]`` is ``sum_{i, p} K[a, i, p + s] K[b, i, p]``: the kernel of ``C C^T`` for the
    convolution ``C`` on an unbounded (or large enough) image.
    """
    kh, kw = kernel.shape[-2:]
    return F.conv2d(kernel, kernel, padding=(kh - 1, kw - 1))


def aol_linear_scale(weight: Tensor) -> Tensor:
    """AOL column scales ``d_i = (sum_j |W^T W|_ij)^{-1/2}`` for a ``(out, in)`` weight; ``(in,)``.

    ``W diag(d)`` has spectral norm <= 1 (Prach & Lampert 2022, Theorem 1: ``diag(d)^{-2}``
    dominates ``W^T W`` by Gershgorin's theorem).
    """
    gram = weight.t() @ weight  # (in, in)
    return _safe_rsqrt(gram.abs().sum(1))


def aol_conv_scale(kernel: Tensor) -> Tensor:
    """AOL input-channel scales for a conv kernel ``(C_out, C_in, k, k)``; ``(C_in,)``.

    ``P^T P`` of the convolution is the convolution of the kernel with itself (all shifts), so
    ``d_i = (sum_{j, s} |(K^T * K)_{ij}(s)|)^{-1/2}``.  With zero padding the true conv is a
    restriction of the full (unbounded) one, whose Gram rows sum to at most these values, so the
    rescaled zero-padded conv also has norm <= 1.
    """
    gram = _conv_gram(kernel.transpose(0, 1))  # (C_in, C_in, 2k-1, 2k-1)
    return _safe_rsqrt(gram.abs().sum((1, 2, 3)))


def _sll_t(gram_abs: Tensor, q: Tensor) -> Tensor:
    """``t_a = sum_b |G|_ab q_b / q_a`` with ``q = exp(q_param)``; ``gram_abs`` is ``(m, m)``.

    For a convolution ``|G|_ab`` is already summed over all shifts.  ``T - G`` is positive
    semi-definite: ``|x_a x_b| <= (x_a^2 q_b/q_a + x_b^2 q_a/q_b) / 2`` summed against ``|G|``.
    """
    w = torch.exp(q)  # (m,) positive weights
    return (gram_abs * w[None, :]).sum(1) / w


def sll_linear_scale(weight: Tensor, q: Tensor) -> Tensor:
    """SLL ``T^{-1}`` (diagonal, ``(inner,)``) for a ``(inner, features)`` weight and log-weights ``q``.

    ``T = diag(sum_b |W W^T|_ab q_b / q_a)`` dominates ``W W^T`` (Araujo et al. 2023, Theorem 3),
    so ``x - 2 W^T T^{-1} relu(W x + b)`` is 1-Lipschitz.  Rows with ``T_aa = 0`` are zero rows of
    ``W`` and get 0.
    """
    gram = weight @ weight.t()  # (inner, inner)
    return _safe_reciprocal(_sll_t(gram.abs(), q))


def sll_conv_scale(kernel: Tensor, q: Tensor) -> Tensor:
    """SLL ``T^{-1}`` over the inner channels of a conv kernel ``(inner, C, k, k)``; ``(inner,)``.

    The Gram over all shifts dominates the Gram of the zero-padded transposed convolution (which
    is the full one followed by a restriction), so the theorem carries over.
    """
    gram = _conv_gram(kernel).abs().sum((2, 3))  # (inner, inner)
    return _safe_reciprocal(_sll_t(gram, q))


def cpl_step_size(sigma: Tensor, safety: float) -> Tensor:
    """CPL step ``h = 2 / (safety * sigma)^2`` for a norm estimate ``sigma`` of ``W``.

    The layer is 1-Lipschitz iff ``h <= 2 / ||W||^2``, i.e. iff ``||W|| <= safety * sigma``.  The
    power iteration gives ``sigma <= ||W||``; ``safety > 1`` absorbs most of its residual error in
    training, and eval mode raises ``safety * sigma`` to a sound bound of ``||W||`` when needed.
    """
    sigma = sigma.clamp_min(torch.finfo(sigma.dtype).tiny)
    return 2.0 / (safety * sigma) ** 2


def skew_kernel(kernel: Tensor) -> Tensor:
    """``K - flip(K)^T``: the kernel of ``C - C^T`` for a stride-1 'same' conv ``C`` (odd kernels).

    The transposed convolution with padding ``k // 2`` is the convolution with the kernel
    transposed in its channels and flipped in space; the difference of two IEEE numbers is exactly
    the negative of the reversed difference, so the result is exactly skew-symmetric.
    """
    return kernel - kernel.transpose(0, 1).flip(2, 3)


def exp_series_tail_bound(a: float, terms: int) -> float:
    """An upper bound on ``sum_{k > terms} a^k / k!`` for ``a >= 0`` (``inf`` when it gives none).

    With ``n = terms + 1``: ``a^(n+j) / (n+j)! <= (a^n / n!) (a / (n+1))^j``, a geometric series
    that converges for ``a < n + 1``.  The result is inflated far above float64 rounding.
    """
    if a < 0 or math.isnan(a) or terms < 0:
        raise ValueError(f"exp_series_tail_bound needs a >= 0 and terms >= 0, got a={a}, terms={terms}")
    if a == 0:
        return 0.0
    n = terms + 1
    ratio = a / (n + 1)
    if ratio >= 1 or math.isinf(a):
        return math.inf
    try:
        first = a**n / math.factorial(n)
    except OverflowError:
        return math.inf
    return first / (1.0 - ratio) * (1.0 + 1e-12)


def conv_matrix(kernel: Tensor, size: tuple[int, int], padding: int) -> Tensor:
    """The stride-1 zero-padded ``conv2d`` with ``kernel`` on ``(C_in, H, W)`` inputs as a matrix.

    Shape ``(C_out*H_out*W_out, C_in*H*W)``, rows and columns in ``reshape`` order, so that
    ``conv2d(x, kernel, padding=padding).flatten(1) == x.flatten(1) @ M.T``.  Entry
    ``[(o, p), (i, q)]`` is ``kernel[o, i, q - p + padding]`` where that tap exists, else 0.
    Differentiable in ``kernel``; meant for small images (its size is ``(C H W)^2``).
    """
    co, ci, kh, kw = kernel.shape
    h, w = size
    ho, wo = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    dev = kernel.device
    th = torch.arange(h, device=dev)[None, :] - torch.arange(ho, device=dev)[:, None] + padding  # (Ho, H)
    tw = torch.arange(w, device=dev)[None, :] - torch.arange(wo, device=dev)[:, None] + padding  # (Wo, W)
    ok_h, ok_w = (th >= 0) & (th < kh), (tw >= 0) & (tw < kw)
    ih = th.clamp(0, kh - 1)[:, None, :, None].expand(ho, wo, h, w)  # (Ho, Wo, H, W)
    iw = tw.clamp(0, kw - 1)[None, :, None, :].expand(ho, wo, h, w)
    valid = (ok_h[:, None, :, None] & ok_w[None, :, None, :]).to(kernel.dtype)  # (Ho, Wo, H, W)
    taps = kernel[:, :, ih, iw] * valid  # (Co, Ci, Ho, Wo, H, W)
    return taps.permute(0, 2, 3, 1, 4, 5).reshape(co * ho * wo, ci * h * w)


def _renormalize(new: Tensor, old: Tensor) -> Tensor:
    """``new / ||new||``, or ``old`` when ``new`` is zero (a dead layer); no host-device sync."""
    norm = new.norm()
    return torch.where(norm > 0, new / norm.clamp_min(torch.finfo(new.dtype).tiny), old)


def _unit_estimate(m: nn.Module) -> Tensor:
    """A constant 1 on the layer's device and dtype (the training estimate of a 1-Lipschitz layer)."""
    p = next(m.parameters())
    return torch.ones((), dtype=p.dtype, device=p.device)


def _check_odd(kernel_size: int, name: str) -> int:
    k = int(kernel_size)
    if k < 1 or k % 2 == 0:
        raise ValueError(f"{name}: kernel_size must be odd and >= 1 ('same' padding), got {kernel_size}")
    return k


def _check_positive(value: int, what: str, name: str) -> int:
    v = int(value)
    if v < 1:
        raise ValueError(f"{name}: {what} must be >= 1, got {value}")
    return v


def _max_one(value: float) -> float:
    """``max(1, value)`` with a relative margin for the float64 arithmetic before and inside the layer.

    The margin also covers the float64 rounding of the layer's own forward pass (a map that is
    exactly 1-Lipschitz in real arithmetic measures ``1 + 1e-16`` in float64).
    """
    return max(1.0, value) * (1.0 + ROUNDING_MARGIN)


# --------------------------------------------------------------------------------------------
# AOL: almost-orthogonal layers
# --------------------------------------------------------------------------------------------


class AOLLinear(nn.Module):
    """Almost-Orthogonal Lipschitz linear layer (Prach & Lampert, ECCV 2022).

    ``y = W diag(d) x + b`` with ``d = aol_linear_scale(W)``: spectral norm <= 1 for every ``W``.
    Initialised orthogonal, so that ``d = 1`` and the layer starts exactly orthogonal.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = _check_positive(in_features, "in_features", "AOLLinear")
        self.out_features = _check_positive(out_features, "out_features", "AOLLinear")
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None
        nn.init.orthogonal_(self.weight)

    def effective_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """``W diag(d)``, the weight the forward pass applies (in ``dtype`` if given)."""
        w = self.weight if dtype is None else self.weight.to(dtype)
        return w * aol_linear_scale(w)[None, :]

    def forward(self, x: Tensor) -> Tensor:
        with no_autocast(self.weight):
            w = self.effective_weight()
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class AOLConv2d(nn.Module):
    """Almost-Orthogonal Lipschitz convolution (Prach & Lampert, ECCV 2022): stride 1, 'same' padding.

    The kernel's input channels are rescaled by :func:`aol_conv_scale`.  Layers with as many
    outputs as inputs start as the identity (the paper's identity-centre initialisation); others
    start from an orthogonal centre tap (the paper's orthogonal initialisation for width changes).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.in_channels = _check_positive(in_channels, "in_channels", "AOLConv2d")
        self.out_channels = _check_positive(out_channels, "out_channels", "AOLConv2d")
        self.kernel_size = _check_odd(kernel_size, "AOLConv2d")
        self.padding = self.kernel_size // 2
        k = self.kernel_size
        self.weight = nn.Parameter(torch.zeros(self.out_channels, self.in_channels, k, k))
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None
        with torch.no_grad():
            centre = torch.empty(self.out_channels, self.in_channels)
            if self.in_channels == self.out_channels:
                centre.copy_(torch.eye(self.in_channels))
            else:
                nn.init.orthogonal_(centre)
            self.weight[:, :, k // 2, k // 2] = centre

    def effective_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The rescaled kernel the forward pass applies (in ``dtype`` if given)."""
        w = self.weight if dtype is None else self.weight.to(dtype)
        return w * aol_conv_scale(w).view(1, -1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        with no_autocast(self.weight):
            w = self.effective_weight()
        return F.conv2d(x, w, self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"


def _aol_linear_bound(m: nn.Module, in_shape: tuple[int, ...]) -> float:
    return linear_norm_bound(m.effective_weight(f64).detach())  # type: ignore[operator]


def _aol_conv_bound(m: nn.Module, in_shape: tuple[int, ...]) -> float:
    kernel = m.effective_weight(f64).detach()  # type: ignore[operator]
    return conv2d_norm_bound(kernel, tuple(in_shape), padding=m.padding)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# CPL: convex potential layers
# --------------------------------------------------------------------------------------------


class _ConvexPotential(nn.Module):
    """Shared machinery of the CPL layers: the step size ``h`` and its persistent power iteration.

    Training mode (the paper's scheme): each forward advances the unit vector ``u`` (a buffer in
    input space) by ``power_iters`` steps under ``no_grad`` and uses ``sigma = ||W u|| / ||u||``
    (``u`` detached: differentiable in ``W``, an estimate from below) in
    ``h = cpl_step_size(sigma, safety)``.

    Eval mode: the same, without advancing ``u``, except that ``safety * sigma`` is raised to a
    *sound* bound ``b >= ||W||`` (:func:`~lipmargin.lipschitz.bounds.conv2d_norm_bound` /
    :func:`~lipmargin.lipschitz.bounds.linear_norm_bound`) when it is below it.  A power iteration on a
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

    @torch.no_grad()
    def _advance(self, n_iter: int) -> None:
        w, v = self.weight.detach(), self.u
        for _ in range(n_iter):
            v = _renormalize(self._apply_wt(self._apply_w(v, w), w), v)
        self.u.copy_(v)

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
        return self._apply_w(u, w).norm() / u.norm()

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


def _cpl_linear_bound(m: nn.Module, in_shape: tuple[int, ...]) -> float:
    h = float(m.step_size(f64, eval_mode=True).detach())  # type: ignore[operator]
    b = linear_norm_bound(m.weight.detach())  # type: ignore[arg-type]
    return _max_one(h * b * b - 1.0)


def _cpl_conv_bound(m: nn.Module, in_shape: tuple[int, ...]) -> float:
    h = float(m.step_size(f64, eval_mode=True).detach())  # type: ignore[operator]
    b = conv2d_norm_bound(m.weight.detach(), tuple(in_shape), padding=m.padding)  # type: ignore[arg-type]
    return _max_one(h * b * b - 1.0)


# --------------------------------------------------------------------------------------------
# SLL: SDP-based Lipschitz layers
# --------------------------------------------------------------------------------------------


class SLLLinear(nn.Module):
    """SDP-based Lipschitz Layer, dense (Araujo et al., ICLR 2023): ``x - 2 W^T T^{-1} relu(W x + b)``.

    ``W`` is ``(inner_features, features)``; ``T`` from :func:`sll_linear_scale` with learnable
    log-weights ``q`` (initialised to 0, i.e. the AOL-like choice ``q = 1``).
    """

    def __init__(self, features: int, inner_features: int, bias: bool = True) -> None:
        super().__init__()
        self.features = _check_positive(features, "features", "SLLLinear")
        self.inner_features = _check_positive(inner_features, "inner_features", "SLLLinear")
        self.weight = nn.Parameter(torch.empty(self.inner_features, self.features))
        self.bias = nn.Parameter(torch.empty(self.inner_features)) if bias else None
        self.q = nn.Parameter(torch.zeros(self.inner_features))
        nn.init.xavier_normal_(self.weight)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.features)
            nn.init.uniform_(self.bias, -bound, bound)

    def inverse_t(self, dtype: torch.dtype | None = None) -> Tensor:
        """The diagonal of ``T^{-1}`` the forward pass uses, ``(inner_features,)``."""
        w = self.weight if dtype is None else self.weight.to(dtype)
        q = self.q if dtype is None else self.q.to(dtype)
        return sll_linear_scale(w, q)

    def forward(self, x: Tensor) -> Tensor:
        with no_autocast(self.weight):
            inv_t = self.inverse_t()
        z = F.relu(F.linear(x, self.weight, self.bias)) * inv_t
        return x - 2.0 * (z @ self.weight)

    def extra_repr(self) -> str:
        return f"features={self.features}, inner_features={self.inner_features}"


class SLLConv2d(nn.Module):
    """SDP-based Lipschitz Layer, convolutional (Araujo et al., ICLR 2023).

    ``x - 2 C^T T^{-1} relu(C x + b)`` with ``C`` the stride-1 'same' convolution ``channels ->
    inner_channels`` and ``T`` from :func:`sll_conv_scale`.
    """

    def __init__(self, channels: int, inner_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.channels = _check_positive(channels, "channels", "SLLConv2d")
        self.inner_channels = _check_positive(inner_channels, "inner_channels", "SLLConv2d")
        self.kernel_size = _check_odd(kernel_size, "SLLConv2d")
        self.padding = self.kernel_size // 2
        k = self.kernel_size
        self.weight = nn.Parameter(torch.empty(self.inner_channels, self.channels, k, k))
        self.bias = nn.Parameter(torch.empty(self.inner_channels)) if bias else None
        self.q = nn.Parameter(torch.zeros(self.inner_channels))
        nn.init.xavier_normal_(self.weight)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.channels * k * k)
            nn.init.uniform_(self.bias, -bound, bound)

    def inverse_t(self, dtype: torch.dtype | None = None) -> Tensor:
        """The diagonal of ``T^{-1}`` over the inner channels, ``(inner_channels,)``."""
        w = self.weight if dtype is None else self.weight.to(dtype)
        q = self.q if dtype is None else self.q.to(dtype)
        return sll_conv_scale(w, q)

    def forward(self, x: Tensor) -> Tensor:
        with no_autocast(self.weight):
            inv_t = self.inverse_t()
        z = F.relu(F.conv2d(x, self.weight, self.bias, padding=self.padding))
        z = z * inv_t.view(1, -1, 1, 1)
        return x - 2.0 * F.conv_transpose2d(z, self.weight, padding=self.padding)

    def extra_repr(self) -> str:
        return f"{self.channels}, inner_channels={self.inner_channels}, kernel_size={self.kernel_size}"


def _sll_linear_bound(m: nn.Module, in_shape: tuple[int, ...]) -> float:
    w = m.weight.detach().to(f64)  # type: ignore[union-attr]
    scaled = w * m.inverse_t(f64).detach().sqrt()[:, None]  # type: ignore[operator]  # T^{-1/2} W
    n = linear_norm_bound(scaled)
    return _max_one(2.0 * n * n - 1.0)


def _sll_conv_bound(m: nn.Module, in_shape: tuple[int, ...]) -> float:
    w = m.weight.detach().to(f64)  # type: ignore[union-attr]
    scaled = w * m.inverse_t(f64).detach().sqrt().view(-1, 1, 1, 1)  # type: ignore[operator]
    # The circular (FFT) bound suffices: the circular convolution's Gram rows are sums of the same
    # all-shift Gram entries, so the SLL argument gives n <= 1 for it too, and values below 1 are
    # clamped anyway.  It is much faster than 'auto' on mid-sized layers.
    n = conv2d_norm_bound(scaled, tuple(in_shape), padding=m.padding, method="fft")  # type: ignore[arg-type]
    return _max_one(2.0 * n * n - 1.0)


# --------------------------------------------------------------------------------------------
# SOC: skew orthogonal convolution
# --------------------------------------------------------------------------------------------


def _reshapes(kernel: Tensor) -> list[Tensor]:
    """The reshaped kernel matrices of Singla & Feizi's 'Fantastic Four' norm estimate.

    ``(C_o k_h) x (C_i k_w)``, ``(C_o k_w) x (C_i k_h)``, ``C_o x (C_i k_h k_w)`` and
    ``(C_o k_h k_w) x C_i``; a 1x1 kernel has just one, the channel matrix.
    """
    co, ci, kh, kw = kernel.shape
    if kh == 1 and kw == 1:
        return [kernel.reshape(co, ci)]
    return [
        kernel.permute(0, 2, 1, 3).reshape(co * kh, ci * kw),
        kernel.permute(0, 3, 1, 2).reshape(co * kw, ci * kh),
        kernel.reshape(co, ci * kh * kw),
        kernel.permute(0, 2, 3, 1).reshape(co * kh * kw, ci),
    ]


class SOCConv2d(nn.Module):
    """Skew Orthogonal Convolution (Singla & Feizi, ICML 2021): stride 1, 'same' padding, odd kernel.

    ``A`` is the convolution with :func:`skew_kernel` of a free kernel ``L``, rescaled by
    ``correction / sigma`` where ``sigma`` is the smallest of the 'Fantastic Four' power-iteration
    estimates (persistent vectors, advanced by each training forward), as in the paper; the
    output is the truncated exponential ``sum_{k <= T} A^k x / k!`` (``train_terms`` in training,
    ``eval_terms`` otherwise).  Different channel counts work as in the paper: the input is
    zero-padded to ``max(in, out)`` channels and the output truncated to ``out_channels``.

    ``exp(A)`` is orthogonal, but the truncated series is not exactly: the layer's sound bound is
    ``1 + exp_series_tail_bound(a, eval_terms)`` with ``a`` the sound norm bound of ``A``'s
    convolution on the real input size (1 + 1.5e-6 for ``a = 2`` and 12 terms).

    Eval mode additionally caps the scale so that ``||A|| <= eval_max_norm`` (a sound bound of the
    unscaled skew convolution on the input's size, cached per weight version and size).  The
    estimates lag behind the kernel after large optimiser steps (the top directions of a
    high-dimensional kernel move quickly), which can make ``||A||`` several times larger than
    intended and the 12-term series far from orthogonal; the cap keeps the certified function
    near-orthogonal and changes nothing while the estimates are good (``||A||`` is about 1 then).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        *,
        train_terms: int = 6,
        eval_terms: int = 12,
        correction: float | None = None,
        eval_max_norm: float = 2.0,
        power_iters: int = 1,
        init_iters: int = 50,
    ) -> None:
        super().__init__()
        self.in_channels = _check_positive(in_channels, "in_channels", "SOCConv2d")
        self.out_channels = _check_positive(out_channels, "out_channels", "SOCConv2d")
        self.kernel_size = _check_odd(kernel_size, "SOCConv2d")
        self.padding = self.kernel_size // 2
        self.train_terms = _check_positive(train_terms, "train_terms", "SOCConv2d")
        self.eval_terms = _check_positive(eval_terms, "eval_terms", "SOCConv2d")
        # The paper's 0.7 compensates for the reshaped-matrix estimate exceeding the conv norm; a
        # 1x1 kernel's estimate is the exact norm.
        self.correction = float(correction if correction is not None else (1.0 if self.kernel_size == 1 else 0.7))
        if not self.correction > 0 or not eval_max_norm > 0:
            raise ValueError(f"SOCConv2d: correction and eval_max_norm must be > 0, got {correction}, {eval_max_norm}")
        self.eval_max_norm = float(eval_max_norm)
        self.power_iters = int(power_iters)
        #: Inputs of at most this many pixels apply A as a dense matrix (:func:`conv_matrix`).
        self.dense_pixels = 4
        self.channels = max(self.in_channels, self.out_channels)
        c, k = self.channels, self.kernel_size
        self.weight = nn.Parameter(torch.randn(c, c, k, k) / math.sqrt(c))
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None
        self._n_vectors = len(_reshapes(self.weight.detach()))
        for i, mat in enumerate(_reshapes(self.weight.detach())):
            v = torch.randn(mat.shape[1])
            self.register_buffer(f"v{i}", v / v.norm())
        self._bound_cache: tuple[tuple, float] | None = None
        self._advance(init_iters)

    def _vectors(self) -> list[Tensor]:
        return [getattr(self, f"v{i}") for i in range(self._n_vectors)]

    @torch.no_grad()
    def _advance(self, n_iter: int) -> None:
        mats = _reshapes(skew_kernel(self.weight.detach()))
        for mat, v in zip(mats, self._vectors()):
            x = v.clone()
            for _ in range(n_iter):
                x = _renormalize(mat.t() @ (mat @ x), x)
            v.copy_(x)

    def skew_norm_bound(self, size: tuple[int, int]) -> float:
        """Sound bound on the norm of the unscaled skew convolution on ``(channels, *size)`` inputs.

        Cached per (storage, version, dtype, device) of the weight and ``size``.
        """
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, str(w.device), tuple(size))
        if self._bound_cache is None or self._bound_cache[0] != key:
            kernel = skew_kernel(w.detach().to(f64))
            value = conv2d_norm_bound(kernel, (self.channels, *size), padding=self.padding, method="fft")
            self._bound_cache = (key, value)
        return self._bound_cache[1]

    def skew_operator_kernel(self, dtype: torch.dtype | None = None, size: tuple[int, int] | None = None) -> Tensor:
        """The kernel of ``A`` as the forward pass applies it (in ``dtype`` if given).

        ``size=None``: the training-mode kernel; ``size=(H, W)``: the eval-mode kernel for inputs of
        that spatial size (scale capped so that ``||A|| <= eval_max_norm``).
        """
        w = self.weight if dtype is None else self.weight.to(dtype)
        skew = skew_kernel(w)
        sigmas = []
        for mat, v in zip(_reshapes(skew), self._vectors()):
            v = v.detach() if dtype is None else v.detach().to(dtype)
            sigmas.append((mat @ v).norm() / v.norm())
        sigma = torch.stack(sigmas).min().clamp_min(torch.finfo(skew.dtype).tiny)
        scale = self.correction / sigma
        if size is not None:
            b = self.skew_norm_bound(size)
            if b > 0:
                scale = torch.minimum(scale, torch.full_like(scale, self.eval_max_norm / b))
        return skew * scale

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"SOCConv2d expects {self.in_channels} input channels, got shape {tuple(x.shape)}")
        size = None if self.training else (int(x.shape[-2]), int(x.shape[-1]))
        with no_autocast(self.weight):
            if self.training and self.power_iters > 0:
                self._advance(self.power_iters)
            kernel = self.skew_operator_kernel(size=size)
        if self.channels > self.in_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.channels - self.in_channels))
        terms = self.train_terms if self.training else self.eval_terms
        h, w = x.shape[-2:]
        if h * w <= self.dense_pixels:
            # Few pixels (the last stages of a LipConvNet): the convolution as one dense
            # (C*H*W)^2 matrix.  The same linear map; a matmul does fewer operations than a conv
            # that mostly multiplies zero padding, and its backward is far faster on a CPU.
            mat = conv_matrix(kernel, (h, w), self.padding)  # (C*H*W, C*H*W)
            flat = x.reshape(x.shape[0], -1)  # (B, C*H*W)
            out_flat, term = flat, flat
            for i in range(1, terms + 1):
                term = (term @ mat.t()) / i
                out_flat = out_flat + term
            out = out_flat.reshape(x.shape)
        else:
            out, term = x, x
            for i in range(1, terms + 1):
                term = F.conv2d(term, kernel, padding=self.padding) / i
                out = out + term
        out = out[:, : self.out_channels]
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"train_terms={self.train_terms}, eval_terms={self.eval_terms}, correction={self.correction}"
        )


def soc_bound_from_norm(a: float, terms: int) -> float:
    """Sound bound on ``||sum_{k <= terms} A^k / k!||`` for skew-symmetric ``A`` with ``||A|| <= a``.

    ``exp(A)`` is orthogonal, so by the triangle inequality the truncation differs from a norm-1
    operator by at most the tail; the triangle inequality on the series itself gives ``exp(a)``.
    """
    return min(1.0 + exp_series_tail_bound(a, terms), math.exp(a) if a < 700 else math.inf) * (1.0 + ROUNDING_MARGIN)


def _soc_bound(m: nn.Module, in_shape: tuple[int, ...]) -> float:
    size = (int(in_shape[1]), int(in_shape[2]))
    kernel = m.skew_operator_kernel(f64, size=size).detach()  # type: ignore[operator]
    # a only enters through the series tail (~a^13 / 13!), so the fast circular bound is enough.
    a = conv2d_norm_bound(kernel, (m.channels, *size), padding=m.padding, method="fft")  # type: ignore[arg-type]
    return soc_bound_from_norm(a, m.eval_terms)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Activation and 1-Lipschitz reshaping / pooling
# --------------------------------------------------------------------------------------------


class HouseHolder(nn.Module):
    """HouseHolder activation (Singla, Singla & Feizi, ICLR 2022), the order-1 ('HH1') version.

    Channel ``i`` is paired with channel ``i + C/2``.  Each pair ``z`` is reflected across the
    line with unit normal ``v = (sin(theta/2), -cos(theta/2))`` when ``v.z > 0`` and kept
    otherwise: ``z - 2 relu(v.z) v``.  ``theta`` (one per pair) starts at ``pi/2``, where the
    activation sorts each pair ascending (MaxMin up to the order of the halves).

    1-Lipschitz: the map is continuous (on ``v.z = 0`` the reflection is the identity) and on each
    side of that line an orthogonal map.  A segment from ``a`` to ``b`` crosses the line at most
    once, at ``c``; then ``||f(a) - f(b)|| <= ||f(a) - f(c)|| + ||f(c) - f(b)|| = ||a - b||``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = _check_positive(channels, "channels", "HouseHolder")
        if c % 2:
            raise ValueError(f"HouseHolder needs an even number of channels, got {channels}")
        self.channels = c
        self.theta = nn.Parameter(torch.full((c // 2,), math.pi / 2))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(f"HouseHolder expects {self.channels} channels in dim 1, got shape {tuple(x.shape)}")
        a, b = x.chunk(2, dim=1)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        s, c = torch.sin(self.theta / 2).view(shape), torch.cos(self.theta / 2).view(shape)
        r = F.relu(a * s - b * c)  # relu(v . z)
        return torch.cat([a - 2 * r * s, b + 2 * r * c], dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class InvertibleDownsample(nn.Module):
    """Space-to-depth (``pixel_unshuffle``): ``(C, H, W) -> (C f^2, H/f, W/f)``, a permutation (norm 1).

    The 'invertible downsampling' of the SOC LipConvNets and the AOL nets ('concatenation pooling').
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = _check_positive(factor, "factor", "InvertibleDownsample")

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(
                f"InvertibleDownsample({self.factor}) needs H and W divisible by it, got shape {tuple(x.shape)}"
            )
        return F.pixel_unshuffle(x, self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class ChannelPad(nn.Module):
    """Append zero channels up to ``channels``: an isometric embedding (norm 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = _check_positive(channels, "channels", "ChannelPad")

    def forward(self, x: Tensor) -> Tensor:
        extra = self.channels - x.shape[1]
        if extra < 0:
            raise ValueError(f"ChannelPad({self.channels}) got {x.shape[1]} channels, more than it pads to")
        return F.pad(x, (0, 0) * (x.dim() - 2) + (0, extra))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class ZeroPadding(nn.Module):
    """Zero-pad the two spatial dims by ``(left, right, top, bottom)``: an isometric embedding."""

    def __init__(self, left: int, right: int, top: int, bottom: int) -> None:
        super().__init__()
        self.padding = (int(left), int(right), int(top), int(bottom))
        if min(self.padding) < 0:
            raise ValueError(f"ZeroPadding takes non-negative padding, got {self.padding}")

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, self.padding)

    def extra_repr(self) -> str:
        return "left={}, right={}, top={}, bottom={}".format(*self.padding)


def _int_pair(v: int | Sequence[int]) -> tuple[int, ...]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(x) for x in v)


class ScaledAvgPool2d(nn.Module):
    """Window sums divided by ``sqrt(k_h k_w)``: ``sqrt(k_h k_w) * avg_pool2d(x, kernel, stride)``.

    With ``stride = kernel`` (the default) this is the 1-Lipschitz pooling of the CPL / SLL nets
    (``AvgPool2d(4, divisor_override=4)``).  Lipschitz constant, proven: by Cauchy-Schwarz
    ``y_o^2 <= sum_{p in window o} x_p^2``, and each pixel lies in at most
    ``ceil(k_h/s_h) ceil(k_w/s_w)`` windows, so ``||y|| <= sqrt(ceil(k_h/s_h) ceil(k_w/s_w)) ||x||``
    (exactly 1 for non-overlapping windows, attained by a constant image).
    """

    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None) -> None:
        super().__init__()
        k = _int_pair(kernel_size)
        s = k if stride is None else _int_pair(stride)
        if len(k) != 2 or len(s) != 2 or min(k) < 1 or min(s) < 1:
            raise ValueError(f"ScaledAvgPool2d: bad kernel_size {kernel_size!r} or stride {stride!r}")
        self.kernel_size: tuple[int, int] = (k[0], k[1])
        self.stride: tuple[int, int] = (s[0], s[1])

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride) * math.sqrt(self.kernel_size[0] * self.kernel_size[1])

    def lipschitz_constant(self) -> float:
        """``sqrt(ceil(k_h/s_h) ceil(k_w/s_w))``, rounded up."""
        n = math.prod(-(-k // s) for k, s in zip(self.kernel_size, self.stride))
        root = math.isqrt(n)
        return float(root) if root * root == n else math.nextafter(math.sqrt(n), math.inf)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------

register_layer_rule(AOLLinear, estimate=_unit_estimate, bound=_aol_linear_bound)
register_layer_rule(AOLConv2d, estimate=_unit_estimate, bound=_aol_conv_bound)
register_layer_rule(CPLLinear, estimate=_unit_estimate, bound=_cpl_linear_bound)
register_layer_rule(CPLConv2d, estimate=_unit_estimate, bound=_cpl_conv_bound)
register_layer_rule(SLLLinear, estimate=_unit_estimate, bound=_sll_linear_bound)
register_layer_rule(SLLConv2d, estimate=_unit_estimate, bound=_sll_conv_bound)
register_layer_rule(SOCConv2d, estimate=_unit_estimate, bound=_soc_bound)
# HouseHolder: proof in its docstring.  Space-to-depth is a permutation; zero padding of channels
# or pixels is an isometric embedding.
register_layer_rule(HouseHolder, InvertibleDownsample, ChannelPad, ZeroPadding, constant=lambda m: 1.0)
register_layer_rule(ScaledAvgPool2d, constant=lambda m: m.lipschitz_constant())  # type: ignore[operator]
