"""Float tolerances derived from the computation, never from one machine's rounding.

Two evaluations of the same sum in float arithmetic differ when the summation order differs: MKL's
dense GEMM vs a CSR product, AVX2 vs AVX-512 lanes, another blocking for another batch size, FMA or
not. The deterministic bound (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
eq. 3.5) covers all of them at once: for ANY order of evaluation of a dot product of n terms,

    |fl(sum x_i y_i) - sum x_i y_i| <= gamma_n * sum |x_i y_i|,   gamma_n = n u / (1 - n u),

u = eps / 2 the unit roundoff (an FMA only removes roundings, so it stays inside). Two evaluations
therefore differ by at most 2 gamma_n * sum|terms| ~ n * eps * sum|terms|.

Why the worst case and not sqrt(n): the sqrt(n) rule (Higham & Mary 2019) is a probabilistic bound
on rounding errors modelled as independent random variables. Our kernels and inputs are fixed, so
a bound that holds "with high probability" can fail deterministically on one CPU - the defect this
module exists to remove. The tests' reductions are short (tens to a few thousand terms), so the
worst case still sits orders of magnitude below what a real defect (a wrong mask, a wrong band, a
dropped bias: changes of 1e-2 and more) moves an output.

Networks: rounding errors of a chain of dependent reductions (layers, recurrent steps, sampler
steps) add along the chain, each relative to the terms it sums. `reductions` runs a module once and
counts the terms of every reduction it performs (an upper bound on the longest dependent chain)
and their sums of |terms|; `float_bound` of the total and the length-weighted mean of those sums
is the bound, under the stated model that a stage's error reaches the output with gain <= 1 (the
weights of these test nets are O(1/sqrt(fan-in)); GRU states are in (-1, 1)). Where a known gain
exceeds 1 (a DDIM sampler's 1/sqrt(alpha_bar)), the scale carries it (`ddim_scale`). A deep net's
chain (a UNet: ~2e4 terms, n u ~ 1e-3 in float32) makes the float32 worst case too loose to catch a
defect; a test of a structural property (batch independence, a guidance formula) then runs in
float64, where the same bound is tight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from sparse_dm.diffusion import NoiseSchedule
from sparse_dm.diffusion.samplers import ddim_previous, ddim_timesteps
from sparse_dm.models.chirodiff import FourierTimeEmbedding
from sparse_dm.models.ldm_unet import AttentionBlock
from sparse_dm.models.vq_autoencoder import AttnBlock


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of one correctly rounded operation."""
    return torch.finfo(dtype).eps / 2


def float_bound(reduction_length: int, scale: float, dtype: torch.dtype = torch.float32) -> float:
    """The largest |a - b| between two evaluations, in any order, of a sum of `reduction_length` terms
    (products included) whose absolute values add up to at most `scale`: 2 gamma_n * scale."""
    if reduction_length < 1:
        raise ValueError(f"reduction_length must be >= 1, got {reduction_length}")
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale must be finite and >= 0, got {scale}")
    nu = reduction_length * unit_roundoff(dtype)
    if nu >= 0.5:
        raise ValueError(
            f"{reduction_length} terms in {dtype}: n*u = {nu:.3g} >= 1/2, the bound says nothing; "
            "compute the reference in a wider dtype"
        )
    return 2 * nu / (1 - nu) * scale


def assert_close_computed(
    actual: Tensor | np.ndarray,
    expected: Tensor | np.ndarray,
    *,
    reduction_length: int,
    scale: float,
    why: str,
    dtype: torch.dtype | None = None,
) -> None:
    """`torch.testing.assert_close` with atol = float_bound(reduction_length, scale, dtype), rtol = 0.

    `why` says where the two sides' summation orders differ and why the length and scale bound
    them; it is printed with the bound on failure. `dtype` defaults to the dtype of `expected`.
    """
    if dtype is None:
        dtype = (
            expected.dtype if isinstance(expected, Tensor) else torch.from_numpy(np.asarray(expected)).dtype
        )
    if not dtype.is_floating_point:
        raise TypeError(f"assert_close_computed compares floats, got {dtype}")
    bound = float_bound(reduction_length, scale, dtype)
    torch.testing.assert_close(
        actual,
        expected,
        rtol=0.0,
        atol=bound,
        msg=lambda m: f"{m}\nbound {bound:.3g} = 2 gamma_{reduction_length} * {scale:.3g} in {dtype}: {why}",
    )


