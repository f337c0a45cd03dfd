"""`patch_hf`: fastmlm's computation inside an existing transformers BERT model, in place.

    model = transformers.BertForMaskedLM.from_pretrained(...)
    fastmlm.patch_hf(model)        # one line; the training script stays as it is
    loss = model(input_ids, attention_mask, labels=labels).loss

The model keeps its modules, its Parameter objects (an optimizer built before
patching keeps working), its state_dict keys and its output classes. Only
`forward` changes (an attribute on the instance; `unpatch_hf` deletes it):
padded input is unpacked once before the embedding, attention is fastmlm's
packed `attention` op, and BertForMaskedLM's loss is the sparse fused
`mlm_head` on labelled rows only. Every other step calls the HuggingFace
submodule itself (Linear, LayerNorm, Dropout, activation) on packed rows, so
the weights read and the semantics are HuggingFace's own.

Outputs, and where they differ from HuggingFace's (never silently elsewhere):
- BertModel: `last_hidden_state` [B, S, H] with zeros at padding positions
  (HuggingFace fills them with hidden states no loss should read);
  `pooler_output` as HuggingFace (column 0 through the pooler); a batch whose
  column 0 is padding (left padding) is an error when the model has a pooler.
- BertForMaskedLM with `labels`: `loss` from the fused head and `logits=None`
  (computing [B, S, vocab] logits is what the sparse head avoids). Pass
  `output_logits=True` (per call, or to `patch_hf` as the default) to get them:
  then [B, S, vocab] with zeros at padding, and the loss from those logits.
  Without labels: logits as HuggingFace (zeros at padding), loss None.
  `return_dict=False` gives `ModelOutput.to_tuple()`, HuggingFace's rule:
  (loss,) or (loss, logits) or (logits,), then hidden states if asked for.
- A batch with no labelled position has loss 0 (HuggingFace: NaN). Labels at
  padding positions are an error (HuggingFace would score them).
- `num_items_in_batch` (HuggingFace's Trainer passes it under gradient
  accumulation, because BertForMaskedLM.forward takes **kwargs) divides the
  summed loss, so accumulated gradients are the whole step's mean. HuggingFace's
  BertForMaskedLM (transformers 5.24) ignores it while the Trainer skips its own
  division by the accumulation steps: with N > 1 steps its loss and gradients are
  about N times too large (transformers issue #47688). Without gradient
  accumulation the count is the batch's own and both agree.
- `output_hidden_states=True`: the embedding output and every layer's, padded
  as `last_hidden_state`.

Unsupported (an error, at patch or call time): decoders and cross-attention,
relative position embeddings, `output_attentions`, `head_mask`,
`past_key_values`/`cache`, `encoder_hidden_states`, `inputs_embeds`,
subclasses that override `forward`. Pickling the whole patched model
(`torch.save(model)`) is not supported: save its state_dict, or unpatch
first. Arguments after `position_ids` are
keyword-only (their positional order differs between transformers versions).
Gradient checkpointing (`model.gradient_checkpointing_enable()`) is honoured
per layer with the attention-dropout seed drawn outside the checkpoint, so the
recomputation sees the same dropout.
"""
from __future__ import annotations

import dataclasses
import functools
import types

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from fastmlm.config import EncoderConfig
from fastmlm.model.inputs import check_encoder_inputs
from fastmlm.model.item_count import ItemCount, check_item_count, divide_by_item_count
from fastmlm.model.layer import dropout_seed
from fastmlm.model.packing import IGNORE_INDEX, PackedBatch, unpad
from fastmlm.ops import attention, gather_rows, masked_positions, mlm_cross_entropy, mlm_head
from fastmlm.ops.checks import check_index_range, no_value_checks, value_checks_enabled

_MARK = "_fastmlm_patch"
# Keyword arguments HuggingFace's BertModel accepts and ignores (it computes no loss).
_IGNORED_KWARGS = ("num_items_in_batch",)


@dataclasses.dataclass
class _Patch:
    config: EncoderConfig  # for the input checks; sizes refreshed from the modules each call
    output_logits: bool
    patched: list  # modules whose instance `forward` this patch set


