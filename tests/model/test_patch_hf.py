"""fastmlm.patch_hf: a transformers BERT computing with fastmlm in place, at MaskedLM's parity bar.

A deep copy taken before patching is the reference: identical weights, fp32,
dropout 0; hidden states at real tokens, loss, logits and every parameter
gradient within relative norm error 1e-4 (2e-3 with the patched model on CUDA).
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

import fastmlm
from fastmlm.hf import unpatch_hf
from tests.model.helpers import (
    TOLERANCE,
    check,
    IGNORE_INDEX,
    PARITY_TOLERANCE,
    hf_twin,
    padded_batch,
    random_labels,
    relative_error,
    tiny_config,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def patched_pair(cls, config, seed, device, attn_implementation="eager", **kwargs):
    """(patched model on device, unpatched reference on the CPU) with the same weights."""
    reference = hf_twin(cls, config, seed, attn_implementation, **kwargs)
    model = fastmlm.patch_hf(copy.deepcopy(reference).to(device))
    return model, reference


def check_all_grads(model, reference, device):
    params = dict(reference.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        expected = params[name].grad
        if expected is None:
            assert p.grad is None or p.grad.abs().max() == 0, f"{name} has a gradient HuggingFace lacks"
            continue
        assert p.grad is not None, f"no gradient for {name}"
        if name.endswith("attention.self.key.bias"):
            # Zero in exact arithmetic (softmax ignores a per-query constant): rounding noise on both sides.
            scale = params[name[: -len("bias")] + "weight"].grad.norm()
            assert p.grad.norm().cpu() <= TOLERANCE[device] * scale, f"grad {name} is not ~0"
        else:
            check(p.grad, expected, f"grad {name}", device)
        checked += 1
    assert checked == sum(p.grad is not None for p in params.values()) > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [30, 31, 32, 33])
def test_masked_lm_loss_and_every_gradient(seed, device):
    config = tiny_config(seed)
    model, reference = patched_pair(transformers.BertForMaskedLM, config, seed, device,
                                    "sdpa" if seed % 2 else "eager")
    ids, mask, types = padded_batch(config, seed, batch=4, seq=min(12, config.max_position_embeddings))
    labels = random_labels(ids, mask, seed)

    expected = reference(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    actual = model(input_ids=ids.to(device), attention_mask=mask.to(device), token_type_ids=types.to(device),
                   labels=labels.to(device))
    assert isinstance(actual, transformers.modeling_outputs.MaskedLMOutput)
    assert actual.logits is None, "with labels the sparse head returns no logits unless asked"
    check(actual.loss, expected.loss, "loss", device)
    expected.loss.backward()
    actual.loss.backward()
    check_all_grads(model, reference, device)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_lm_logits_on_request_and_without_labels(device):
    seed = 34
    config = tiny_config(seed)
    model, reference = patched_pair(transformers.BertForMaskedLM, config, seed, device)
    ids, mask, types = padded_batch(config, seed, batch=3, seq=10)
    labels = random_labels(ids, mask, seed)
    real = mask.bool()
    args = (ids.to(device), mask.to(device), types.to(device))

    expected = reference(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    actual = model(*args, labels=labels.to(device), output_logits=True)
    check(actual.loss, expected.loss, "loss", device)
    assert actual.logits.shape == expected.logits.shape
    check(actual.logits.cpu()[real], expected.logits[real], "logits at real tokens", device)
    assert (actual.logits.cpu()[~real] == 0).all()
    expected.loss.backward()
    actual.loss.backward()
    check_all_grads(model, reference, device)

    no_labels = model(*args)
    assert no_labels.loss is None
    check(no_labels.logits.cpu()[real], expected.logits[real], "logits without labels", device)
    # Tuples follow HuggingFace's to_tuple(): None fields are left out.
    loss_only = model(*args, labels=labels.to(device), return_dict=False)
    assert len(loss_only) == 1 and torch.allclose(loss_only[0].cpu(), expected.loss.detach(), rtol=1e-4)
    both = model(*args, labels=labels.to(device), output_logits=True, return_dict=False)
    assert len(both) == 2 and both[1].shape == expected.logits.shape
    assert len(model(*args, return_dict=False)) == 1
    with_states = model(*args, output_hidden_states=True)
    hf_states = reference(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    assert len(with_states.hidden_states) == len(hf_states.hidden_states) == config.num_layers + 1
    for i, (a, b) in enumerate(zip(with_states.hidden_states, hf_states.hidden_states)):
        check(a.cpu()[real], b[real], f"hidden state {i}", device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed, pooler", [(35, True), (36, False), (37, True)])
def test_bert_model_hidden_states_pooler_and_gradients(seed, pooler, device):
    config = tiny_config(seed)
    model, reference = patched_pair(transformers.BertModel, config, seed, device,
                                    model_kwargs={"add_pooling_layer": pooler})
    ids, mask, types = padded_batch(config, seed, batch=4, seq=min(11, config.max_position_embeddings))
    real = mask.bool()

    expected = reference(input_ids=ids, attention_mask=mask, token_type_ids=types)
    actual = model(ids.to(device), mask.to(device), types.to(device))
    assert isinstance(actual, transformers.modeling_outputs.BaseModelOutputWithPoolingAndCrossAttentions)
    check(actual.last_hidden_state.cpu()[real], expected.last_hidden_state[real], "hidden states", device)
    assert (actual.last_hidden_state.cpu()[~real] == 0).all()
    projection = torch.randn(expected.last_hidden_state.shape, generator=torch.Generator().manual_seed(seed))
    target = (expected.last_hidden_state[real] * projection[real]).sum()
    mine = (actual.last_hidden_state[real.to(device)] * projection.to(device)[real.to(device)]).sum()
    if pooler:
        check(actual.pooler_output, expected.pooler_output, "pooler output", device)
        target = target + expected.pooler_output.sum()
        mine = mine + actual.pooler_output.sum()
    else:
        assert actual.pooler_output is None
    target.backward()
    mine.backward()
    check_all_grads(model, reference, device)


def test_patch_keeps_parameters_state_dict_and_optimizer():
    config = tiny_config(38)
    model = hf_twin(transformers.BertForMaskedLM, config, 38).train()
    params = list(model.parameters())
    keys = list(model.state_dict().keys())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # built before patching
    ids, mask, types = padded_batch(config, 38, batch=4, seq=10)
    labels = random_labels(ids, mask, 38)

    assert fastmlm.patch_hf(model) is model
    forward = model.forward
    assert fastmlm.patch_hf(model) is model and model.forward == forward, "a second patch is a no-op"
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert list(model.state_dict().keys()) == keys

    before = [p.detach().clone() for p in params]
    losses = []
    for _ in range(5):
        loss = model(ids, mask, types, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert any(not torch.equal(a, b) for a, b in zip(before, params)), "the optimizer moved no parameter"

    model.eval()
    patched = model(ids, mask, types, labels=labels).loss
    assert unpatch_hf(model) is model
    assert "forward" not in model.__dict__ and "forward" not in model.bert.__dict__
    restored = model(ids, mask, types, labels=labels)
    assert restored.logits is not None  # HuggingFace's own forward again
    assert relative_error(patched, restored.loss) < PARITY_TOLERANCE
    assert unpatch_hf(model) is model  # unpatching twice is a no-op


def test_inner_bert_model_is_patched_too():
    config = tiny_config(39)
    model = fastmlm.patch_hf(hf_twin(transformers.BertForMaskedLM, config, 39))
    reference = hf_twin(transformers.BertForMaskedLM, config, 39)
    ids, mask, types = padded_batch(config, 39, batch=3, seq=9)
    real = mask.bool()
    assert "forward" in model.bert.__dict__
    actual = model.bert(ids, mask, types).last_hidden_state
    expected = reference.bert(ids, mask, types).last_hidden_state
    assert relative_error(actual[real], expected[real]) < PARITY_TOLERANCE
    assert (actual[~real] == 0).all()
    positions = torch.arange(9).flip(0)[None]  # explicit position_ids are used as HuggingFace uses them
    actual = model.bert(ids, mask, types, positions).last_hidden_state
    expected = reference.bert(ids, mask, types, positions).last_hidden_state
    assert relative_error(actual[real], expected[real]) < PARITY_TOLERANCE
    # Bad position_ids are refused before anything runs.
    for bad, error, message in ((positions + config.max_position_embeddings, IndexError, "position_ids contains"),
                                (positions.float(), ValueError, "int32/int64"),
                                (positions[:, :5], ValueError, "matching input_ids")):
        with pytest.raises(error, match=message):
            model.bert(ids, mask, types, bad)


def test_gradient_checkpointing_gives_the_same_gradients():
    """With dropout on: the recomputation must draw the same attention and hidden dropout."""
    config = tiny_config(40, num_layers=2, hidden_dropout=0.1, attention_dropout=0.1)
    model = fastmlm.patch_hf(hf_twin(transformers.BertForMaskedLM, config, 40))
    ids, mask, types = padded_batch(config, 40, batch=3, seq=9)
    labels = random_labels(ids, mask, 40)
    model.train()
    torch.manual_seed(0)
    model(ids, mask, types, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    calls = []
    for module in model.modules():
        function = getattr(module, "_gradient_checkpointing_func", None)
        if function is not None:
            module._gradient_checkpointing_func = lambda *a, _f=function, **k: calls.append(1) or _f(*a, **k)
    torch.manual_seed(0)
    model(ids, mask, types, labels=labels).loss.backward()
    assert len(calls) == config.num_layers, "every layer must run under HuggingFace's checkpoint function"
    for name, grad in plain.items():
        assert relative_error(dict(model.named_parameters())[name].grad, grad) < 1e-6, name


def test_training_dropout_follows_the_seed():
    config = tiny_config(41, hidden_dropout=0.1, attention_dropout=0.1)
    model = fastmlm.patch_hf(hf_twin(transformers.BertForMaskedLM, config, 41))
    ids, mask, types = padded_batch(config, 41, batch=3, seq=9)
    labels = random_labels(ids, mask, 41)
    evaluation = model(ids, mask, types, labels=labels).loss
    model.train()
    torch.manual_seed(0)
    a = model(ids, mask, types, labels=labels).loss
    torch.manual_seed(0)
    b = model(ids, mask, types, labels=labels).loss
    c = model(ids, mask, types, labels=labels).loss
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, evaluation)


def test_unsupported_configurations_are_errors():
    config = tiny_config(42)
    with pytest.raises(ValueError, match="position"):
        relative = transformers.BertConfig(**{**config.to_hf(), "position_embedding_type": "relative_key"})
        fastmlm.patch_hf(transformers.BertModel(relative))
    with pytest.raises(ValueError, match="decoder"):
        fastmlm.patch_hf(hf_twin(transformers.BertModel, config, 42, is_decoder=True))
    with pytest.raises(TypeError, match="BertForMaskedLM or BertModel"):
        fastmlm.patch_hf(hf_twin(transformers.BertForSequenceClassification, config, 42))

    model = fastmlm.patch_hf(hf_twin(transformers.BertForMaskedLM, config, 42))
    ids, mask, types = padded_batch(config, 42, batch=3, seq=8)
    labels = random_labels(ids, mask, 42)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(ids, mask, labels=labels, output_attentions=True)
    with pytest.raises(NotImplementedError, match="head_mask"):
        model(ids, mask, labels=labels, head_mask=torch.ones(config.num_layers, config.num_heads))
    with pytest.raises(NotImplementedError, match="encoder_hidden_states"):
        model(ids, mask, labels=labels, encoder_hidden_states=torch.zeros(3, 8, config.hidden_size))
    with pytest.raises(NotImplementedError, match="inputs_embeds"):
        model(attention_mask=mask, inputs_embeds=torch.zeros(3, 8, config.hidden_size))
    with pytest.raises(TypeError, match="not_an_argument"):
        model(ids, mask, labels=labels, not_an_argument=1)
    padded_label = labels.clone()
    padded_label[mask == 0] = 1
    with pytest.raises(ValueError, match="padding"):
        model(ids, mask, labels=padded_label)
    model.config.output_attentions = True  # the config default counts as asking
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(ids, mask, labels=labels)
    model.config.output_attentions = False

    bert = fastmlm.patch_hf(hf_twin(transformers.BertModel, config, 42))
    with pytest.raises(NotImplementedError, match="past_key_values"):
        bert(ids, mask, past_key_values=object())
    left_ids, left_mask, _ = padded_batch(config, 42, batch=3, seq=8, left_padding=True)
    with pytest.raises(ValueError, match="left padding"):
        bert(left_ids, left_mask)
    bert.pooler = None  # without the pooler, left padding is fine
    reference = hf_twin(transformers.BertModel, config, 42, model_kwargs={"add_pooling_layer": False})
    real = left_mask.bool()
    assert relative_error(bert(left_ids, left_mask).last_hidden_state[real],
                          reference(left_ids, left_mask).last_hidden_state[real]) < PARITY_TOLERANCE


def test_no_labelled_position_gives_zero_loss():
    config = tiny_config(43)
    model = fastmlm.patch_hf(hf_twin(transformers.BertForMaskedLM, config, 43))
    ids, mask, types = padded_batch(config, 43, batch=2, seq=6)
    loss = model(ids, mask, types, labels=torch.full_like(ids, IGNORE_INDEX)).loss
    assert loss.item() == 0.0


@pytest.mark.parametrize("output_logits", [False, True])
def test_num_items_in_batch_makes_accumulated_gradients_the_whole_batchs(output_logits):
    # What HuggingFace's Trainer does under gradient accumulation: each micro-batch's
    # summed loss over the step's labelled count, the gradients accumulated.
    config = tiny_config(44)
    model = fastmlm.patch_hf(hf_twin(transformers.BertForMaskedLM, config, 44), output_logits=output_logits)
    ids, mask, types = padded_batch(config, 44, batch=5, seq=10)
    labels = random_labels(ids, mask, 44)
    model(ids, mask, types, labels=labels).loss.backward()
    whole = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    count = (labels != IGNORE_INDEX).sum()
    for half in (slice(0, 2), slice(2, 5)):
        loss = model(ids[half], mask[half], types[half], labels=labels[half], num_items_in_batch=count).loss
        loss.backward()
    params = dict(model.named_parameters())
    for name, grad in whole.items():
        if not name.endswith("attention.self.key.bias"):  # zero up to rounding (check_all_grads)
            check(params[name].grad, grad, f"grad {name}", "cpu")
    # A batch's own count (the Trainer without accumulation) gives the mean; no labels at all, 0.
    torch.testing.assert_close(model(ids, mask, types, labels=labels, num_items_in_batch=int(count)).loss,
                               model(ids, mask, types, labels=labels).loss)
    unlabelled = torch.full_like(labels, IGNORE_INDEX)
    assert model(ids, mask, types, labels=unlabelled, num_items_in_batch=torch.tensor(0)).loss.item() == 0.0
    for bad in (0, 1.5, torch.ones(3)):
        with pytest.raises(ValueError, match="num_items_in_batch must be"):
            model(ids, mask, types, labels=labels, num_items_in_batch=bad)


@pytest.mark.parametrize("hidden_act", ["gelu_new", "relu"])
def test_masked_lm_with_another_activation(hidden_act):
    # The fused head computes the erf GELU; with any other activation the patched model runs
    # HuggingFace's own head transform on the labelled rows, then the sparse loss.
    config = tiny_config(45, hidden_act=hidden_act)
    model, reference = patched_pair(transformers.BertForMaskedLM, config, 45, "cpu")
    ids, mask, types = padded_batch(config, 45, batch=3, seq=10)
    labels = random_labels(ids, mask, 45)
    expected = reference(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    actual = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    check(actual.loss, expected.loss, "loss", "cpu")
    expected.loss.backward()
    actual.loss.backward()
    check_all_grads(model, reference, "cpu")
