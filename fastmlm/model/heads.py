"""Downstream heads on an Encoder: sequence and token classification, as BERT's.

    clf = SequenceClassifier(encoder, num_labels=3)            # pooling="cls" or "mean"
    out = clf(input_ids, attention_mask, token_type_ids, labels=labels)
    out.logits [B, num_labels], out.loss

    tok = TokenClassifier(encoder, num_labels=9)
    out = tok(input_ids, attention_mask, labels=labels)       # labels -100 where ignored
    out.logits [B, S, num_labels] (0 at padding), out.loss

Both run the encoder on packed tokens (padding is never computed) and accept
packed input too (`cu_seqlens=`, `max_seqlen=`; logits then [num_sequences, L]
or [T, L]).

Semantics follow transformers' BertForSequenceClassification and
BertForTokenClassification, with these documented differences:
- "cls" pooling reads the first *real* token of each sequence. HuggingFace
  reads column 0, which under left padding is a padding position; with
  right padding (the BERT tokenizer's default) the two agree.
- Token logits at padding positions are 0 (fastmlm computes no hidden state
  there); labels must be -100 at padding (HuggingFace would score those).
- A batch where every label is -100 has loss 0 (HuggingFace: NaN).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastmlm.model.activation_checkpointing import ActivationCheckpointing
from fastmlm.model.encoder import Encoder
from fastmlm.model.outputs import IndexableOutput
from fastmlm.model.packing import IGNORE_INDEX, PackedBatch
from fastmlm.ops.checks import value_checks_enabled

POOLINGS = ("cls", "mean")


@dataclass
class ClassifierOutput(IndexableOutput):
    """logits: [B, num_labels] (sequence) or [B, S, num_labels] / [T, num_labels] (token);
    loss: 0-d fp32 when labels were given, else None. Indexes as HuggingFace's output:
    (loss, logits) with labels, (logits,) without."""

    TUPLE_FIELDS = ("loss", "logits")
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None


def _check_head_args(encoder, num_labels, classifier_dropout) -> float:
    if not isinstance(encoder, Encoder):
        hint = " (for a MaskedLM pass model.encoder or model.drop_head())" if hasattr(encoder, "encoder") else ""
        raise TypeError(f"encoder must be a fastmlm Encoder, got {type(encoder).__name__}{hint}")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    if classifier_dropout is None:  # the config's, as HF's classification heads read it
        classifier_dropout = encoder.config.classifier_dropout
    p = encoder.config.hidden_dropout if classifier_dropout is None else classifier_dropout
    if not 0.0 <= p < 1.0:
        raise ValueError(f"classifier_dropout must be in [0, 1), got {p!r}")
    return p


def _classifier(hidden_size: int, num_labels: int, std: float) -> nn.Linear:
    linear = nn.Linear(hidden_size, num_labels)
    nn.init.normal_(linear.weight, std=std)  # BERT's initialisation
    nn.init.zeros_(linear.bias)
    return linear


def _num_sequences(batch: PackedBatch) -> int:
    """Real sequences: the padded batch's rows (spare capacity sequences follow them), or all given."""
    return batch.padded_shape[0] if batch.padded_shape is not None else batch.cu_seqlens.shape[0] - 1


def _check_nonempty(batch: PackedBatch, n: int) -> None:
    if value_checks_enabled(batch.cu_seqlens):
        lengths = batch.cu_seqlens[1: n + 1] - batch.cu_seqlens[:n]
        if bool((lengths == 0).any()):
            b = int(torch.nonzero(lengths == 0)[0])
            raise ValueError(f"sequence {b} has no real token (attention_mask all 0): there is nothing to pool")


def mean_over_sequences(hidden: torch.Tensor, batch: PackedBatch, n: int) -> torch.Tensor:
    """Mean of the packed rows of each of the first n sequences -> [n, H].

    The rows are scattered into a zero-padded [n, max_seqlen, H] view (unique
    targets, so it is deterministic and its backward is a gather) and summed;
    rows of later (spare) sequences go to a trash row.
    """
    total, width = hidden.shape
    cu = batch.cu_seqlens.to(torch.int64)
    rows = torch.arange(total, device=hidden.device)
    sequence = torch.searchsorted(cu[1:], rows, right=True)
    position = rows - cu[sequence.clamp(max=cu.shape[0] - 2)]
    seq = batch.max_seqlen
    target = torch.where(sequence < n, sequence * seq + position, n * seq)
    padded = hidden.new_zeros(n * seq + 1, width).index_put((target,), hidden)
    sums = padded[: n * seq].view(n, seq, width).sum(dim=1)
    lengths = (cu[1: n + 1] - cu[:n]).clamp(min=1)
    return sums / lengths.unsqueeze(1).to(sums.dtype)


