"""Cases for attention on packed variable-length sequences."""
import torch

from fastmlm.ops import attention
from tests.ops.harness import OpCase, strided_view


def attention_case(name, lengths, *, heads=2, head_dim=16, causal=False, key_lengths=None, dropout_p=0.0,
                   fused_qkv=False, scale=None, seed_on_device=False, dim_major=False):
    """`seed_on_device`: the seed is a 0-d int64 tensor on the inputs' device, drawn over all of
    int64 (negative values too) as a step drawn on the GPU would pass it; else a host int.
    `dim_major`: q, k, v are [T, H, D] views of [T, D, H] storage (head dim not innermost)."""
    def build(device, dtype, generator):
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        klen = key_lengths or lengths
        cu_k = torch.tensor([0, *torch.tensor(klen).cumsum(0).tolist()], dtype=torch.int32)
        total_q, total_k = int(cu[-1]), int(cu_k[-1])
        if seed_on_device:
            seed = torch.randint(-2**63, 2**63 - 1, (), generator=generator, dtype=torch.int64).to(device)
        else:
            seed = int(torch.randint(0, 2**62, (), generator=generator))

        def rand(rows):
            if dim_major:
                t = torch.randn(rows, head_dim, heads, generator=generator, dtype=torch.float64)
                return t.to(dtype).to(device).transpose(1, 2)
            return torch.randn(rows, heads, head_dim, generator=generator, dtype=torch.float64).to(dtype).to(device)

        if fused_qkv:
            # q, k, v as strided views of one [T, 3, heads, dim] projection, as a model makes them.
            qkv = torch.randn(total_q, 3, heads, head_dim, generator=generator, dtype=torch.float64).to(dtype).to(device)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        else:
            q, k, v = rand(total_q), rand(total_k), rand(total_k)
        if fused_qkv:  # the offsets as strided views too (every other element of a longer buffer)
            cu, cu_k = strided_view(cu), strided_view(cu_k)
        return {"q": q, "k": k, "v": v, "cu_seqlens": cu.to(device),
                "cu_seqlens_k": None if key_lengths is None else cu_k.to(device),
                "seed": seed}

    def call(q, k, v, cu_seqlens, cu_seqlens_k, seed):
        max_q = max(lengths)
        max_k = None if key_lengths is None else max(key_lengths)
        return attention(q, k, v, cu_seqlens, max_q, causal=causal, dropout_p=dropout_p, seed=seed, softmax_scale=scale,
                         cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_k)

    return OpCase("attention", name, build, call, grads=("q", "k", "v"))


CASES = [
    attention_case("single-token", [1]),
    attention_case("mixed", [5, 1, 13]),
    attention_case("mixed-causal", [5, 1, 13], causal=True),
    attention_case("empty-sequence", [4, 0, 7], causal=True),
    attention_case("head-dim-24", [6, 9], head_dim=24),
    attention_case("head-dim-8-many-heads", [3, 17], heads=4, head_dim=8),
    attention_case("fewer-queries", [2, 5, 1], key_lengths=[6, 5, 4]),
    attention_case("fewer-queries-causal", [2, 5, 1], key_lengths=[6, 5, 4], causal=True),
    attention_case("more-queries-causal", [6, 3], key_lengths=[2, 3], causal=True),
    attention_case("fused-qkv", [7, 12], fused_qkv=True),
    attention_case("head-dim-not-innermost", [3, 5], dim_major=True),
    attention_case("dropout", [5, 11], dropout_p=0.3),
    attention_case("dropout-causal", [9, 4], dropout_p=0.1, causal=True, scale=0.3),
    attention_case("dropout-device-seed", [6, 10], dropout_p=0.4, seed_on_device=True),
    attention_case("dropout-device-seed-cross", [2, 5, 1], key_lengths=[6, 5, 4], dropout_p=0.2, causal=True,
                   seed_on_device=True),
    attention_case("longer", [40, 33, 1], head_dim=32),
]
