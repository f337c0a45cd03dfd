"""Gradient checkpointing: the same step bit for bit, with only the layer inputs kept."""
from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint

from fastmlm import MaskedLM, SequenceClassifier
from fastmlm.config import EncoderConfig
from tests.memory_timeline import cpu_timeline, memory_from_timeline

CONFIG = EncoderConfig(vocab_size=90, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64,
                       max_position_embeddings=32, hidden_dropout=0.1, attention_dropout=0.1)


def batch(seed=0, batch_size=3, seq=12):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, CONFIG.vocab_size, (batch_size, seq), generator=gen)
    mask = torch.ones(batch_size, seq, dtype=torch.int64)
    mask[1, 5:] = 0
    labels = torch.where(torch.rand(batch_size, seq, generator=gen) < 0.3, ids, -100).masked_fill(mask == 0, -100)
    labels[0, 0] = ids[0, 0]  # at least one label
    return ids, mask, labels


def step(model_fn, checkpoint_kwargs, inputs):
    """(loss, gradients) of one training step with dropout on, torch's generator at a fixed state."""
    torch.manual_seed(0)
    model = model_fn().train()
    if checkpoint_kwargs is not None:
        model.gradient_checkpointing_enable(checkpoint_kwargs)
        assert model.is_gradient_checkpointing
    torch.manual_seed(1)
    loss = model(*inputs).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kwargs", [{}, {"use_reentrant": True}], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("model", ["mlm", "mlm_last_layer_subset", "causal", "classifier"])
def test_checkpointed_step_equals_the_plain_one(model, kwargs):
    # The recomputation sees the forward's dropout masks (hidden: the restored generator;
    # attention: the seed drawn outside the checkpoint), so everything agrees bit for bit.
    ids, mask, labels = batch()
    if model == "classifier":
        model_fn = lambda: SequenceClassifier(MaskedLM(CONFIG).encoder, num_labels=3)  # noqa: E731
        inputs = (ids, mask, None, torch.tensor([0, 2, 1]))
    else:
        options = {"mlm": {}, "mlm_last_layer_subset": {"last_layer_subset": True},
                   "causal": {"objective": "causal"}}[model]
        model_fn = lambda: MaskedLM(CONFIG, **options)  # noqa: E731
        inputs = (ids, mask, None, None if model == "causal" else labels)
    plain_loss, plain_grads = step(model_fn, None, inputs)
    loss, grads = step(model_fn, kwargs, inputs)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys() and len(grads) > 10
    for name in grads:
        assert torch.equal(grads[name], plain_grads[name]), name


def test_checkpointing_keeps_only_the_layer_inputs():
    # What a forward leaves allocated for the backward: every layer's activations
    # without checkpointing, about the layers' inputs with it.
    config = EncoderConfig(**{**CONFIG.__dict__, "hidden_size": 64, "intermediate_size": 256, "num_layers": 4,
                              "max_position_embeddings": 64, "attention_dropout": 0.0})
    ids = torch.randint(5, config.vocab_size, (8, 64))
    labels = torch.where(torch.rand(8, 64) < 0.15, ids, -100)
    labels[0, 0] = ids[0, 0]
    kept = {}
    for checkpointing in (False, True):
        model = MaskedLM(config).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        out, timeline = cpu_timeline(lambda: model(ids, labels=labels))
        kept[checkpointing] = memory_from_timeline(timeline)[1]
        out.loss.backward()
    layer_inputs = 4 * 8 * 64 * 64 * 4  # bytes: num_layers x tokens x hidden, fp32
    assert kept[True] < 0.25 * kept[False], kept
    assert kept[True] < 3 * layer_inputs, kept


def test_checkpointing_only_while_training_with_grad(monkeypatch):
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    model = MaskedLM(CONFIG)
    model.gradient_checkpointing_enable()
    ids, mask, labels = batch()
    model.eval()(ids, mask, labels=labels)
    with torch.no_grad():
        model.train()(ids, mask, labels=labels)
    assert not calls
    model.train()(ids, mask, labels=labels)
    assert len(calls) == CONFIG.num_layers
    model.gradient_checkpointing_disable()
    model(ids, mask, labels=labels)
    assert len(calls) == CONFIG.num_layers and not model.is_gradient_checkpointing


def test_checkpointing_options_are_checked():
    model = MaskedLM(CONFIG)
    with pytest.raises(ValueError, match="unsupported \\['context_fn'\\]"):
        model.gradient_checkpointing_enable({"context_fn": None})
    with pytest.raises(ValueError, match="preserve_rng_state=False would recompute hidden dropout"):
        model.gradient_checkpointing_enable({"preserve_rng_state": False})
    assert not model.is_gradient_checkpointing
    without_dropout = MaskedLM(EncoderConfig(**{**CONFIG.__dict__, "hidden_dropout": 0.0}))
    without_dropout.gradient_checkpointing_enable({"preserve_rng_state": False})  # nothing to reproduce
    assert without_dropout.is_gradient_checkpointing


def test_attention_dropout_is_reproduced_without_the_generator_state():
    # preserve_rng_state=False (allowed without hidden dropout): the attention-dropout
    # seed is drawn outside the checkpoint, so the recomputation still uses the forward's masks.
    config = EncoderConfig(**{**CONFIG.__dict__, "hidden_dropout": 0.0})
    ids, mask, labels = batch()
    plain_loss, plain_grads = step(lambda: MaskedLM(config), None, (ids, mask, None, labels))
    loss, grads = step(lambda: MaskedLM(config), {"preserve_rng_state": False}, (ids, mask, None, labels))
    assert torch.equal(loss, plain_loss)
    for name in grads:
        assert torch.equal(grads[name], plain_grads[name]), name