class SequenceClassifier(ActivationCheckpointing, nn.Module):
    def __init__(self, encoder: Encoder, num_labels: int, pooling: str = "cls", *,
                 classifier_dropout: Optional[float] = None):
        """pooling="cls": the [CLS] (first) token, through BERT's pooler (dense + tanh) when the
        encoder has one; "mean": the mean over real tokens. Dropout defaults to the config's
        classifier_dropout, else its hidden_dropout (as HuggingFace's heads)."""
        super().__init__()
        self.dropout = _check_head_args(encoder, num_labels, classifier_dropout)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.encoder = encoder
        self.num_labels = num_labels
        self.pooling = pooling
        if pooling == "cls" and encoder.pooler is not None:
            # A MaskedLM's encoder (model.encoder) keeps its pooler frozen while the MLM leaves it unused.
            encoder.pooler.mark_used()
        self.classifier = _classifier(encoder.config.hidden_size, num_labels, encoder.config.initializer_range)

    def pool(self, batch: PackedBatch) -> torch.Tensor:
        """[num_sequences, H]: the pooled (pre-dropout) representation of each sequence."""
        n = _num_sequences(batch)
        _check_nonempty(batch, n)
        if self.pooling == "mean":
            return mean_over_sequences(self.encoder.run(batch), batch, n)
        # Only the [CLS] rows are read: the last layer computes queries, attention
        # output and feed-forward for those n rows alone (keys/values for all).
        first_rows = batch.cu_seqlens[:n].to(torch.int64).clamp(max=max(batch.num_rows - 1, 0))
        cu_q = torch.arange(n + 1, device=first_rows.device, dtype=torch.int32)
        num_spare = batch.cu_seqlens.shape[0] - 1 - n
        if num_spare:
            # Spare capacity sequences get empty query groups, so both cu_seqlens count alike.
            cu_q = torch.cat([cu_q, cu_q.new_full((num_spare,), n)])
        first = self.encoder.run(batch, last_layer_query_rows=first_rows, cu_seqlens_q=cu_q, max_seqlen_q=1,
                                 cu_seqlens_k=batch.cu_seqlens)
        pooler = self.encoder.pooler
        return first if pooler is None else pooler(first)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None, *,
                cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None) -> ClassifierOutput:
        """labels [B]: class ids (-100 ignored) -> cross-entropy; num_labels == 1: float targets -> MSE;
        float [B, num_labels] -> binary cross-entropy per label (HuggingFace's problem types)."""
        batch = self.encoder.pack(input_ids, attention_mask, token_type_ids, cu_seqlens=cu_seqlens,
                                  max_seqlen=max_seqlen)
        if labels is not None:  # before the encoder runs
            self.check_labels(labels, _num_sequences(batch), input_ids.device)
        pooled = F.dropout(self.pool(batch), self.dropout, self.training)
        logits = self.classifier(pooled)
        return ClassifierOutput(logits=logits, loss=None if labels is None else self._checked_loss(logits, labels))

    def check_labels(self, labels: torch.Tensor, n: int, device: torch.device) -> None:
        """Labels for n sequences, in one of the three forms `forward` describes."""
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.device != device:
            raise ValueError(f"labels are on {labels.device} but the inputs on {device}")
        if self.num_labels == 1:  # regression
            if labels.numel() != n:
                raise ValueError(f"regression labels need {n} values (one per sequence), got shape {tuple(labels.shape)}")
        elif labels.is_floating_point():  # multi-label
            if labels.shape != (n, self.num_labels):
                raise ValueError(f"multi-label (float) labels must have shape {(n, self.num_labels)}, "
                                 f"got {tuple(labels.shape)}")
        else:
            if labels.dtype == torch.bool or labels.shape != (n,):
                raise ValueError(f"class labels must be an integer tensor of shape ({n},), got {labels.dtype} "
                                 f"{tuple(labels.shape)}")
            _check_class_labels(labels, self.num_labels)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_labels(labels, logits.shape[0], logits.device)
        return self._checked_loss(logits, labels)

    def _checked_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.num_labels == 1:  # regression
            return F.mse_loss(logits.float().view(-1), labels.float().view(-1))
        if labels.is_floating_point():  # multi-label
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        labels = labels.long()
        # A sum over a clamped count, as TokenClassifier: every label -100 gives 0, not NaN.
        total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def _check_class_labels(labels: torch.Tensor, num_labels: int) -> None:
    if labels.numel() and value_checks_enabled(labels):
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_labels))
        if bool(bad.any()):
            raise ValueError(f"labels must be -100 or in [0, {num_labels}), got {int(labels[bad][0])}")


class TokenClassifier(ActivationCheckpointing, nn.Module):
    def __init__(self, encoder: Encoder, num_labels: int, *, classifier_dropout: Optional[float] = None):
        super().__init__()
        self.dropout = _check_head_args(encoder, num_labels, classifier_dropout)
        self.encoder = encoder
        self.num_labels = num_labels
        self.classifier = _classifier(encoder.config.hidden_size, num_labels, encoder.config.initializer_range)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None, *,
                cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None) -> ClassifierOutput:
        """labels: input_ids' shape, class ids or -100 (ignored; required at padding).
        Loss: mean cross-entropy over labelled tokens, as BertForTokenClassification."""
        batch = self.encoder.pack(input_ids, attention_mask, token_type_ids, cu_seqlens=cu_seqlens,
                                  max_seqlen=max_seqlen)
        if labels is not None:
            _check_token_labels(labels, input_ids, attention_mask, self.num_labels)
        hidden = F.dropout(self.encoder.run(batch), self.dropout, self.training)
        logits = self.classifier(hidden)  # [T, num_labels]: real tokens only
        loss = None
        if labels is not None:
            targets = batch.gather(labels.long(), IGNORE_INDEX)
            total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
            loss = total / (targets != IGNORE_INDEX).sum().clamp(min=1)
        return ClassifierOutput(logits=batch.repad(logits), loss=loss)


def _check_token_labels(labels, input_ids, attention_mask, num_labels: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"token labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != input_ids.shape or labels.device != input_ids.device:
        raise ValueError(f"labels ({tuple(labels.shape)} on {labels.device}) must match input_ids "
                         f"({tuple(input_ids.shape)} on {input_ids.device})")
    _check_class_labels(labels, num_labels)
    if attention_mask is not None and labels.numel() and value_checks_enabled(labels):
        if bool(((labels != IGNORE_INDEX) & (attention_mask == 0)).any()):
            raise ValueError("labels name padding positions (attention_mask 0); set them to -100")