def _transformers_bert():
    try:
        from transformers import BertForMaskedLM, BertModel
    except ImportError as e:  # pragma: no cover - transformers is a test dependency
        raise ImportError("fastmlm.patch_hf needs the transformers package") from e
    return BertModel, BertForMaskedLM


def patch_hf(model, *, output_logits: bool = False):
    """Make a transformers BertForMaskedLM or BertModel compute with fastmlm, in place; returns it.

    output_logits: default for BertForMaskedLM calls with labels (see the module docstring).
    A second call is a no-op; `unpatch_hf` restores the original forward.
    """
    if getattr(model, _MARK, None) is not None:
        return model
    BertModel, BertForMaskedLM = _transformers_bert()
    if isinstance(model, BertForMaskedLM):
        kind, bert, base = "masked_lm", model.bert, BertForMaskedLM
    elif isinstance(model, BertModel):
        kind, bert, base = "model", model, BertModel
    else:
        raise TypeError(f"patch_hf takes a transformers BertForMaskedLM or BertModel, got {type(model).__name__}")
    if type(model).forward is not base.forward:
        raise TypeError(f"{type(model).__name__} overrides {base.__name__}.forward; patch_hf would drop that code")
    config = _check_supported(model, bert)
    patch = _Patch(config, bool(output_logits), [model])
    model.forward = types.MethodType(_masked_lm_forward if kind == "masked_lm" else _bert_model_forward, model)
    if kind == "masked_lm" and getattr(bert, _MARK, None) is None and type(bert).forward is BertModel.forward:
        bert.forward = types.MethodType(_bert_model_forward, bert)  # model.bert(...) is fast too
        object.__setattr__(bert, _MARK, _Patch(config, False, [bert]))
        patch.patched.append(bert)
    object.__setattr__(model, _MARK, patch)
    return model


def unpatch_hf(model):
    """Undo `patch_hf` (a no-op on a model that is not patched); returns the model."""
    patch = getattr(model, _MARK, None)
    if patch is None:
        return model
    for module in patch.patched:
        module.__dict__.pop("forward", None)
        module.__dict__.pop(_MARK, None)
    return model


def _check_supported(model, bert) -> EncoderConfig:
    hf = model.config.to_dict()
    # The activation is whatever HuggingFace's own modules compute (we call them); the
    # EncoderConfig here only drives the input checks, so its activation is irrelevant.
    hf.pop("hidden_act", None)
    try:
        config = EncoderConfig.from_hf(hf)
    except ValueError as e:
        raise ValueError(f"patch_hf: this {type(model).__name__} is not supported: {e}") from None
    for i, layer in enumerate(bert.encoder.layer):
        attn = layer.attention.self
        if hasattr(layer, "crossattention") or getattr(layer, "is_decoder", False):
            raise ValueError(f"patch_hf: layer {i} is a decoder layer (cross-attention / causal): not supported")
        if getattr(attn, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"patch_hf: layer {i} uses {attn.position_embedding_type!r} position embeddings: "
                             "not supported")
        for name in ("query", "key", "value"):
            if not isinstance(getattr(attn, name, None), torch.nn.Linear):
                raise TypeError(f"patch_hf: layer {i} attention.self.{name} is not an nn.Linear")
    return config


def _reject(**unsupported) -> None:
    for name, value in unsupported.items():
        if value is not None and value is not False:
            raise NotImplementedError(f"fastmlm.patch_hf: {name} is not supported by the patched model "
                                      "(fastmlm.hf.unpatch_hf(model) restores HuggingFace's forward)")


def _check_kwargs(kwargs: dict) -> None:
    unknown = [k for k in kwargs if k not in _IGNORED_KWARGS]
    if unknown:
        raise TypeError(f"fastmlm.patch_hf: the patched forward does not support the argument(s) {unknown}")


def _resolve(value, config, name: str, default=False):
    return value if value is not None else getattr(config, name, default)


# ---- the computation ----

