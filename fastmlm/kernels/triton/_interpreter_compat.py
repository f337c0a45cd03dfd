"""Work-around for Triton 3.6's interpreter (TRITON_INTERPRET=1) under NumPy >= 2.3.

The interpreter keeps every scalar as a one-element array and turns it into a Python
int with `int(array)`, which NumPy 2.3+ rejects for arrays of ndim > 0. The effect:
any `range(...)` whose bound is a kernel argument or depends on `tl.program_id`
fails with "only 0-dimensional arrays can be converted to Python scalars". We wrap
the interpreter's tensor patching so `__index__` reads the single element instead.
No effect on compiled (GPU) kernels; nothing is done unless the interpreter is on.
"""
import os


def install():
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_fastmlm_compat", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._fastmlm_compat = True
    interpreter._patch_lang_tensor = patch_lang_tensor
