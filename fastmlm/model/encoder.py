"""Encoder: BERT's embeddings and post-LayerNorm layers on packed tokens.

    encoder(input_ids [B, S], attention_mask, token_type_ids)  -> [B, S, H]
    encoder(input_ids [T], cu_seqlens=..., max_seqlen=...)      -> [T, H]

Padded input is unpacked once, before the embedding, and re-padded only at the
end; the MLM model calls `pack` and `run` itself and never re-pads.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import nn

from fastmlm import checkpoint
from fastmlm.config import EncoderConfig
from fastmlm.model.activation_checkpointing import ActivationCheckpointing, CheckpointPlan
from fastmlm.model.embeddings import Embeddings
from fastmlm.model.inputs import check_encoder_inputs
from fastmlm.model.layer import Layer, dropout_seed
from fastmlm.model.packing import PackedBatch, pack_given, unpad
from fastmlm.ops import no_value_checks


class Pooler(nn.Module):
    """BERT's pooler, tanh(W h_[CLS] + b); kept when a checkpoint has one (classifiers use it)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        # Set by freeze_while_unused: a freeze that mark_used undoes (a user's own freeze stays).
        self.frozen_while_unused = False

    def freeze_while_unused(self) -> None:
        """Frozen while its owner (a MaskedLM) never reads it, so DistributedDataParallel does not
        wait for its gradients (it would need find_unused_parameters=True otherwise)."""
        self.requires_grad_(False)
        self.frozen_while_unused = True

    def mark_used(self) -> None:
        """Called by whatever reads the pooler (a classifier, drop_head): trainable again."""
        if self.frozen_while_unused:
            self.requires_grad_(True)
            self.frozen_while_unused = False

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(first_token))


def init_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: N(0, std) matrices and embeddings, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _run_layer(layer, x, cu_seqlens, max_seqlen, causal, query_rows, cu_seqlens_q, max_seqlen_q, cu_seqlens_k,
               attention_seed):
    """One layer, arguments positional (a reentrant checkpoint takes no keywords). Value checks
    are off here too: a checkpoint's recomputation runs in the backward, maybe on another
    thread, outside `run`'s no_value_checks block (cu_seqlens were checked by `pack`)."""
    with no_value_checks():
        return layer(x, cu_seqlens, max_seqlen, causal=causal, query_rows=query_rows, cu_seqlens_q=cu_seqlens_q,
                     max_seqlen_q=max_seqlen_q, cu_seqlens_k=cu_seqlens_k, attention_seed=attention_seed)


class Encoder(ActivationCheckpointing, nn.Module):
    # Activation checkpointing (activation_checkpointing_enable): None, off. A class
    # default, so an Encoder pickled before the option existed still runs.
    checkpoint_plan: Optional[CheckpointPlan] = None

    def __init__(self, config: EncoderConfig, *, token_capacity: Optional[int] = None, pooler: bool = False):
        """token_capacity: pack padded batches to exactly this many token rows (static shapes).

        More real tokens than that is an error in eager mode; with value checks off
        (compiled, captured) the tokens past it are dropped and their sequences attend
        only to the kept part.
        """
        super().__init__()
        if not isinstance(config, EncoderConfig):
            raise TypeError(f"config must be an EncoderConfig, got {type(config).__name__}")
        if token_capacity is not None and (isinstance(token_capacity, bool) or not isinstance(token_capacity, int)
                                           or token_capacity < 1):
            raise ValueError(f"token_capacity must be a positive int or None, got {token_capacity!r}")
        self.config = config
        self.token_capacity = token_capacity
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        self.pooler = Pooler(config) if pooler else None
        init_weights(self, config.initializer_range)

    def _checkpointed_encoder(self) -> "Encoder":
        return self

    def pack(self, input_ids, attention_mask=None, token_type_ids=None, *, cu_seqlens=None,
             max_seqlen=None, labels=None) -> PackedBatch:
        """Check the inputs and pack them (see fastmlm.model.packing)."""
        input_ids, attention_mask, token_type_ids, max_seqlen = check_encoder_inputs(
            self.config, input_ids, attention_mask, token_type_ids, cu_seqlens, max_seqlen, labels,
            self.token_capacity)
        if cu_seqlens is not None:
            return pack_given(input_ids, token_type_ids, cu_seqlens, max_seqlen)
        return unpad(input_ids, attention_mask, token_type_ids, self.token_capacity)

    def run(self, batch: PackedBatch, *, causal: bool = False, last_layer_query_rows=None,
            cu_seqlens_q=None, max_seqlen_q=None, cu_seqlens_k=None) -> torch.Tensor:
        """Packed hidden states [T, H]; with last_layer_query_rows only those rows of the last layer
        (query sequences cu_seqlens_q over key sequences cu_seqlens_k, default batch.cu_seqlens)."""
        x = self.embeddings(batch.input_ids, batch.token_type_ids, batch.position_ids)
        # cu_seqlens were built by `pack` (or checked there when given): the
        # ops need not re-read them from the device once per layer.
        with no_value_checks():
            return self._layers(x, batch, causal, last_layer_query_rows, cu_seqlens_q, max_seqlen_q, cu_seqlens_k)

    def _layers(self, x, batch, causal, last_layer_query_rows, cu_seqlens_q, max_seqlen_q, cu_seqlens_k):
        plan = self.checkpoint_plan if self.training and torch.is_grad_enabled() else None
        if plan is not None and plan.reentrant and not x.requires_grad:
            # A reentrant checkpoint whose input needs no gradient (frozen embeddings) returns
            # an output without a graph: every layer's gradient would be silently lost.
            x = x.detach().requires_grad_()
        for i, layer in enumerate(self.layers):
            subset = last_layer_query_rows is not None and i == len(self.layers) - 1
            args = (batch.cu_seqlens, batch.max_seqlen, causal, *(
                (last_layer_query_rows, cu_seqlens_q, max_seqlen_q, cu_seqlens_k) if subset else (None,) * 4))
            if plan is not None and plan.covers(i):
                # Drawn where the plain layer draws it, and outside the recomputation.
                seed = dropout_seed(layer.attention_dropout, layer.training, x.device)
                x = plan.run(functools.partial(_run_layer, layer), x, *args, seed)
            else:
                x = _run_layer(layer, x, *args, None)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, *, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None, causal: bool = False) -> torch.Tensor:
        """Last hidden state: [B, S, H] for padded input (zeros at padding), [T, H] for packed input.

        causal=True hides later positions of the same sequence from each token.
        """
        batch = self.pack(input_ids, attention_mask, token_type_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return batch.repad(self.run(batch, causal=causal))

    # ---- checkpoints (HuggingFace BertModel layout) ----
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        checkpoint.save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        **kwargs) -> "Encoder":
        """Load a BertModel-style checkpoint (or the encoder of a BertForMaskedLM one).

        The checkpoint's pooler is kept (classifiers use it) unless `pooler=False` is passed.
        """
        return checkpoint.load_pretrained(cls, directory, dtype=dtype, **kwargs)
