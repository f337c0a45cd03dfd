"""One post-LayerNorm BERT transformer layer on packed rows.

    x = LayerNorm(x + Dropout(Wo · Attention(Wq x, Wk x, Wv x)))
    x = LayerNorm(x + Dropout(W2 · act(W1 x)))

Query, key and value are one [3H, H] projection (one matmul instead of three);
the checkpoint code splits it into BERT's query/key/value weights and back.

Query subset (`query_rows`): keys and values are projected for every token, but
queries, the attention output, the residual and the feed-forward only for the
given rows, grouped by sequence as `cu_seqlens_q` describes. The MLM model uses
it in the last layer, whose output is only read at labelled positions.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastmlm.config import EncoderConfig
from fastmlm.ops import attention, gather_rows


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """HuggingFace's ACT2FN for the names EncoderConfig accepts."""
    if name == "gelu":
        return F.gelu(x)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"unsupported hidden_act {name!r}")


def dropout_seed(p: float, training: bool, device: torch.device | str | None = None) -> int | torch.Tensor:
    """A fresh attention-dropout seed: a 0-d int64 tensor on `device`; 0 when dropout is off.

    The seed is drawn on the device (`torch.randint` with that device's
    generator, so `torch.manual_seed` makes it reproducible) and the attention
    kernels read it there: no host sync, no data-dependent int, so a training
    step with attention dropout compiles with `fullgraph=True`, and under CUDA
    graphs each replay draws a new seed (PyTorch's graph-safe CUDA RNG)
    instead of baking one mask into the graph. `device=None` draws on the CPU.
    """
    if not training or p == 0.0:
        return 0
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


class Layer(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(hidden, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.hidden_act = config.hidden_act
        self.hidden_dropout = config.hidden_dropout
        self.attention_dropout = config.attention_dropout

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        *,
        causal: bool = False,
        query_rows: Optional[torch.Tensor] = None,
        cu_seqlens_q: Optional[torch.Tensor] = None,
        max_seqlen_q: Optional[int] = None,
        cu_seqlens_k: Optional[torch.Tensor] = None,
        attention_seed: Optional[int | torch.Tensor] = None,
    ) -> torch.Tensor:
        """x [T, H] packed -> [T, H], or [len(query_rows), H] with a query subset.

        attention_seed: the attention-dropout seed (default: drawn here, `dropout_seed`).
        """
        hidden = x.shape[-1]
        heads, head_dim = self.num_heads, self.head_dim
        if query_rows is None:
            q, k, v = self.qkv(x).view(-1, 3, heads, head_dim).unbind(1)
            residual = x
            cu_q, max_q, cu_k, max_k = cu_seqlens, max_seqlen, None, None
        else:
            w, b = self.qkv.weight, self.qkv.bias
            k, v = F.linear(x, w[hidden:], b[hidden:]).view(-1, 2, heads, head_dim).unbind(1)
            residual = gather_rows(x, query_rows)
            q = F.linear(residual, w[:hidden], b[:hidden]).view(-1, heads, head_dim)
            cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
            cu_q, max_q, max_k = cu_seqlens_q, max_seqlen_q, max_seqlen
        dropout_p = self.attention_dropout if self.training else 0.0
        if attention_seed is None:
            attention_seed = dropout_seed(dropout_p, self.training, x.device)
        a = attention(q, k, v, cu_q, max_q, causal=causal, dropout_p=dropout_p, seed=attention_seed,
                      cu_seqlens_k=cu_k, max_seqlen_k=max_k)
        a = self.attn_out(a.reshape(-1, hidden))
        x = self.attn_norm(residual + F.dropout(a, self.hidden_dropout, self.training))
        f = self.ffn_out(activation(self.hidden_act, self.ffn_in(x)))
        return self.ffn_norm(x + F.dropout(f, self.hidden_dropout, self.training))
