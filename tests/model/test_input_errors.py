"""Bad input gets a ValueError/TypeError naming the problem before any op runs."""
from __future__ import annotations

import pytest
import torch

import fastmlm.model.layer
import fastmlm.model.masked_lm
import fastmlm.model.packing
from fastmlm.config import EncoderConfig
from fastmlm.model import Encoder, MaskedLM
from fastmlm.ops import no_value_checks
from tests.model.helpers import tiny_config

CONFIG = tiny_config(50, vocab_size=40, max_position_embeddings=16, type_vocab_size=2)


@pytest.fixture
def no_ops_may_run(monkeypatch):
    """Replace every op the model calls by one that fails the test if it is reached."""
    def forbidden(*args, **kwargs):
        raise AssertionError("an op ran before the input was rejected")

    for module, names in ((fastmlm.model.layer, ("attention", "gather_rows")),
                          (fastmlm.model.packing, ("masked_positions",)),
                          (fastmlm.model.masked_lm, ("masked_positions", "mlm_head", "mlm_cross_entropy", "gather_rows"))):
        for name in names:
            monkeypatch.setattr(module, name, forbidden)


def good_batch():
    ids = torch.randint(1, CONFIG.vocab_size, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    labels = torch.full((2, 6), -100)
    labels[0, 1] = 5
    return ids, mask, labels


CASES = {
    "id above vocabulary": (lambda ids, mask, labels: (ids.index_fill(1, torch.tensor([2]), 40), mask, labels), ValueError, "vocabulary"),
    "negative id": (lambda ids, mask, labels: (ids.index_fill(1, torch.tensor([2]), -1), mask, labels), ValueError, "vocabulary"),
    "float ids": (lambda ids, mask, labels: (ids.float(), mask, labels), TypeError, "integer"),
    "uint8 ids": (lambda ids, mask, labels: (ids.to(torch.uint8), mask, labels), TypeError, "int32 or int64"),
    "no sequences": (lambda ids, mask, labels: (ids[:0], mask[:0], labels[:0]), ValueError, "input_ids is empty"),
    "no tokens": (lambda ids, mask, labels: (ids[:, :0], mask[:, :0], labels[:, :0]), ValueError,
                  "input_ids is empty"),
    "1-D ids without cu_seqlens": (lambda ids, mask, labels: (ids[0], None, labels[0]), ValueError, "cu_seqlens"),
    "too long": (lambda ids, mask, labels: (ids.repeat(1, 3), mask.repeat(1, 3), labels.repeat(1, 3)), ValueError,
                 "max_position_embeddings"),
    "mask shape": (lambda ids, mask, labels: (ids, mask[:, :5], labels), ValueError, "attention_mask has shape"),
    "mask not 0/1": (lambda ids, mask, labels: (ids, mask * 2, labels), ValueError, "only 0 and 1"),
    "labels shape": (lambda ids, mask, labels: (ids, mask, labels[:1]), ValueError, "labels has shape"),
    "label above vocabulary": (lambda ids, mask, labels: (ids, mask, labels.index_fill(1, torch.tensor([3]), 40)),
                               ValueError, "labels must be -100 or in"),
    "negative label": (lambda ids, mask, labels: (ids, mask, labels.index_fill(1, torch.tensor([3]), -1)),
                       ValueError, "labels must be -100 or in"),
    "label on padding": (lambda ids, mask, labels: (ids, mask, labels.index_fill(1, torch.tensor([5]), 3)),
                         ValueError, "padding"),
    "float labels": (lambda ids, mask, labels: (ids, mask, labels.float()), TypeError, "labels must be an integer"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_rejected_before_any_op(case, no_ops_may_run):
    make, error, message = CASES[case]
    ids, mask, labels = make(*good_batch())
    with pytest.raises(error, match=message):
        MaskedLM(CONFIG)(ids, mask, labels=labels)


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([0, 2]), r"in \[0, 2\)"), (torch.tensor([0, 1, 1]), "shape"),
    (torch.tensor([[0.5, 1.0]]), "multi-label"), ([0, 1], "torch.Tensor"),
], ids=["class out of range", "too many", "multi-label shape", "a list"])
def test_bad_classifier_labels_are_rejected_before_the_encoder_runs(labels, message, no_ops_may_run):
    from fastmlm import SequenceClassifier

    ids, mask, _ = good_batch()
    with pytest.raises((ValueError, TypeError), match=message):
        SequenceClassifier(Encoder(CONFIG), 2)(ids, mask, labels=labels)


def test_bad_token_types(no_ops_may_run):
    ids, mask, labels = good_batch()
    with pytest.raises(TypeError, match="token_type_ids must be int32 or int64"):
        Encoder(CONFIG)(ids, mask, torch.zeros_like(ids, dtype=torch.uint8))
    with pytest.raises(ValueError, match="token_type_ids contains 2"):
        MaskedLM(CONFIG)(ids, mask, torch.full_like(ids, 2), labels=labels)
    with pytest.raises(ValueError, match="token_type_ids has shape"):
        Encoder(CONFIG)(ids, mask, torch.zeros(2, 5, dtype=torch.long))


