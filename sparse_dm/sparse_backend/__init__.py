"""Truly sparse training layers: compact weights whose forward and backward cost follows the active entries.

`SparseLinear` and `SparseBiGRU` replace a masked nn.Linear / bidirectional nn.GRU (nn.GRU's exact
semantics, packed variable-length batches). Each masked weight is a values Parameter of exactly nnz
entries plus a `SparseLayout` (CSR, and the CSC permutation the transpose product walks). Backward
computes input gradients through the sparse transpose and value gradients only at the active
positions (a sampled product, SDDMM); the dense weight gradient is formed only when the caller asks
for it (`dense_grad_requested`, mask-update steps). `chirodiff.forward_columns` runs the whole
ChiroDiff denoiser on these layers without leaving the packed feature-major columns. `reference`
holds the pure-torch oracle (gathers and index_add, no dense weight) the compiled kernels are
tested against; it is never used as a fallback.

Why plain C loaded with ctypes (kernels/csrc/sparse_train.c via `sparse_dm.kernels.build`) rather
than a `torch.utils.cpp_extension` module:
- it needs only a C compiler: no Python/torch headers, no ninja, no C++ ABI match with the torch
  wheel; it builds in seconds even on these shared cores, where compiling against torch's C++
  headers is far slower and has to be redone for every torch version;
- the inference loop (bigru_recurrence.c) is built the same way, so there is one build, cache
  (per source, compiler, flags and CPU: -march=native code never runs on another CPU) and one
  `KernelUnavailable` error path; no compiler means a clear error, never a slower fallback;
- the kernels need nothing from ATen: they take raw float/int32 pointers of contiguous, 64-byte
  aligned tensors that the Python wrappers (`compiled.TrainKernels`) check first, and autograd is
  plain `torch.autograd.Function`s in Python. The price is a few microseconds of ctypes overhead
  per call, paid once per layer (a GRU layer is one call forward and one backward, not one per step).
Threads: built with -fopenmp they are torch's own OpenMP workers (one libgomp in the process).
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
