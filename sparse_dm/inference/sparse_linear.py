"""A drop-in inference replacement for a masked `nn.Linear`: y = x W^T + b with W in CSR.

MKL's CSR product wants W on the left and the activations feature-major, so the layer computes
(W @ [x^T; 1])^T: the transpose copies are the price of staying drop-in (a network written
feature-major end to end, like `SparseChiroDiffNet`, avoids them).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparse_dm.inference.kernels import masked_weight, storage, with_bias_column


class SparseLinear(nn.Module):
    """Inference only: no parameters, no autograd."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = storage(with_bias_column(masked_weight(linear, "weight"), linear.bias), sparse=True)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        ones = torch.ones(flat.shape[0], 1, dtype=flat.dtype, device=flat.device)
        columns = torch.cat([flat, ones], dim=1).t().contiguous()
        return torch.mm(self.weight, columns).t().reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout=csr"
