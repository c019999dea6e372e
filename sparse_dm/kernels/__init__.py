"""Compiled C kernels: built on first use with the system C compiler, cached per CPU, loaded with ctypes.

Used by the sparse inference form (`inference/`) and the sparse training backend (`sparse_backend/`).
"""
