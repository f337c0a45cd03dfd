"""Attention at BERT-base sizes: fastmlm's Triton kernels vs PyTorch SDPA.

A packed batch of 32 sequences with mixed lengths up to 512, 12 heads, head
dim 64, bf16. Compared, forward and forward+backward:
  * triton:       `attention_forward` / `attention_backward` on the packed batch;
  * sdpa_padded:  `F.scaled_dot_product_attention` on the batch padded to 512
                  with a key-padding mask (what a padded BERT does);
  * sdpa_blockdiag: SDPA on the whole packed batch as one sequence with a
                  block-diagonal mask (a [T, T] mask: feasible at this size).
TFLOP/s are counted on real (unpadded) tokens only: 4 * sum(L^2) * heads * D
for the forward (two matmuls), 2.5 times that for the backward (five), halved
for causal. Run: python -m pytest benchmarks/test_attention.py --benchmark-only

FASTMLM_ATTENTION_SWEEP=1 also runs `test_config_sweep`, which times a grid of
block configs per kernel and prints them (to retune `_default_config`).
"""
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="attention benchmarks need a CUDA GPU")

if torch.cuda.is_available():
    from triton.testing import do_bench

    from fastmlm.kernels.triton.attention import attention_backward, attention_forward

HEADS, HEAD_DIM, BATCH, MAX_LEN = 12, 64, 32, 512
DTYPE = torch.bfloat16
SCALE = HEAD_DIM ** -0.5


