"""MaskedLM: the Encoder plus BERT's MLM head, computing the loss on labelled rows only.

    out = mlm(input_ids, attention_mask, token_type_ids, labels)
    out.loss                      # mean cross-entropy over labels != -100, as BertForMaskedLM
    out = mlm(..., return_logits=True)
    out.logits, out.positions     # [M, vocab] for the labelled rows only; their flat indices

The loss path never materialises logits for unlabelled positions:
`masked_positions` picks the labelled packed rows, and the fused `mlm_head` op
(dense, GELU, LayerNorm, tied decoder, cross-entropy) reads only those rows.

Options:
- `mask_capacity=C`: exactly C labelled slots whatever the batch holds (padded
  slots get target -100), so shapes never depend on data; together with
  `token_capacity` (the packed token count) a training step compiles with
  `fullgraph=True` and captures in a CUDA graph. More than C labels is an error
  in eager mode; while compiling, the labels past C are left out of the loss.
  (Without `token_capacity`, a batch with no real token has no slots: there is
  no packed row for them to point at, and its loss is 0.)
- `last_layer_subset=True`: the last layer computes queries, attention output
  and feed-forward only for labelled rows (keys and values for all tokens).
- `objective="causal"`: attention hides later positions and row t of each
  sequence predicts labels[t + 1] of the same sequence (labels default to
  input_ids). `.positions` then names the predicting rows and `.targets` the
  tokens they predict.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastmlm import checkpoint
from fastmlm.config import EncoderConfig
from fastmlm.model.activation_checkpointing import ActivationCheckpointing
from fastmlm.model.encoder import Encoder, init_weights
from fastmlm.model.item_count import ItemCount, check_item_count, divide_by_item_count
from fastmlm.model.layer import activation
from fastmlm.model.outputs import IndexableOutput
from fastmlm.model.packing import IGNORE_INDEX, PackedBatch, append_spare_sequences, shift_labels_within_sequences
from fastmlm.ops import gather_rows, masked_positions, mlm_cross_entropy, mlm_head
from fastmlm.ops.checks import no_value_checks, value_checks_enabled

OBJECTIVES = ("mlm", "causal")


@dataclass
class MaskedLMOutput(IndexableOutput):
    """loss: 0-d fp32. With return_logits: logits [M, vocab]; positions [M] int64, flat indices
    into input_ids (row-major) of those rows; targets [M] their labels (-100 on capacity padding).
    Indexes as HuggingFace's output: out[0] / out["loss"] the loss, then the logits if any."""

    TUPLE_FIELDS = ("loss", "logits")

    loss: torch.Tensor
    logits: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None
    targets: Optional[torch.Tensor] = None
    num_labelled: Optional[torch.Tensor] = None