@dataclass(frozen=True)
class Reductions:
    """What each call of a net sums: `lengths[i]` terms in all (>= that call's longest dependent
    chain) and `scales[i]`, the length-weighted mean of its reductions' sums of |terms| S_k, so that
    2 gamma_{lengths[i]} * scales[i] >= sum_k 2 gamma_{n_k} S_k (gamma is superadditive): every
    reduction's error, each relative to its own terms, added up."""

    lengths: tuple[int, ...]
    scales: tuple[float, ...]

    @property
    def length(self) -> int:
        """Terms summed over every call: the chain when the calls feed each other (sampler steps)."""
        return sum(self.lengths)

    @property
    def longest(self) -> int:
        """The longest single call: the chain when the calls are independent (one sample each)."""
        return max(self.lengths)

    @property
    def scale(self) -> float:
        """The largest call's scale: with `length` (chained calls) or `longest` (independent ones)
        it bounds the sum over the calls."""
        return max(self.scales)


def _linear(module: nn.Linear, x: Tensor, _out: Tensor) -> tuple[int, float]:
    bias = 0.0 if module.bias is None else module.bias.abs()
    return module.in_features + 1, float((x.abs() @ module.weight.abs().T + bias).max())


def _conv(module: nn.Conv1d | nn.Conv2d, x: Tensor, _out: Tensor) -> tuple[int, float]:
    abs_bias = None if module.bias is None else module.bias.abs()
    conv = nn.functional.conv1d if isinstance(module, nn.Conv1d) else nn.functional.conv2d
    terms = conv(x.abs(), module.weight.abs(), abs_bias, module.stride, module.padding, module.dilation,
                 module.groups)  # fmt: skip
    return module.weight[0].numel() + 1, float(terms.max())


def _gru(module: nn.GRU, x: Tensor | PackedSequence, _out: Any) -> tuple[int, float]:
    """Per layer, each step sums W_ih x_t + b_ih and W_hh h + b_hh. States |h| < 1 (convex
    combinations of tanh), so the gate terms add up to at most |W_ih| |x_t| + |b| + rowsum |W_hh|;
    layer 0 reads `x`, every later layer the states below it."""
    data = x.data if isinstance(x, PackedSequence) else x
    steps = (
        len(x.batch_sizes) if isinstance(x, PackedSequence) else data.shape[1 if module.batch_first else 0]
    )
    length, scale = 0, 0.0
    for layer in range(module.num_layers):
        w_ih, w_hh = getattr(module, f"weight_ih_l{layer}"), getattr(module, f"weight_hh_l{layer}")
        b_ih, b_hh = getattr(module, f"bias_ih_l{layer}"), getattr(module, f"bias_hh_l{layer}")
        length += steps * (w_ih.shape[1] + 1 + w_hh.shape[1] + 1)
        inputs = data.abs() @ w_ih.abs().T if layer == 0 else w_ih.abs().sum(1)
        gates = inputs + b_ih.abs() + w_hh.abs().sum(1) + b_hh.abs()
        scale = max(scale, float(gates.max()))
    return length, scale


def _fourier(module: FourierTimeEmbedding, t: Tensor, out: Tensor) -> tuple[int, float]:
    """2 pi s t / T times each frequency: four roundings, then sin/cos, whose error is that of the
    angle (|sin'| <= 1): an error relative to the largest angle."""
    phase = 2 * math.pi * module.freq_scale * (t.to(module.freqs.dtype)[:, None] / module.num_timesteps)
    return 4, float((phase @ module.freqs.T.abs()).abs().max())


def _average_pool(module: nn.AdaptiveAvgPool2d, x: Tensor, out: Tensor) -> tuple[int, float]:
    """A mean over each window (the division adds one rounding); its terms |x| / window add up to
    at most max|x|."""
    return x[0, 0].numel() // out[0, 0].numel() + 1, float(x.abs().max())


def _group_norm(module: nn.GroupNorm, x: Tensor, out: Tensor) -> tuple[int, float]:
    """Mean then variance over a group (two chained sums); the relative error lands on the output."""
    group = x[0].numel() // module.num_groups
    return 2 * group + 2, float(out.abs().max())


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, float]:
    """scaled_dot_product_attention of (batch, positions, d) q, k, v (a function, not a module): q.k
    over d channels, the softmax sum and the weighted sum of v over the positions. A logit error
    shifts the weights relatively, so the output error scales with max|v| times the logits' sum of
    |terms| (at least 1: v's own weighted sum)."""
    logits = (q.abs() @ k.abs().transpose(1, 2)) / math.sqrt(q.shape[-1])
    return q.shape[-1] + 2 * k.shape[1], float(v.abs().max()) * max(1.0, float(logits.max()))


