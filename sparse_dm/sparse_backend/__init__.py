"""Truly sparse training layers: compact weights whose forward and backward cost follows the active entries.

`SparseLinear` and `SparseBiGRU` replace a masked nn.Linear / bidirectional nn.GRU. Each masked weight
is a values Parameter of exactly nnz entries plus a `SparseLayout` (CSR, and the CSC permutation the
transpose product walks). Backward computes input gradients through the sparse transpose and value
gradients only at the active positions (a sampled product); the dense weight gradient is formed only
when the caller asks for it (mask-update steps). `reference` holds the pure-torch oracle.
"""

from sparse_dm.sparse_backend.compiled import KernelUnavailable, TrainKernels, load_train_kernels
from sparse_dm.sparse_backend.gru import ColumnPlan, SparseBiGRU
from sparse_dm.sparse_backend.layout import SparseLayout
from sparse_dm.sparse_backend.linear import SparseLinear
from sparse_dm.sparse_backend.reference import DenseGrad
from sparse_dm.sparse_backend.weights import VALUES_SUFFIX, SparseWeights

__all__ = [
    "VALUES_SUFFIX",
    "ColumnPlan",
    "DenseGrad",
    "KernelUnavailable",
    "SparseBiGRU",
    "SparseLayout",
    "SparseLinear",
    "SparseWeights",
    "TrainKernels",
    "load_train_kernels",
]
