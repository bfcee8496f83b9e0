"""Triton kernels, one folder per op (flash-linear-attention style): `naive.py` holds a slow, obviously-correct
reference and `chunk.py` / `triton.py` the kernels with their torch.autograd.Function. Each is registered as the
`triton` backend of an op in hybridlm/ops/backends.py; tests/kernels runs them on CPU under TRITON_INTERPRET=1.
Importing a kernel module imports triton: with no GPU, set TRITON_INTERPRET=1 before that first import."""