class MLMHead(nn.Module):
    """BERT's prediction head; the decoder weight is the encoder's word embedding (tied)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.hidden_act = config.hidden_act

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(activation(self.hidden_act, self.dense(x)))

    def logits(self, x: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(x), decoder_weight, self.bias)


class MaskedLM(ActivationCheckpointing, nn.Module):
    @property
    def accepts_loss_kwargs(self) -> bool:
        """HuggingFace's Trainer passes `num_items_in_batch` (the labelled tokens of all the
        micro-batches of one optimiser step) to a model that says it takes it, and then
        leaves the loss unscaled: accumulated gradients are those of the whole batch's mean.
        Not for the causal objective: the Trainer counts labels the model shifts within
        each sequence (a sequence's first label is never predicted), so its count is off."""
        return self.objective == "mlm"

    def __init__(self, config: EncoderConfig, *, last_layer_subset: bool = False,
                 mask_capacity: Optional[int] = None, token_capacity: Optional[int] = None,
                 objective: str = "mlm"):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if last_layer_subset and objective == "causal":
            # The attention op aligns causal masks at sequence ends, which is
            # not the position of an arbitrary query subset; and a causal LM
            # labels nearly every row, so a subset would save nothing.
            raise ValueError("last_layer_subset is for objective='mlm' only")
        if mask_capacity is not None and (isinstance(mask_capacity, bool) or not isinstance(mask_capacity, int)
                                          or mask_capacity < 1):
            raise ValueError(f"mask_capacity must be a positive int or None, got {mask_capacity!r}")
        self.config = config
        self.objective = objective
        self.last_layer_subset = last_layer_subset
        self.mask_capacity = mask_capacity
        self.encoder = Encoder(config, token_capacity=token_capacity)
        self.head: Optional[MLMHead] = MLMHead(config)
        init_weights(self.head, config.initializer_range)

    def drop_head(self) -> Encoder:
        """The encoder alone; this model's head parameters are released."""
        self.head = None
        if self.encoder.pooler is not None:  # frozen while unused by the MLM (checkpoint.load_pretrained)
            self.encoder.pooler.mark_used()
        return self.encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                return_logits: bool = False, *, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None,
                num_items_in_batch: ItemCount = None) -> MaskedLMOutput:
        """num_items_in_batch: divide the summed loss by this count instead of this batch's
        number of labelled rows (HuggingFace's Trainer passes it under gradient accumulation)."""
        if self.head is None:
            raise RuntimeError("this MaskedLM's head was dropped (drop_head); use the returned Encoder")
        check_item_count(num_items_in_batch)
        causal = self.objective == "causal"
        if labels is None and not causal:
            raise ValueError("MaskedLM needs labels (-100 where nothing is predicted)")
        batch = self.encoder.pack(input_ids, attention_mask, token_type_ids, cu_seqlens=cu_seqlens,
                                  max_seqlen=max_seqlen, labels=labels)
        if labels is None:
            packed_labels = batch.input_ids.to(torch.int64)
            if batch.valid is not None:
                packed_labels = torch.where(batch.valid, packed_labels, IGNORE_INDEX)
        else:
            packed_labels = batch.gather(labels.to(torch.int64), IGNORE_INDEX)
        if causal:
            packed_labels = shift_labels_within_sequences(packed_labels, batch.cu_seqlens)

        # Capacity padding points at row 0, which a batch without a real token (possible
        # without token_capacity, whose row count is then known on the host) does not have.
        capacity = self.mask_capacity if batch.num_rows > 0 else None
        if capacity is not None and value_checks_enabled(packed_labels):
            count = int((packed_labels != IGNORE_INDEX).sum())
            if count > capacity:
                raise ValueError(f"the batch has {count} labelled positions, more than mask_capacity {capacity}")

        rows, count = masked_positions(packed_labels, capacity=capacity)
        targets = packed_labels[rows]
        if capacity is not None:
            targets = torch.where(torch.arange(capacity, device=rows.device) < count, targets, IGNORE_INDEX)

        if self.last_layer_subset:
            cu_q, cu_k = self._query_sequences(batch, rows, count, capacity)
            hidden = self.encoder.run(batch, last_layer_query_rows=rows, cu_seqlens_q=cu_q,
                                      max_seqlen_q=batch.max_seqlen, cu_seqlens_k=cu_k)
            head_rows = torch.arange(rows.shape[0], device=rows.device)
        else:
            hidden = self.encoder.run(batch, causal=causal)
            head_rows = rows

        word = self.encoder.embeddings.word.weight
        out = MaskedLMOutput(loss=None, num_labelled=count)
        # rows come from masked_positions and labels were range-checked by pack():
        # the head ops need not read them back from the device again.
        with no_value_checks():
            self._head_outputs(out, hidden, head_rows, rows, targets, batch, word, return_logits,
                               "mean" if num_items_in_batch is None else "sum")
        if num_items_in_batch is not None:  # the loss above is a sum
            out.loss = divide_by_item_count(out.loss, num_items_in_batch)
        return out

    def _head_outputs(self, out, hidden, head_rows, rows, targets, batch, word, return_logits,
                      reduction) -> None:
        if return_logits:
            out.logits = self.head.logits(gather_rows(hidden, head_rows), word)
            out.positions = batch.flat_index(rows)
            out.targets = targets
            row_loss = F.cross_entropy(out.logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
            out.loss = row_loss if reduction == "sum" else row_loss / (targets != IGNORE_INDEX).sum().clamp(min=1)
        else:
            out.loss = self._loss(hidden, head_rows, targets, reduction)

    def _loss(self, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        head, word = self.head, self.encoder.embeddings.word.weight
        if self.config.hidden_act == "gelu":
            return mlm_head(hidden, rows, head.dense.weight, head.dense.bias, head.norm.weight, head.norm.bias,
                            word, head.bias, targets, layer_norm_eps=self.config.layer_norm_eps, reduction=reduction)
        # Other activations: the head in plain torch on the gathered rows, then the fused loss.
        # Under autocast x (LayerNorm's output), word and bias are all fp32 here and the
        # loss op's autocast rule casts them together; casting x alone would split dtypes.
        x = head.transform(gather_rows(hidden, rows))
        return mlm_cross_entropy(x, word, targets, head.bias, reduction=reduction)

    def _query_sequences(self, batch: PackedBatch, rows: torch.Tensor, count: torch.Tensor,
                         capacity: Optional[int]):
        """cu_seqlens for the last layer's query subset, and the matching key cu_seqlens.

        `rows` is increasing and the packed sequences are contiguous, so the
        labelled rows of sequence b are those in [cu_seqlens[b], cu_seqlens[b+1]):
        a searchsorted gives their boundaries without leaving the device.
        """
        total = batch.num_rows
        starts = batch.cu_seqlens.to(torch.int64)
        if capacity is None:
            return torch.searchsorted(rows, starts).to(torch.int32), batch.cu_seqlens
        # Capacity padding (index 0 past `count`) would break the ordering: move it past every row.
        slots = torch.arange(capacity, device=rows.device)
        sorted_rows = torch.where(slots < count, rows, total)
        cu_q = torch.searchsorted(sorted_rows, starts)
        # The padding query slots form dummy sequences with no keys, whose output the op defines as 0.
        cu_q = append_spare_sequences(cu_q, cu_q[-1], capacity, batch.max_seqlen)
        num_dummy = cu_q.shape[0] - starts.shape[0]
        cu_k = torch.cat([starts, starts.new_full((num_dummy,), total)]).to(torch.int32)
        return cu_q, cu_k

    # ---- checkpoints (HuggingFace BertForMaskedLM layout) ----
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        if self.head is None:
            raise RuntimeError("this MaskedLM's head was dropped; save the Encoder drop_head returned")
        checkpoint.save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        **kwargs) -> "MaskedLM":
        """Load a BertForMaskedLM (or BertModel: the head starts fresh) checkpoint; kwargs go to __init__."""
        return checkpoint.load_pretrained(cls, directory, dtype=dtype, **kwargs)
