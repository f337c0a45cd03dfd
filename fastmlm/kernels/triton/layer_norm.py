"""LayerNorm for the MLM head, and its backward fused with the erf-GELU backward.

Forward saves mean and rstd (fp32 [M]); backward turns d_normed into d_pre, the
gradient at the dense layer's output before GELU, in one pass over each row:
    xhat = (act - mean) * rstd,  wdy = norm_weight * d_normed
    d_act = rstd * (wdy - mean(wdy) - xhat * mean(wdy * xhat))
    d_pre = d_act * (Phi(pre) + pre * phi(pre))
d_norm_weight = sum_rows d_normed * xhat and d_norm_bias = sum_rows d_normed are
written as one fp32 partial per program and summed in a fixed order afterwards.
"""
import torch
import triton
import triton.language as tl

from fastmlm.kernels.triton.cross_entropy import _INTERPRET

# tl.constexpr: compiled (not interpreted) kernels may read only constexpr globals.
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _layer_norm_forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, H, stride_x, eps,
                               BLOCK_H: tl.constexpr):
    """One row per program: x [M, H] (row stride stride_x), y contiguous [M, H],
    mean and rstd fp32 [M]; BLOCK_H >= H."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / H
    centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / H + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * H + cols, (centered * rstd * w + b).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _gelu_layer_norm_backward_kernel(
        dy_ptr, pre_ptr, act_ptr, mean_ptr, rstd_ptr, w_ptr, dpre_ptr, dw_part_ptr, db_part_ptr,
        M, H, num_programs, BLOCK_H: tl.constexpr):
    """Program p handles rows p, p + num_programs, ...; dy, pre, act and dpre are
    contiguous [M, H]; dw_part and db_part fp32 [num_programs, H]."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_H,), tl.float32)
    db_acc = tl.zeros((BLOCK_H,), tl.float32)
    for row in range(pid, M, num_programs):
        at = tl.cast(row, tl.int64) * H + cols
        dy = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32)
        act = tl.load(act_ptr + at, mask=mask, other=0.0).to(tl.float32)
        pre = tl.load(pre_ptr + at, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (act - tl.load(mean_ptr + row)) * tl.load(rstd_ptr + row), 0.0)
        wdy = w * dy
        c_xhat = tl.sum(wdy * xhat, axis=0) / H
        c_mean = tl.sum(wdy, axis=0) / H
        d_act = (wdy - c_mean - xhat * c_xhat) * tl.load(rstd_ptr + row)
        gelu_grad = 0.5 * (1.0 + tl.math.erf(pre * _SQRT1_2)) + pre * _INV_SQRT_2PI * tl.exp(-0.5 * pre * pre)
        tl.store(dpre_ptr + at, (d_act * gelu_grad).to(dpre_ptr.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        db_acc += dy
    tl.store(dw_part_ptr + pid * H + cols, dw_acc, mask=mask)
    tl.store(db_part_ptr + pid * H + cols, db_acc, mask=mask)


def layer_norm_forward(x, weight, bias, eps):
    """(y [M, H] in x's dtype, mean fp32 [M], rstd fp32 [M]); x needs unit column stride."""
    M, H = x.shape
    weight, bias = weight.contiguous(), bias.contiguous()  # read with unit stride
    y = torch.full((M, H), float("nan"), dtype=x.dtype, device=x.device)
    mean = torch.full((M,), float("nan"), dtype=torch.float32, device=x.device)
    rstd = torch.full_like(mean, float("nan"))
    if M == 0:
        return y, mean, rstd
    block_h = triton.next_power_of_2(H)
    _layer_norm_forward_kernel[(M,)](x, weight, bias, y, mean, rstd, H, x.stride(0), float(eps),
                                     BLOCK_H=block_h, num_warps=min(max(block_h // 256, 1), 8))
    return y, mean, rstd


def gelu_layer_norm_backward(d_normed, pre, act, mean, rstd, weight):
    """(d_pre [M, H] in pre's dtype, d_norm_weight [H], d_norm_bias [H] in weight's dtype)."""
    M, H = pre.shape
    device = pre.device
    d_normed, weight = d_normed.contiguous(), weight.contiguous()
    d_pre = torch.full((M, H), float("nan"), dtype=pre.dtype, device=device)
    if M == 0:
        return d_pre, torch.zeros_like(weight), torch.zeros_like(weight)
    if _INTERPRET or device.type != "cuda":
        num_programs = min(M, 4)
    else:
        num_programs = min(M, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    dw_part = torch.empty((num_programs, H), dtype=torch.float32, device=device)
    db_part = torch.empty_like(dw_part)
    block_h = triton.next_power_of_2(H)
    _gelu_layer_norm_backward_kernel[(num_programs,)](
        d_normed, pre, act, mean, rstd, weight, d_pre, dw_part, db_part, M, H, num_programs,
        BLOCK_H=block_h, num_warps=min(max(block_h // 256, 1), 8))
    return d_pre, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)
