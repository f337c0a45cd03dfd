"""Triton kernels. Importing this package makes the Triton interpreter usable with
NumPy >= 2.3 (see `_interpreter_compat`), so every kernel module gets the fix."""
from fastmlm.kernels.triton import _interpreter_compat

_interpreter_compat.install()