def _norm_then_conv(norm: nn.GroupNorm, convs: list[nn.Conv1d | nn.Conv2d], x: Tensor) -> list[Tensor]:
    """The attention inputs recomputed functionally, so the norm's and convs' own hooks count once."""
    normed = nn.functional.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return [c._conv_forward(normed, c.weight, c.bias) for c in convs]


def _unet_attention(module: AttentionBlock, x: Tensor, _out: Tensor) -> tuple[int, float]:
    """The LDM UNet's block: qkv channels per head ordered [q | k | v] (its legacy order)."""
    batch, channels = x.shape[:2]
    (qkv,) = _norm_then_conv(module.norm, [module.qkv], x.reshape(batch, channels, -1))
    head = channels // module.num_heads
    q, k, v = qkv.reshape(batch * module.num_heads, 3, head, -1).transpose(2, 3).unbind(1)
    return _sdpa(q, k, v)


def _vq_attention(module: AttnBlock, x: Tensor, _out: Tensor) -> tuple[int, float]:
    """The first stage's single-head block with separate q, k, v convs."""
    q, k, v = (
        t.flatten(2).transpose(1, 2) for t in _norm_then_conv(module.norm, [module.q, module.k, module.v], x)
    )
    return _sdpa(q, k, v)


COUNTERS: dict[type, Callable[[Any, Any, Any], tuple[int, float]]] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.GRU: _gru,
    nn.GroupNorm: _group_norm,
    nn.AdaptiveAvgPool2d: _average_pool,
    FourierTimeEmbedding: _fourier,
    AttentionBlock: _unet_attention,
    AttnBlock: _vq_attention,
}
# Leaf modules that sum nothing: lookups, reshapes, elementwise maps (one rounding each, on values
# every reduction after them already counts).
NO_REDUCTION = (
    nn.Embedding, nn.Dropout, nn.Identity, nn.Flatten, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Upsample,
)  # fmt: skip


