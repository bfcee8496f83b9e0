"""The ops, one folder per op (flash-linear-attention style), installed as the package `hybridlm.kernels`.

Each folder kernels/<op>/ holds the op's public function and the registration of its backends (__init__.py), the
torch reference (torch_ref.py, always available), the Triton kernel with its torch.autograd.Function
(triton_kernel.py), the mamba_ssm adapter where mamba_ssm has the op (mamba_ssm_adapter.py) and a slow,
obviously-correct loop (naive.py) that tests compare against. availability.py holds the checks they share.
Users call the ops through `hybridlm.ops`. tests/kernels runs the Triton kernels on CPU under TRITON_INTERPRET=1;
importing a triton_kernel.py imports triton: with no GPU, set TRITON_INTERPRET=1 before that first import.
"""
# The op folders register with hybridlm.ops.registry, and hybridlm.ops imports every op folder: importing it first
# resolves hybridlm.ops -> its registry -> each op the same way whichever module a user imports first.
import hybridlm.ops  # noqa: F401