def _pack(bert, patch: _Patch, input_ids, attention_mask, token_type_ids, position_ids, labels) -> PackedBatch:
    emb = bert.embeddings
    config = dataclasses.replace(patch.config, vocab_size=emb.word_embeddings.num_embeddings,
                                 type_vocab_size=emb.token_type_embeddings.num_embeddings,
                                 max_position_embeddings=emb.position_embeddings.num_embeddings)
    if input_ids is None:
        raise ValueError("fastmlm.patch_hf: input_ids are required (inputs_embeds is not supported)")
    input_ids, attention_mask, token_type_ids, _ = check_encoder_inputs(
        config, input_ids, attention_mask, token_type_ids, None, None, labels, None)
    if position_ids is not None:  # checked before anything runs, as the other inputs
        if (not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in (torch.int32, torch.int64)
                or position_ids.dim() not in (1, 2) or position_ids.shape[-1] != input_ids.shape[1]
                or (position_ids.dim() == 2 and position_ids.shape[0] not in (1, input_ids.shape[0]))):
            raise ValueError(f"position_ids must be an int32/int64 [batch, seq] or [seq] tensor matching input_ids "
                             f"{tuple(input_ids.shape)}, got {getattr(position_ids, 'dtype', type(position_ids))} "
                             f"{tuple(getattr(position_ids, 'shape', ()))}")
        if position_ids.device != input_ids.device:
            raise ValueError(f"position_ids is on {position_ids.device} but input_ids is on {input_ids.device}")
        check_index_range("position_ids", position_ids, config.max_position_embeddings,
                          what="position embeddings")
    batch = unpad(input_ids, attention_mask, token_type_ids)
    if position_ids is not None:
        batch.position_ids = position_ids.expand(input_ids.shape).reshape(-1)[batch.index]
    return batch


def _attention_block(layer, x, batch: PackedBatch, seed: int):
    attn = layer.attention.self
    heads, head_dim = attn.num_attention_heads, attn.attention_head_size
    q = attn.query(x).view(-1, heads, head_dim)
    k = attn.key(x).view(-1, heads, head_dim)
    v = attn.value(x).view(-1, heads, head_dim)
    p = attn.dropout.p if attn.training else 0.0
    a = attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, dropout_p=p, seed=seed)
    x = layer.attention.output(a.reshape(-1, heads * head_dim), x)  # dense, dropout, LayerNorm(+ residual)
    return layer.output(layer.intermediate(x), x)  # dense + act; dense, dropout, LayerNorm(+ residual)


def _checkpoint_function(bert, layer):
    """HuggingFace's checkpoint function when gradient checkpointing is on for this layer, else None."""
    if not bert.training:
        return None
    # Recent transformers flag each layer (every_n_layers), older ones the encoder.
    for owner in (layer, bert.encoder):
        if getattr(owner, "gradient_checkpointing", False):
            return getattr(owner, "_gradient_checkpointing_func", None) or functools.partial(
                torch.utils.checkpoint.checkpoint, use_reentrant=False)
    return None


def _encode(bert, batch: PackedBatch, keep_all: bool):
    """Packed last hidden state [T, H] and, with keep_all, every layer's (embedding output first)."""
    emb = bert.embeddings
    # BERT's order of the sums, so fp32 results match to the last bits.
    x = emb.word_embeddings(batch.input_ids) + emb.token_type_embeddings(batch.token_type_ids)
    x = emb.dropout(emb.LayerNorm(x + emb.position_embeddings(batch.position_ids)))
    states = [x] if keep_all else None
    # cu_seqlens come from unpad: no need to re-read them from the device in every layer.
    with no_value_checks():
        for layer in bert.encoder.layer:
            attn = layer.attention.self
            # Drawn outside the checkpoint, so the recomputation reuses it even with preserve_rng_state=False.
            seed = dropout_seed(attn.dropout.p, attn.training, x.device)
            checkpoint = _checkpoint_function(bert, layer)
            if checkpoint is not None:
                x = checkpoint(_attention_block, layer, x, batch, seed)
            else:
                x = _attention_block(layer, x, batch, seed)
            if keep_all:
                states.append(x)
    return x, states