@torch.no_grad()
def reductions(
    net: nn.Module, *args: Any, call: Callable[..., Any] | None = None, **kwargs: Any
) -> tuple[Any, Reductions]:
    """Run `call(*args, **kwargs)` (default `net`) once: its output, and the reductions of `net`'s
    modules per call of `net` (a sampling run: one per step).

    Every module call counts, parallel branches included, so a length over-counts the longest
    chain. A leaf module, or one with weights of its own, without a known count is refused: a silent
    zero would shrink the bound. Functional reductions inside a container (attention) are counted by
    that container's entry in COUNTERS.
    """
    calls: list[list[tuple[int, float]]] = []  # a call that never enters net.__call__ (vq.decode): one

    def count(
        counter: Callable[[Any, Any, Any], tuple[int, float]], module: nn.Module, a: Any, out: Any
    ) -> None:
        if not calls:
            calls.append([])
        calls[-1].append(counter(module, a[0], out))

    handles = [net.register_forward_pre_hook(lambda _m, _a: calls.append([]))]
    for module in net.modules():
        counter = COUNTERS.get(type(module))
        if counter is not None:
            handles.append(module.register_forward_hook(partial(count, counter)))
        elif not isinstance(module, (*NO_REDUCTION, nn.ModuleList, nn.ModuleDict, nn.Sequential)) and (
            next(module.parameters(False), None) is not None or next(module.children(), None) is None
        ):  # a leaf we do not know, or a container with weights of its own: a silent 0 would shrink the bound
            raise TypeError(f"no reduction count for {type(module).__name__}: add one to COUNTERS")
    try:
        output = (call or net)(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if not calls or not all(calls):
        raise ValueError(f"a call of {type(net).__name__} ran no counted reduction")
    lengths = tuple(sum(n for n, _ in found) for found in calls)
    weighted = (sum(n * s for n, s in found) for found in calls)
    return output, Reductions(lengths, tuple(w / n for w, n in zip(weighted, lengths, strict=True)))


def ddim_scale(
    schedule: NoiseSchedule,
    step_scales: tuple[float, ...],
    num_steps: int,
    eta: float = 0.0,
    discretization: str = "uniform",
) -> float:
    """The scale that bounds DDIM's x_0, from each step's eps scale S_k (`Reductions.scales`).

    A step is x_s = sqrt(a_s) x0(x_t, eps) + sqrt(1 - a_s - sigma^2) eps + sigma z, x0 = (x_t -
    sqrt(1 - a_t) eps) / sqrt(a_t). Both runs draw the same z, so an eps error d at step k enters x_s
    times c_k = |sqrt(1 - a_s - sigma^2) - sqrt(a_s (1 - a_t) / a_t)| and every later step carries x
    times sqrt(a_s / a_t): x_0 moves by g_k d, g_k = sqrt(a_last / a_s) c_k (largest at the first,
    high-noise step: about 1/sqrt(a_t)). Steps' errors add, so with every eps bounded by 2 gamma_n
    S_k, x_0 is bounded by 2 gamma_n sum_k g_k S_k (n: the longest step chain). Not modelled: the
    net's own response to an x error (its Jacobian), second order next to this sum here.
    """
    steps = ddim_timesteps(schedule.num_timesteps, num_steps, discretization)
    if len(step_scales) != len(steps):
        raise ValueError(f"{len(step_scales)} step scales for {len(steps)} DDIM steps")
    padded = torch.cat([torch.ones(1, dtype=torch.float64), schedule.alphas_cumprod.double()])
    a_t = padded[torch.tensor(steps) + 1]
    a_s = padded[torch.tensor(ddim_previous(steps, discretization)) + 1]
    sigma2 = eta**2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
    c = ((1 - a_s - sigma2).clamp_min(0).sqrt() - (a_s * (1 - a_t) / a_t).sqrt()).abs()
    gains = (a_s[-1] / a_s).sqrt() * c
    return float((gains * torch.tensor(step_scales, dtype=torch.float64)).sum())


def sampling_bound(
    module: Any, num_samples: int, generator: torch.Generator, **overrides: Any
) -> tuple[Any, int, float]:
    """`module.generate(num_samples, generator, **overrides)` with its reductions counted: the
    samples, the longest step chain and the DDIM scale (`ddim_scale`) of its configured sampler."""
    cfg = {**module.sampling_cfg, **overrides}
    if cfg["sampler"] != "ddim":
        raise ValueError(f"sampling_bound derives DDIM's gain only, got sampler={cfg['sampler']!r}")
    samples, run = reductions(module.net, num_samples, generator, call=module.generate, **overrides)
    scale = ddim_scale(
        module.schedule, run.scales, cfg["steps"], cfg["eta"], cfg.get("discretization", "uniform")
    )
    return samples, max(run.lengths), scale


# Roundings one sampler update makes on each element, counted in ddim_sample / ddpm_sample: the
# x0 prediction (6), sigma (8), the new x (8), the noise term (2), with room for the gathers.
SAMPLER_ROUNDINGS_PER_STEP = 30


class PredictionScale:
    """An eps_fn wrapper recording the largest x0 prediction magnitude, (|x| + sqrt(1 - a) |eps|) /
    sqrt(a), that a sampler update rounds on. An update's relative error on it reaches x_0 with
    gain sqrt(a_last / a_s) * sqrt(a_s) <= 1, so two samplers computing the same steps by other
    formulas differ by at most float_bound(steps * SAMPLER_ROUNDINGS_PER_STEP, largest) - plus
    the eps_fn's response to those differences (its Jacobian), not modelled."""

    def __init__(self, eps_fn: Callable[[Tensor, Tensor], Tensor], schedule: NoiseSchedule) -> None:
        self.eps_fn, self.schedule, self.largest = eps_fn, schedule, 0.0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        eps = self.eps_fn(x, t)
        a_bar = self.schedule.alpha_bar(t, x)
        prediction = (x.abs() + (1 - a_bar).sqrt() * eps.abs()) / a_bar.sqrt()
        self.largest = max(self.largest, float(prediction.max()))
        return eps


def mse_bound(loss: float, elements: int, net: Reductions) -> tuple[int, float]:
    """(reduction_length, scale) for a (masked, per-sample) MSE of a net's output computed in two
    orders: the loss's own sums over `elements` terms, all >= 0 (so their sum of |terms| is the
    loss), plus the net's output error d <= 2 gamma_n S carried by the loss's derivative, whose
    mean 2 |pred - target| is at most 2 sqrt(loss) (Jensen)."""
    return net.longest + elements, loss + 2 * math.sqrt(loss) * net.scale
