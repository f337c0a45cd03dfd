"""SequenceClassifier and TokenClassifier: parity with transformers' BERT heads, and a tiny fine-tune.

Parity bar as for the encoder: identical weights, dropout 0, fp32; logits, loss
and every parameter gradient within relative norm error 1e-4.
"""
from __future__ import annotations

import pytest
import torch
import transformers

import fastmlm
from fastmlm.model import Encoder, SequenceClassifier, TokenClassifier
from tests.model.helpers import (
    TOLERANCE,
    check,
    IGNORE_INDEX,
    copy_from_hf,
    hf_named_grads,
    hf_twin,
    padded_batch,
    tiny_config,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def encoder_from(hf_bert, config, **kwargs) -> Encoder:
    encoder = Encoder(config, pooler=hf_bert.pooler is not None, **kwargs)
    return copy_from_hf(encoder, hf_bert)


def head_from_hf(cls, hf, config, device, **kwargs):
    head = cls(encoder_from(hf.bert, config, **kwargs.pop("encoder_kwargs", {})), hf.num_labels, **kwargs)
    with torch.no_grad():
        head.classifier.weight.copy_(hf.classifier.weight)
        head.classifier.bias.copy_(hf.classifier.bias)
    return head.to(device).eval()


def check_grads(head, hf_bert, hf_classifier, device):
    """Every gradient of the HuggingFace encoder and classifier against ours."""
    mine = hf_named_grads(head.encoder)
    params = dict(hf_bert.named_parameters())
    for name, p in params.items():
        assert name in mine, f"no gradient for {name}"
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        if name.endswith("attention.self.key.bias"):
            # Zero in exact arithmetic (softmax ignores a per-query constant): rounding noise on both sides.
            scale = params[name[: -len("bias")] + "weight"].grad.norm()
            assert mine[name].norm().cpu() <= TOLERANCE[device] * scale, f"grad {name} is not ~0"
        else:
            check(mine[name], expected, f"grad {name}", device)
    assert len(mine) == len(params)
    check(head.classifier.weight.grad, hf_classifier.weight.grad, "grad classifier.weight", device)
    check(head.classifier.bias.grad, hf_classifier.bias.grad, "grad classifier.bias", device)


def class_labels(seed, batch, num_labels, problem):
    gen = torch.Generator().manual_seed(seed)
    if problem == "regression":
        return torch.randn(batch, generator=gen)
    if problem == "multi_label":
        return (torch.rand(batch, num_labels, generator=gen) < 0.5).float()
    labels = torch.randint(0, num_labels, (batch,), generator=gen)
    labels[-1] = IGNORE_INDEX  # ignored as CrossEntropyLoss ignores it
    return labels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("problem, num_labels", [("single_label", 3), ("regression", 1), ("multi_label", 4)])
@pytest.mark.parametrize("seed, token_capacity", [(20, None), (21, 53)])
def test_sequence_classifier_matches_bert_for_sequence_classification(seed, token_capacity, problem, num_labels,
                                                                       device):
    config = tiny_config(seed)
    hf = hf_twin(transformers.BertForSequenceClassification, config, seed, num_labels=num_labels)
    ours = head_from_hf(SequenceClassifier, hf, config, device, encoder_kwargs={"token_capacity": token_capacity})
    assert ours.encoder.pooler is not None
    ids, mask, types = padded_batch(config, seed, batch=5, seq=min(11, config.max_position_embeddings))
    labels = class_labels(seed, 5, num_labels, problem)

    expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    actual = ours(ids.to(device), mask.to(device), types.to(device), labels=labels.to(device))
    assert actual.logits.shape == (5, num_labels)
    check(actual.logits, expected.logits, "logits", device)
    check(actual.loss, expected.loss, "loss", device)
    check(ours.loss(actual.logits.detach(), labels.to(device)), expected.loss, "loss()", device)
    expected.loss.backward()
    actual.loss.backward()
    check_grads(ours, hf.bert, hf.classifier, device)
    # The pooler is in this loss, so its gradient was checked above.
    assert ours.encoder.pooler.dense.weight.grad.norm() > 0


def hf_pooled_reference(hf_bert, ids, mask, types, pooling):
    hidden = hf_bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pooling, token_capacity", [("mean", None), ("mean", 41), ("cls", None)])
def test_pooling_without_a_pooler(pooling, token_capacity, device):
    """Mean over real tokens, or the raw [CLS] state when the encoder has no pooler."""
    seed = 22
    config = tiny_config(seed)
    hf_bert = hf_twin(transformers.BertModel, config, seed, model_kwargs={"add_pooling_layer": False})
    classifier = torch.nn.Linear(config.hidden_size, 3)
    ours = SequenceClassifier(encoder_from(hf_bert, config, token_capacity=token_capacity), 3, pooling=pooling)
    with torch.no_grad():
        ours.classifier.weight.copy_(classifier.weight)
        ours.classifier.bias.copy_(classifier.bias)
    ours = ours.to(device).eval()
    ids, mask, types = padded_batch(config, seed, batch=4, seq=min(9, config.max_position_embeddings))
    labels = torch.tensor([0, 2, 1, 1])

    logits = classifier(hf_pooled_reference(hf_bert, ids, mask, types, pooling))
    loss = torch.nn.functional.cross_entropy(logits, labels)
    actual = ours(ids.to(device), mask.to(device), types.to(device), labels=labels.to(device))
    check(actual.logits, logits, "logits", device)
    check(actual.loss, loss, "loss", device)
    loss.backward()
    actual.loss.backward()
    check_grads(ours, hf_bert, classifier, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed, token_capacity", [(23, None), (24, 50)])
def test_token_classifier_matches_bert_for_token_classification(seed, token_capacity, device):
    config = tiny_config(seed)
    hf = hf_twin(transformers.BertForTokenClassification, config, seed, num_labels=5)
    ours = head_from_hf(TokenClassifier, hf, config, device, encoder_kwargs={"token_capacity": token_capacity})
    ids, mask, types = padded_batch(config, seed, batch=4, seq=min(12, config.max_position_embeddings))
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, ids.shape, generator=gen)
    labels[torch.rand(ids.shape, generator=gen) < 0.2] = IGNORE_INDEX  # e.g. word-piece continuations
    labels[mask == 0] = IGNORE_INDEX  # as DataCollatorForTokenClassification pads

    expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    actual = ours(ids.to(device), mask.to(device), types.to(device), labels=labels.to(device))
    assert actual.logits.shape == (4, ids.shape[1], 5)
    real = mask.bool()
    check(actual.logits.cpu()[real], expected.logits[real], "logits at real tokens", device)
    assert (actual.logits.cpu()[~real] == 0).all(), "logits at padding must be 0"
    check(actual.loss, expected.loss, "loss", device)
    expected.loss.backward()
    actual.loss.backward()
    check_grads(ours, hf.bert, hf.classifier, device)


def test_every_label_ignored_gives_loss_zero_and_zero_gradients():
    # A documented difference from HuggingFace (which returns NaN), for both heads.
    config = tiny_config(26)
    ids, mask, types = padded_batch(config, 26, batch=3, seq=8)
    for clf, labels in ((SequenceClassifier(Encoder(config), 3, pooling="mean"), torch.full((3,), IGNORE_INDEX)),
                        (TokenClassifier(Encoder(config), 4), torch.full(ids.shape, IGNORE_INDEX))):
        loss = clf(ids, mask, types, labels=labels).loss
        loss.backward()
        assert loss.item() == 0.0, type(clf).__name__
        assert all(not p.grad.any() for p in clf.parameters() if p.grad is not None), type(clf).__name__


def test_packed_input_gives_the_padded_results():
    config = tiny_config(25)
    seq_clf = SequenceClassifier(Encoder(config, pooler=True), 3).eval()
    mean_clf = SequenceClassifier(Encoder(config), 3, pooling="mean").eval()
    tok_clf = TokenClassifier(Encoder(config), 4).eval()
    ids, mask, types = padded_batch(config, 25, batch=4, seq=8)
    real = mask.bool()
    lengths = mask.sum(1)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    packed = dict(token_type_ids=types[real], cu_seqlens=cu_seqlens, max_seqlen=8)
    for clf in (seq_clf, mean_clf):
        torch.testing.assert_close(clf(ids[real], **packed).logits, clf(ids, mask, types).logits)
    torch.testing.assert_close(tok_clf(ids[real], **packed).logits, tok_clf(ids, mask, types).logits[real])


def test_bad_arguments_are_clear_errors():
    config = tiny_config(26)
    encoder = Encoder(config)
    with pytest.raises(ValueError, match="pooling"):
        SequenceClassifier(encoder, 2, pooling="max")
    with pytest.raises(ValueError, match="num_labels"):
        TokenClassifier(encoder, 0)
    with pytest.raises(TypeError, match="model.encoder"):
        SequenceClassifier(fastmlm.MaskedLM(config), 2)
    ids, mask, types = padded_batch(config, 26, batch=3, seq=6)
    clf, tok = SequenceClassifier(encoder, 2), TokenClassifier(encoder, 2)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        clf(ids, mask, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="shape"):
        clf(ids, mask, labels=torch.tensor([0, 1]))
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="sequence 1 has no real token"):
        clf(ids, empty)
    bad = torch.zeros_like(ids)
    bad[mask == 0] = 1
    if (mask == 0).any():
        with pytest.raises(ValueError, match="padding"):
            tok(ids, mask, labels=bad)


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread is faster than several contending for a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_fine_tuning_learns_a_separable_task(pooling, one_thread):
    """Does sequence contain token 7? and: which of 3 classes is each token (id % 3)?"""
    torch.manual_seed(0)
    config = tiny_config(27, vocab_size=30, hidden_size=32, num_heads=2, num_layers=1, intermediate_size=64,
                         max_position_embeddings=16)
    clf = SequenceClassifier(Encoder(config, pooler=True), 2, pooling=pooling)
    tok = TokenClassifier(Encoder(config), 3)
    optimizer = torch.optim.AdamW([*clf.parameters(), *tok.parameters()], lr=3e-3)

    def make(seed):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(8, config.vocab_size, (32, 10), generator=gen)
        has = torch.rand(32, generator=gen) < 0.5
        where = torch.randint(1, 10, (32,), generator=gen)
        ids[has, where[has]] = 7
        ids[:, 0] = 1  # [CLS]
        mask = torch.ones_like(ids)
        mask[16:, 7:] = 0  # mixed lengths; token 7 may fall in the padding
        ids[mask == 0] = 0
        seq_labels = ((ids == 7) & (mask == 1)).any(1).long()
        tok_labels = torch.where(mask == 1, ids % 3, IGNORE_INDEX)
        return ids, mask, seq_labels, tok_labels

    for step in range(100):
        ids, mask, seq_labels, tok_labels = make(step)
        loss = clf(ids, mask, labels=seq_labels).loss + tok(ids, mask, labels=tok_labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    clf.eval(), tok.eval()
    ids, mask, seq_labels, tok_labels = make(10_000)
    with torch.no_grad():
        seq_accuracy = (clf(ids, mask).logits.argmax(-1) == seq_labels).float().mean().item()
        predicted = tok(ids, mask).logits.argmax(-1)
    real = mask.bool()
    tok_accuracy = (predicted[real] == tok_labels[real]).float().mean().item()
    assert seq_accuracy >= 0.9, f"sequence accuracy {seq_accuracy:.2f}"
    assert tok_accuracy >= 0.95, f"token accuracy {tok_accuracy:.2f}"