def packed_batch(seed=0):
    """(lengths, cu_seqlens int32, qkv [T, 3, heads, D]): 32 lengths in [32, 512], the first 512."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(32, MAX_LEN + 1, (BATCH,), generator=gen)
    lengths[0] = MAX_LEN
    lengths = lengths.tolist()
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32).cuda()
    total = sum(lengths)
    torch.manual_seed(seed)
    qkv = torch.randn(total, 3, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    return lengths, cu, qkv


def attention_flops(lengths, causal, backward):
    forward = 4 * sum(length * length for length in lengths) * HEADS * HEAD_DIM
    if causal:
        forward //= 2
    return forward * (3.5 if backward else 1.0)


def run_timed(benchmark, fn, lengths, causal, backward, variant):
    fn()  # compile / warm caches outside the timing
    torch.cuda.synchronize()

    def step():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=3)
    if benchmark.stats is None:  # --benchmark-disable: the body ran once as a smoke test
        return
    seconds = benchmark.stats.stats.median
    # The wall time above includes Python and launch overhead (tens of microseconds,
    # comparable to the kernels at this size); do_bench's CUDA-event time of
    # back-to-back calls is closer to the GPU time alone.
    gpu_seconds = do_bench(fn, warmup=5, rep=50) * 1e-3
    flops = attention_flops(lengths, causal, backward)
    benchmark.extra_info.update({
        "variant": variant, "causal": causal, "backward": backward, "tokens": sum(lengths),
        "tflops_real_tokens": flops / seconds / 1e12, "median_ms": seconds * 1e3,
        "tflops_real_tokens_gpu": flops / gpu_seconds / 1e12, "gpu_ms": gpu_seconds * 1e3,
    })


def to_padded(x, lengths):
    """[T, heads, D] -> [batch, heads, MAX_LEN, D], zero padded."""
    padded = x.new_zeros(len(lengths), MAX_LEN, HEADS, HEAD_DIM)
    start = 0
    for b, length in enumerate(lengths):
        padded[b, :length] = x[start:start + length]
        start += length
    return padded.transpose(1, 2)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backward", [False, True])
def test_triton(benchmark, causal, backward):
    lengths, cu, qkv = packed_batch()
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    grad_out = torch.randn_like(q)
    kwargs = dict(causal=causal, softmax_scale=SCALE, dropout_p=0.0, seed=0)

    def fn():
        out, lse = attention_forward(q, k, v, cu, cu, MAX_LEN, MAX_LEN, **kwargs)
        if backward:
            attention_backward(grad_out, q, k, v, out, lse, cu, cu, MAX_LEN, MAX_LEN, **kwargs)

    run_timed(benchmark, fn, lengths, causal, backward, "triton")


@pytest.mark.parametrize("backward", [False, True])
def test_triton_dropout(benchmark, backward):
    lengths, cu, qkv = packed_batch()
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    grad_out = torch.randn_like(q)
    kwargs = dict(causal=False, softmax_scale=SCALE, dropout_p=0.1, seed=1)

    def fn():
        out, lse = attention_forward(q, k, v, cu, cu, MAX_LEN, MAX_LEN, **kwargs)
        if backward:
            attention_backward(grad_out, q, k, v, out, lse, cu, cu, MAX_LEN, MAX_LEN, **kwargs)

    run_timed(benchmark, fn, lengths, False, backward, "triton_dropout0.1")


@pytest.mark.parametrize("backward", [False, True])
def test_sdpa_padded(benchmark, backward):
    lengths, _, qkv = packed_batch()
    q, k, v = (to_padded(qkv[:, i], lengths).requires_grad_(backward) for i in range(3))
    key_in = torch.arange(MAX_LEN, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]
    mask = key_in[:, None, None, :]  # [batch, 1, 1, keys]: True = attend
    grad_out = torch.randn_like(q)

    def fn():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE)
        if backward:  # fresh gradients, as the Triton variants return (no .grad accumulation)
            torch.autograd.grad(out, (q, k, v), grad_out)

    run_timed(benchmark, fn, lengths, False, backward, "sdpa_padded")


@pytest.mark.parametrize("backward", [False, True])
def test_sdpa_blockdiag(benchmark, backward):
    lengths, cu, qkv = packed_batch()
    total = sum(lengths)
    q, k, v = (qkv[:, i].transpose(0, 1)[None].detach().requires_grad_(backward) for i in range(3))
    seq_id = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"),
                                     torch.tensor(lengths, device="cuda"), output_size=total)
    mask = (seq_id[:, None] == seq_id[None, :])[None, None]  # [1, 1, T, T]
    grad_out = torch.randn_like(q)

    def fn():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE)
        if backward:  # fresh gradients, as the Triton variants return (no .grad accumulation)
            torch.autograd.grad(out, (q, k, v), grad_out)

    run_timed(benchmark, fn, lengths, False, backward, "sdpa_blockdiag")


@pytest.mark.skipif(os.environ.get("FASTMLM_ATTENTION_SWEEP") != "1", reason="set FASTMLM_ATTENTION_SWEEP=1")
@pytest.mark.parametrize("causal", [False, True])
def test_config_sweep(causal):
    lengths, cu, qkv = packed_batch()
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    grad_out = torch.randn_like(q)
    kwargs = dict(causal=causal, softmax_scale=SCALE, dropout_p=0.0, seed=0)
    out, lse = attention_forward(q, k, v, cu, cu, MAX_LEN, MAX_LEN, **kwargs)
    flops = attention_flops(lengths, causal, False)
    tiles = {"fwd": [(128, 64), (128, 128), (64, 64), (64, 128), (128, 32)],
             "dkdv": [(32, 128), (64, 128), (64, 64), (32, 64), (16, 128)],
             "dq": [(128, 32), (128, 64), (64, 64), (64, 32), (128, 16)]}
    for kernel in ("fwd", "dkdv", "dq"):
        results = []
        for block_m, block_n in tiles[kernel]:
            for num_warps in (4, 8):
                for num_stages in (2, 3):
                    config = {kernel: {"BLOCK_M": block_m, "BLOCK_N": block_n,
                                       "num_warps": num_warps, "num_stages": num_stages}}
                    if kernel == "fwd":
                        fn = lambda: attention_forward(q, k, v, cu, cu, MAX_LEN, MAX_LEN, config=config, **kwargs)  # noqa: E731
                    else:
                        fn = lambda: attention_backward(grad_out, q, k, v, out, lse, cu, cu, MAX_LEN, MAX_LEN,  # noqa: E731
                                                        config=config, **kwargs)
                    try:
                        ms = do_bench(fn, warmup=5, rep=20)
                    except Exception as error:  # out of shared memory / registers for this tile
                        print(f"{kernel} causal={causal} {config[kernel]}: failed {type(error).__name__}")
                        continue
                    results.append((ms, config[kernel]))
        results.sort(key=lambda item: item[0])
        for ms, config in results[:5]:
            scale = 1.0 if kernel == "fwd" else 2.5  # whole backward timed; flops of the whole backward
            print(f"SWEEP {kernel} causal={causal} {ms:.3f} ms {flops * scale / ms / 1e9:.1f} TFLOP/s {config}")