def test_bad_packed_input(no_ops_may_run):
    encoder = Encoder(CONFIG)
    ids = torch.randint(1, 40, (10,))
    with pytest.raises(ValueError, match="int32"):
        encoder(ids, cu_seqlens=torch.tensor([0, 4, 10]))
    with pytest.raises(ValueError, match="rise from 0"):
        encoder(ids, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="no attention_mask"):
        encoder(ids, torch.ones_like(ids), cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))
    long_ids = torch.randint(1, 40, (20,))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        encoder(long_ids, cu_seqlens=torch.tensor([0, 3, 20], dtype=torch.int32))
    with pytest.raises(ValueError, match="exceeds max_seqlen"):
        encoder(ids, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32), max_seqlen=5)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor"):
        encoder(ids, cu_seqlens=[0, 4, 10])
    with pytest.raises(ValueError, match="cu_seqlens is on meta"):
        encoder(ids, cu_seqlens=cu.to("meta"))
    with pytest.raises(TypeError, match="max_seqlen must be an int"):
        encoder(ids, cu_seqlens=cu, max_seqlen=6.0)
    with pytest.raises(ValueError, match="packed input_ids must be 1-D"):
        encoder(ids.view(2, 5), cu_seqlens=cu)
    with pytest.raises(ValueError, match="max_seqlen is only for packed input"):
        encoder(ids.view(2, 5), max_seqlen=5)
    # Without value checks (compiling, capturing) the longest sequence cannot be read from cu_seqlens.
    with no_value_checks(), pytest.raises(ValueError, match="needs max_seqlen when value checks are off"):
        encoder(ids, cu_seqlens=cu)


def test_packed_input_reads_max_seqlen_from_cu_seqlens():
    # With value checks on, a packed call may leave out max_seqlen: the longest sequence is
    # read from cu_seqlens, and the result is the padded batch's at its real tokens.
    encoder = Encoder(CONFIG).eval()
    ids, mask, _ = good_batch()
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    packed = encoder(ids[mask.bool()], cu_seqlens=cu)
    padded = encoder(ids, mask)[mask.bool()]
    torch.testing.assert_close(packed, padded)
    torch.testing.assert_close(encoder(ids[mask.bool()], cu_seqlens=cu, max_seqlen=6), packed)


def test_inputs_of_the_wrong_kind_or_device(no_ops_may_run):
    ids, mask, labels = good_batch()
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor"):
        Encoder(CONFIG)(ids.tolist(), mask)
    with pytest.raises(TypeError, match="attention_mask must be a torch.Tensor"):
        Encoder(CONFIG)(ids, mask.tolist())
    with pytest.raises(ValueError, match="attention_mask is on meta"):
        Encoder(CONFIG)(ids, mask.to("meta"))
    with pytest.raises(ValueError, match="labels is on meta"):
        MaskedLM(CONFIG)(ids, mask, labels=labels.to("meta"))


def test_capacities_overflow():
    ids, mask, labels = good_batch()
    labels[0, :] = ids[0]
    with pytest.raises(ValueError, match="more than mask_capacity 3"):
        MaskedLM(CONFIG, mask_capacity=3)(ids, mask, labels=labels)
    with pytest.raises(ValueError, match="more than token_capacity 8"):
        MaskedLM(CONFIG, token_capacity=8)(ids, mask, labels=labels)


def test_labels_required_for_mlm_and_bad_options():
    ids, mask, _ = good_batch()
    with pytest.raises(ValueError, match="needs labels"):
        MaskedLM(CONFIG)(ids, mask)
    with pytest.raises(ValueError, match="objective"):
        MaskedLM(CONFIG, objective="prefix")
    with pytest.raises(ValueError, match="last_layer_subset"):
        MaskedLM(CONFIG, objective="causal", last_layer_subset=True)
    with pytest.raises(ValueError, match="mask_capacity"):
        MaskedLM(CONFIG, mask_capacity=0)
    with pytest.raises(ValueError, match="mask_capacity"):  # a bool is not a capacity
        MaskedLM(CONFIG, mask_capacity=True)
    with pytest.raises(ValueError, match="token_capacity"):
        Encoder(CONFIG, token_capacity=True)
    with pytest.raises(TypeError, match="EncoderConfig"):
        Encoder({"hidden_size": 16})


@pytest.mark.parametrize("fields, message", [
    ({"hidden_size": 30, "num_heads": 4}, "multiple of num_heads"),
    ({"hidden_act": "tanh"}, "hidden_act"),
    ({"pad_token_id": 500}, "pad_token_id"),
    ({"hidden_dropout": 1.5}, "hidden_dropout"),
    ({"num_layers": 0}, "num_layers"),
])
def test_bad_config(fields, message):
    with pytest.raises(ValueError, match=message):
        EncoderConfig(**{**CONFIG.__dict__, **fields})


def test_value_checks_can_be_switched_off():
    """Inside no_value_checks (as while compiling) only shape checks run."""
    ids, mask, labels = good_batch()
    with no_value_checks():
        MaskedLM(CONFIG)(ids, mask * 1, labels=labels)  # valid input still works
        with pytest.raises(ValueError, match="attention_mask has shape"):
            MaskedLM(CONFIG)(ids, mask[:, :5], labels=labels)


def test_input_checks_read_the_batch_three_times(monkeypatch):
    # Eager value checks of a padded batch with labels: the mask's 0/1 values, the ids'
    # range and both label rules in one read (each read is a GPU sync per step).
    from fastmlm.model.inputs import check_encoder_inputs
    from tests.host_reads import HostReads

    ids, mask, labels = good_batch()
    with HostReads(monkeypatch) as reads:
        check_encoder_inputs(CONFIG, ids, mask, None, None, None, labels, None)
    assert reads.count == 3
