"""Kernels: `triton/` (Triton, GPU or the interpreter) and `compiled/` (Python
adapters over the C++/CUDA module fastmlm._C). Kernel modules import nothing
from fastmlm.ops or fastmlm.model; the ops choose between them."""
