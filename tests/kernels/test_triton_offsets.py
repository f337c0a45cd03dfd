"""Where the Triton kernels' int32 offsets would wrap, the wrappers widen or copy (offsets.py).

The shapes that need it hold billions of elements, so the decisions are checked on
meta tensors; the widened attention variant itself runs in test_triton_attention.py.
"""
import torch

from fastmlm.kernels.triton.offsets import offsets_need_int64, unit_column_stride


def test_the_limit_is_the_largest_offset_reaching_2_to_the_31():
    assert not offsets_need_int64([(2**31, 1)])  # offsets 0 .. 2**31 - 1
    assert offsets_need_int64([(2**31 + 1, 1)])
    assert offsets_need_int64([(2**30 + 1, 2)])
    assert not offsets_need_int64([(2**20, 2048), (128, 1)])  # 1M rows of [16, 128]: 2**31 - 2048 + 127
    assert offsets_need_int64([(2**20 + 1, 2048), (128, 1)])
    assert not offsets_need_int64([(0, 2**40)])  # no position at all


def test_matrices_whose_column_offsets_would_wrap_get_unit_column_stride():
    # A transposed [262177, 8192] matrix: column 8191 sits 8191 x 262177 >= 2**31 elements in.
    wide = torch.empty(8192, 262_177, device="meta").t()
    assert unit_column_stride(wide).stride() == (8192, 1)
    fits = torch.empty(8192, 262_000, device="meta").t()  # 8191 x 262000 < 2**31
    assert unit_column_stride(fits) is fits
    contiguous = torch.empty(300_000, 8192, device="meta")
    assert unit_column_stride(contiguous) is contiguous
