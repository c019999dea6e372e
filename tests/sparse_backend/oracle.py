"""Masked dense float64 models as the oracle of the sparse layers; tolerances derived from the computation.

Why these tolerances: a float32 sum of R products has a rounding error of at most R * eps * sum|terms|
(eps = 2^-24, the unit round-off); with round-to-nearest errors of random sign the typical error is
sqrt(R) * eps * sum|terms|. The oracle runs in float64 (its own error is ~2^-29 smaller), so the
difference is the float32 layer's rounding alone. We allow R * eps * scale, where R is the longest
chain of float32 accumulations the quantity depends on and `scale` the largest magnitude of the
quantity or its inputs: the worst-case factor R then covers cancellation up to sqrt(R) below the
typical-error estimate. A wrong index, a missing term or a skipped direction errs by O(scale), far
above R * eps * scale for the R of these tests (< 2^14, so the bound stays below 2^-10 * scale).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

EPS32 = torch.finfo(torch.float32).eps / 2  # unit round-off of float32


def tolerance(reduction: int, scale: float) -> float:
    """R * eps * scale (see the module docstring)."""
    return reduction * EPS32 * scale


def exact_mask(shape: tuple[int, int], density: float, generator: torch.Generator) -> Tensor:
    """A bool mask with exactly round(density * numel) active entries (at least one)."""
    numel = shape[0] * shape[1]
    count = max(1, round(density * numel))
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=generator)[:count]] = True
    return flat.view(shape)


def masked_gru(
    input_size: int, hidden: int, layers: int, density: float, seed: int
) -> tuple[nn.GRU, dict[str, Tensor]]:
    """A float32 bidirectional nn.GRU with `<weight>_mask` buffers, weights zeroed outside them."""
    torch.manual_seed(seed)
    gru = nn.GRU(input_size, hidden, layers, batch_first=True, bidirectional=True)
    generator = torch.Generator().manual_seed(seed + 1)
    masks = {}
    with torch.no_grad():
        for name, param in list(gru.named_parameters()):
            if name.startswith("weight"):
                mask = exact_mask(tuple(param.shape), density, generator)
                param.mul_(mask)
                gru.register_buffer(name + "_mask", mask)
                masks[name] = mask
            else:  # biases of a trained GRU are not tiny: make them matter
                param.uniform_(-0.5, 0.5)
    return gru, masks


def float64_copy(gru: nn.GRU) -> nn.GRU:
    oracle = nn.GRU(gru.input_size, gru.hidden_size, gru.num_layers, batch_first=True, bidirectional=True)
    oracle.load_state_dict({k: v for k, v in gru.state_dict().items() if not k.endswith("_mask")})
    return oracle.double()


def packed_batch(lengths: list[int], features: int, seed: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(padded (B, L, F) leaf, lengths)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), features, generator=generator, dtype=torch.float64)
    return x.to(dtype).requires_grad_(), torch.tensor(lengths)


def pack(x: Tensor, lengths: Tensor) -> PackedSequence:
    return pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