def _bert_model_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
                        inputs_embeds=None, encoder_hidden_states=None, encoder_attention_mask=None,
                        head_mask=None, past_key_values=None, cache=None, use_cache=None,
                        output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    patch: _Patch = getattr(self, _MARK)
    _check_kwargs(kwargs)
    _reject(inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask, head_mask=head_mask, past_key_values=past_key_values,
            cache=cache, output_attentions=_resolve(output_attentions, self.config, "output_attentions"))
    del use_cache  # an encoder never caches (HuggingFace ignores use_cache for non-decoders too)
    keep_all = bool(_resolve(output_hidden_states, self.config, "output_hidden_states"))
    batch = _pack(self, patch, input_ids, attention_mask, token_type_ids, position_ids, None)
    hidden, states = _encode(self, batch, keep_all)
    last = batch.repad(hidden)
    pooled = None
    if self.pooler is not None:
        _check_column_zero_is_real(attention_mask)
        pooled = self.pooler(last)
    out = BaseModelOutputWithPoolingAndCrossAttentions(
        last_hidden_state=last, pooler_output=pooled,
        hidden_states=tuple(batch.repad(s) for s in states) if keep_all else None)
    return out if _resolve(return_dict, self.config, "return_dict", True) else out.to_tuple()


def _check_column_zero_is_real(attention_mask) -> None:
    if attention_mask is not None and attention_mask.numel() and value_checks_enabled(attention_mask):
        if bool((attention_mask[:, 0] == 0).any()):
            raise ValueError("fastmlm.patch_hf: the pooler reads column 0, which is padding in this batch (left "
                             "padding); fastmlm computes nothing at padding. Pad on the right, or set "
                             "model.pooler = None if pooler_output is not used")


def _masked_lm_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
                       labels=None, output_logits=None, inputs_embeds=None, encoder_hidden_states=None,
                       encoder_attention_mask=None, head_mask=None, output_attentions=None,
                       output_hidden_states=None, return_dict=None, num_items_in_batch: ItemCount = None,
                       **kwargs):
    from transformers.modeling_outputs import MaskedLMOutput

    patch: _Patch = getattr(self, _MARK)
    _check_kwargs(kwargs)
    check_item_count(num_items_in_batch)
    _reject(inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask, head_mask=head_mask,
            output_attentions=_resolve(output_attentions, self.config, "output_attentions"))
    keep_all = bool(_resolve(output_hidden_states, self.config, "output_hidden_states"))
    want_logits = labels is None or (patch.output_logits if output_logits is None else bool(output_logits))
    batch = _pack(self.bert, patch, input_ids, attention_mask, token_type_ids, position_ids, labels)
    hidden, states = _encode(self.bert, batch, keep_all)

    loss = logits = None
    if want_logits:
        packed_logits = self.cls(hidden)  # HuggingFace's head on real tokens only
        logits = batch.repad(packed_logits)
        if labels is not None:
            targets = batch.gather(labels.to(torch.int64), IGNORE_INDEX)
            loss = F.cross_entropy(packed_logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
            if num_items_in_batch is None:
                loss = loss / (targets != IGNORE_INDEX).sum().clamp(min=1)
    else:
        targets = batch.gather(labels.to(torch.int64), IGNORE_INDEX)
        rows, _ = masked_positions(targets)
        loss = _sparse_loss(self, hidden, rows, targets[rows], "mean" if num_items_in_batch is None else "sum")
    if loss is not None and num_items_in_batch is not None:  # the loss above is a sum
        loss = divide_by_item_count(loss, num_items_in_batch)
    out = MaskedLMOutput(loss=loss, logits=logits,
                         hidden_states=tuple(batch.repad(s) for s in states) if keep_all else None)
    return out if _resolve(return_dict, self.config, "return_dict", True) else out.to_tuple()


def _sparse_loss(model, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                 reduction: str) -> torch.Tensor:
    """MLM cross-entropy (mean or sum) of the labelled rows, never forming logits for the others."""
    predictions = model.cls.predictions
    transform, decoder = predictions.transform, predictions.decoder
    bias = decoder.bias if decoder.bias is not None else predictions.bias
    if model.config.hidden_act == "gelu":  # HuggingFace's "gelu" is the erf GELU the fused head computes
        return mlm_head(hidden, rows, transform.dense.weight, transform.dense.bias, transform.LayerNorm.weight,
                        transform.LayerNorm.bias, decoder.weight, bias, targets,
                        layer_norm_eps=transform.LayerNorm.eps, reduction=reduction)
    x = transform(gather_rows(hidden, rows))  # HuggingFace's own activation, on the labelled rows
    # Under autocast x, weight and bias are fp32 and the loss op's autocast rule casts all three.
    return mlm_cross_entropy(x, decoder.weight, targets, bias, reduction=reduction)
