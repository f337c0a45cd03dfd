"""Work-arounds for three faults of Triton 3.6's interpreter (TRITON_INTERPRET=1).

1. Under NumPy >= 2.3, the interpreter keeps every scalar as a one-element array
   and turns it into a Python int with `int(array)`, which NumPy 2.3+ rejects for
   arrays of ndim > 0: any `range(...)` whose bound is a kernel argument or
   depends on `tl.program_id` fails with "only 0-dimensional arrays can be
   converted to Python scalars". `__index__` is made to read the single element.
2. bf16 values are held as their raw 16-bit patterns, and `tl.dot` multiplies
   those integers, so every bf16 dot is garbage. The operands are widened to the
   fp32 values they stand for (exact: a bf16 is the top half of an fp32) before
   the product, which the GPU also accumulates in fp32.
3. fp32 -> bf16 casts (every bf16 store of an fp32 result) truncate toward zero;
   the GPU rounds to nearest even. They are made to round as the GPU does, so
   the bf16 tests check the GPU's arithmetic.

No effect on compiled (GPU) kernels; nothing is done unless the interpreter is on.
"""
import os


def install():
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    from triton.runtime import interpreter

    if getattr(interpreter._patch_lang_tensor, "_fastmlm_compat", False):
        return
    original_patch = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._fastmlm_compat = True
    interpreter._patch_lang_tensor = patch_lang_tensor

    original_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, _bf16_as_fp32(a), _bf16_as_fp32(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot

    original_cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        import triton.language as tl

        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return _fp32_to_bf16_nearest_even(src)
        return original_cast(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


def _bf16_as_fp32(handle):
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    if handle.dtype.scalar != tl.bfloat16:
        return handle
    bits = handle.data.view(np.uint16).astype(np.uint32) << 16
    return interpreter.TensorHandle(bits.view(np.float32), tl.float32)


def _fp32_to_bf16_nearest_even(handle):
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    rounded = torch.tensor(handle.data, dtype=torch.float32).to(torch.bfloat16)  # round to nearest even
    return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
