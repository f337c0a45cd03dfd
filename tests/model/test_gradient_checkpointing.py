"""Activation (gradient) checkpointing: the same step, with only the layer inputs kept."""
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


def step(model_fn, checkpoint_kwargs, inputs, device="cpu", **options):
    """(loss, gradients) of one training step with dropout on, torch's generator at a fixed state."""
    torch.manual_seed(0)
    model = model_fn().to(device).train()
    if checkpoint_kwargs is not None:
        model.activation_checkpointing_enable(checkpoint_kwargs, **options)
        assert model.is_activation_checkpointing and model.is_gradient_checkpointing
    torch.manual_seed(1)
    inputs = [t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs]
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
    with pytest.raises(ValueError, match="unsupported checkpoint arguments \\['context_fn'\\]"):
        model.gradient_checkpointing_enable({"context_fn": None})
    for falsy in (False, 0):
        with pytest.raises(ValueError, match="preserve_rng_state=False would recompute hidden dropout"):
            model.gradient_checkpointing_enable({"preserve_rng_state": falsy})
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every_n_layers must be a positive int"):
            model.activation_checkpointing_enable(every_n_layers=bad)
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


@pytest.mark.parametrize("options", [{"every_n_layers": 2}, {"offload": True}], ids=["every_2nd_layer", "offload"])
def test_huggingface_options_give_the_same_step(options):
    ids, mask, labels = batch()
    model_fn = lambda: MaskedLM(CONFIG, last_layer_subset=True)  # noqa: E731
    plain_loss, plain_grads = step(model_fn, None, (ids, mask, None, labels))
    loss, grads = step(model_fn, {}, (ids, mask, None, labels), **options)
    assert torch.equal(loss, plain_loss)
    for name in grads:
        assert torch.equal(grads[name], plain_grads[name]), name


def test_every_n_layers_checkpoints_those_layers(monkeypatch):
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    config = EncoderConfig(**{**CONFIG.__dict__, "num_layers": 5})
    model = MaskedLM(config).train()
    model.activation_checkpointing_enable(every_n_layers=2)  # layers 0, 2, 4, as HuggingFace counts
    ids, mask, labels = batch()
    model(ids, mask, labels=labels)
    assert len(calls) == 3


def test_the_call_huggingface_trainer_makes():
    # transformers 5's Trainer calls activation_checkpointing_enable(kwargs, every_n_layers, offload);
    # models with only the older name get gradient_checkpointing_enable with the same keywords.
    model = MaskedLM(CONFIG)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=None, every_n_layers=1, offload=False)
    assert model.encoder.checkpoint_plan.kwargs == {"use_reentrant": False}
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True}, every_n_layers=1,
                                       offload=False)
    assert model.encoder.checkpoint_plan.reentrant and model.is_gradient_checkpointing
    encoder = model.drop_head()
    assert encoder.is_activation_checkpointing


def test_reentrant_checkpointing_with_frozen_embeddings_keeps_the_layer_gradients():
    # A reentrant checkpoint of an input that needs no gradient would return an output
    # without a graph; the layers' gradients must still arrive.
    ids, mask, labels = batch()
    grads = {}
    for kwargs in (None, {"use_reentrant": True}):
        torch.manual_seed(0)
        model = MaskedLM(CONFIG).train()
        model.encoder.embeddings.requires_grad_(False)
        if kwargs is not None:
            model.activation_checkpointing_enable(kwargs)
        torch.manual_seed(1)
        model(ids, mask, labels=labels).loss.backward()
        grads[kwargs is None] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any(name.startswith("encoder.layers.") for name in grads[True])
    assert grads[False].keys() == grads[True].keys()
    for name in grads[True]:
        assert torch.equal(grads[False][name], grads[True][name]), name


def test_an_encoder_from_before_the_option_still_runs():
    # Checkpointing state is a class default: an Encoder unpickled from an older
    # version (no instance attribute) runs without it.
    encoder = MaskedLM(CONFIG).encoder
    encoder.__dict__.pop("checkpoint_plan", None)
    assert not encoder.is_activation_checkpointing
    ids, mask, _ = batch()
    encoder.train()(ids, mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("options", [{}, {"offload": True}], ids=["on_device", "offload"])
def test_checkpointed_step_on_cuda(options):
    # On a GPU the backward kernels may add in any order: close, not bit-equal. The attention
    # seed is drawn on the device, and CUDA's generator state is restored for hidden dropout.
    ids, mask, labels = batch()
    model_fn = lambda: MaskedLM(CONFIG, last_layer_subset=True)  # noqa: E731
    plain_loss, plain_grads = step(model_fn, None, (ids, mask, None, labels), device="cuda")
    loss, grads = step(model_fn, {}, (ids, mask, None, labels), device="cuda", **options)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
