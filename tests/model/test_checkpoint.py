"""Checkpoints: HuggingFace interop both ways, bit-for-bit round trips, strict and atomic loading."""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import weakref

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from fastmlm import checkpoint
from fastmlm.config import EncoderConfig
from fastmlm.model import Encoder, MaskedLM
from tests.model.helpers import hf_twin, padded_batch, random_labels, randomize_, tiny_config


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{key} differs"


def write_checkpoint(directory, config: dict, state: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, "model.safetensors"))


@pytest.mark.parametrize("cls, hf_cls", [(MaskedLM, transformers.BertForMaskedLM), (Encoder, transformers.BertModel)])
def test_hf_to_fastmlm_to_hf_is_bit_exact(tmp_path, cls, hf_cls):
    config = tiny_config(20)
    hf_twin(hf_cls, config, 20).save_pretrained(tmp_path / "hf")
    model = cls.from_pretrained(tmp_path / "hf")
    model.save_pretrained(tmp_path / "ours")
    assert_same_tensors(load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors"))
    if cls is Encoder:
        assert model.pooler is not None  # BertModel's pooler is kept for classifiers
    assert not [n for n in os.listdir(tmp_path / "ours") if n.endswith(".tmp")]


@pytest.mark.parametrize("cls, hf_cls", [(MaskedLM, transformers.BertForMaskedLM), (Encoder, transformers.BertModel)])
def test_fastmlm_to_hf_to_fastmlm_is_bit_exact(tmp_path, cls, hf_cls):
    config = tiny_config(21)
    model = cls(config) if cls is MaskedLM else cls(config, pooler=True)  # BertModel always has a pooler
    randomize_(model, 21)
    model.save_pretrained(tmp_path / "ours")
    hf, info = hf_cls.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    hf.save_pretrained(tmp_path / "hf")
    again = cls.from_pretrained(tmp_path / "hf")
    assert_same_tensors(model.state_dict(), again.state_dict())


def test_encoder_without_pooler_loads_in_bert_model(tmp_path):
    Encoder(tiny_config(21)).save_pretrained(tmp_path)
    _, info = transformers.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]


def test_hf_loads_our_output_and_computes_the_same(tmp_path):
    config = tiny_config(22)
    model = MaskedLM(config).eval()
    randomize_(model, 22)
    model.save_pretrained(tmp_path)
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    ids, mask, types = padded_batch(config, 22, batch=2, seq=8)
    labels = random_labels(ids, mask, 22)
    expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
    assert abs(model(ids, mask, types, labels=labels).loss.item() - expected.item()) <= 1e-4 * expected.abs().item()


def test_legacy_names_prefix_and_stray_buffers(tmp_path):
    config = tiny_config(23)
    hf = hf_twin(transformers.BertForMaskedLM, config, 23)
    legacy = {}
    for key, value in hf.state_dict().items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        legacy[key] = value.clone()  # the tied decoder weight is written too, as old checkpoints did
    legacy["bert.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]
    legacy["cls.seq_relationship.weight"] = torch.randn(2, config.hidden_size)  # BertForPreTraining's NSP head
    legacy["cls.seq_relationship.bias"] = torch.randn(2)
    write_checkpoint(tmp_path / "legacy", config.to_hf(), legacy)
    model = MaskedLM.from_pretrained(tmp_path / "legacy")
    hf.save_pretrained(tmp_path / "modern")
    assert_same_tensors(model.state_dict(), MaskedLM.from_pretrained(tmp_path / "modern").state_dict())

    # Without the bert. prefix (a BertModel checkpoint) into both classes.
    encoder_state = {k[len("bert."):]: v for k, v in legacy.items() if k.startswith("bert.")}
    write_checkpoint(tmp_path / "bare", config.to_hf(), encoder_state)
    encoder = Encoder.from_pretrained(tmp_path / "bare")
    assert_same_tensors(encoder.state_dict(), model.encoder.state_dict())
    fresh_head = MaskedLM.from_pretrained(tmp_path / "bare")  # no head in the checkpoint: a fresh one
    assert_same_tensors(fresh_head.encoder.state_dict(), model.encoder.state_dict())
    assert torch.equal(fresh_head.head.bias, torch.zeros(config.vocab_size))
    assert torch.equal(fresh_head.head.norm.weight, torch.ones(config.hidden_size))


def test_bert_for_pretraining_checkpoint_keeps_the_pooler(tmp_path):
    config = tiny_config(32)
    hf = hf_twin(transformers.BertForPreTraining, config, 32)
    hf.save_pretrained(tmp_path)
    model = MaskedLM.from_pretrained(tmp_path)  # the NSP head is ignored
    assert torch.equal(model.encoder.pooler.dense.weight, hf.bert.pooler.dense.weight)
    assert torch.equal(model.head.dense.weight, hf.cls.predictions.transform.dense.weight)
    # Every parameter that trains gets a gradient from the MLM loss (what DDP needs): the
    # pooler, unused there, is frozen until drop_head() hands the encoder to a classifier.
    ids, mask, types = padded_batch(config, 32, batch=2, seq=8)
    model(ids, mask, types, labels=random_labels(ids, mask, 32)).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in model.encoder.pooler.parameters())
    assert all(p.requires_grad for p in model.drop_head().parameters())
    encoder = Encoder.from_pretrained(tmp_path)
    assert torch.equal(encoder.pooler.dense.bias, hf.bert.pooler.dense.bias)
    assert all(p.requires_grad for p in encoder.pooler.parameters())
    assert Encoder.from_pretrained(tmp_path, pooler=False).pooler is None  # asked for none


def test_a_classifier_on_a_masked_lms_encoder_trains_its_pooler(tmp_path):
    # model.encoder (not drop_head()) handed to a classifier: the pooler is in its loss now.
    from fastmlm import SequenceClassifier

    config = tiny_config(32)
    hf_twin(transformers.BertForPreTraining, config, 32).save_pretrained(tmp_path)
    model = MaskedLM.from_pretrained(tmp_path)
    classifier = SequenceClassifier(model.encoder, 2)
    ids, mask, types = padded_batch(config, 32, batch=2, seq=8)
    classifier(ids, mask, types, labels=torch.tensor([0, 1])).loss.backward()
    assert all(p.grad is not None for p in model.encoder.pooler.parameters())
    # A freeze of the user's own stays.
    encoder = Encoder.from_pretrained(tmp_path)
    encoder.pooler.requires_grad_(False)
    SequenceClassifier(encoder, 2)
    assert not any(p.requires_grad for p in encoder.pooler.parameters())


def test_encoder_from_masked_lm_checkpoint_ignores_the_head(tmp_path):
    config = tiny_config(24)
    model = MaskedLM(config)
    randomize_(model, 24)
    model.save_pretrained(tmp_path)
    assert_same_tensors(Encoder.from_pretrained(tmp_path).state_dict(), model.encoder.state_dict())


def test_config_round_trip_and_bert_config():
    config = tiny_config(25, hidden_act="gelu_new", hidden_dropout=0.05)
    assert EncoderConfig.from_hf(config.to_hf()) == config
    hf = transformers.BertConfig(**config.to_hf())
    assert (hf.num_hidden_layers, hf.num_attention_heads, hf.hidden_dropout_prob) == (
        config.num_layers, config.num_heads, config.hidden_dropout)
    assert EncoderConfig.from_hf(hf.to_dict()) == config
    assert EncoderConfig.from_hf(hf) == config
    for bad in ({"position_embedding_type": "relative_key"}, {"model_type": "roberta"}, {"is_decoder": True},
                {"hidden_act": "quick_gelu"}, {"hidden_size": 30, "num_attention_heads": 4},
                {"pad_token_id": True}, {"pad_token_id": config.vocab_size}):
        with pytest.raises(ValueError):
            EncoderConfig.from_hf({**config.to_hf(), **bad})


def test_config_save_writes_a_config_json_transformers_reads(tmp_path):
    config = tiny_config(26, hidden_act="relu")
    config.save(tmp_path / "config.json", architecture="BertForMaskedLM")
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # the temporary file was renamed
    assert EncoderConfig.from_hf(tmp_path) == config  # a directory holding config.json
    hf = transformers.BertConfig.from_pretrained(tmp_path)
    assert hf.architectures == ["BertForMaskedLM"]
    assert (hf.num_hidden_layers, hf.hidden_act, hf.vocab_size) == (config.num_layers, "relu", config.vocab_size)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        EncoderConfig.from_hf(tmp_path / "elsewhere")


def test_classifier_dropout_comes_from_the_config_as_in_hf():
    from fastmlm import SequenceClassifier, TokenClassifier

    config = dataclasses.replace(tiny_config(27), hidden_dropout=0.1)
    assert SequenceClassifier(Encoder(config), 2).dropout == 0.1  # none set: hidden_dropout
    with_own = EncoderConfig.from_hf({**config.to_hf(), "classifier_dropout": 0.3})
    assert with_own.classifier_dropout == 0.3 and EncoderConfig.from_hf(with_own.to_hf()) == with_own
    assert TokenClassifier(Encoder(with_own), 2).dropout == 0.3
    assert SequenceClassifier(Encoder(with_own), 2, classifier_dropout=0.0).dropout == 0.0  # the argument wins
    with pytest.raises(ValueError, match="classifier_dropout"):
        dataclasses.replace(config, classifier_dropout=1.0)


def test_null_pad_token_id_means_no_padding_row(tmp_path):
    # HF reads "pad_token_id": null as no padding_idx: token 0's embedding trains like any other.
    config = tiny_config(26)
    hf = hf_twin(transformers.BertModel, dataclasses.replace(config, pad_token_id=None), 26)
    assert hf.embeddings.word_embeddings.padding_idx is None
    hf.save_pretrained(tmp_path)
    encoder = Encoder.from_pretrained(tmp_path)
    assert encoder.config.pad_token_id is None and encoder.embeddings.word.padding_idx is None
    ids = torch.zeros(1, 4, dtype=torch.int64)
    encoder(ids).square().sum().backward()
    assert encoder.embeddings.word.weight.grad[0].any()
    encoder.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["pad_token_id"] is None


def test_drop_head_releases_the_head(tmp_path):
    model = MaskedLM(tiny_config(26))
    head_weight = weakref.ref(model.head.dense.weight)
    encoder = model.drop_head()
    gc.collect()
    assert head_weight() is None and model.head is None
    assert encoder is model.encoder and isinstance(encoder, Encoder)
    ids = torch.randint(1, 10, (2, 5))
    assert encoder(ids).shape == (2, 5, encoder.config.hidden_size)
    with pytest.raises(RuntimeError, match="dropped"):
        model(ids, labels=ids)
    encoder.save_pretrained(tmp_path)
    assert_same_tensors(Encoder.from_pretrained(tmp_path).state_dict(), encoder.state_dict())


# ---- strict loading: every problem reported, nothing half-loaded ----

def _hf_state(config, seed=27):
    return {k: v.clone() for k, v in hf_twin(transformers.BertForMaskedLM, config, seed).state_dict().items()}


def test_shape_mismatch_names_the_key_and_loads_nothing():
    config = tiny_config(27)
    model = MaskedLM(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = _hf_state(config)
    state["bert.encoder.layer.0.intermediate.dense.weight"] = torch.randn(7, config.hidden_size)
    with pytest.raises(ValueError, match=r"intermediate\.dense\.weight has shape \(7, "):
        checkpoint.load_hf_state_dict(model, state)
    assert_same_tensors(model.state_dict(), before)


def test_missing_and_unexpected_keys_are_all_listed():
    config = tiny_config(28)
    state = _hf_state(config)
    del state["bert.embeddings.LayerNorm.bias"]
    del state["cls.predictions.transform.dense.weight"]
    state["bert.encoder.layer.99.output.dense.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        checkpoint.load_hf_state_dict(MaskedLM(config), state)
    message = str(error.value)
    for key in ("embeddings.LayerNorm.bias", "cls.predictions.transform.dense.weight", "layer.99.output.dense.weight"):
        assert key in message


def test_untied_decoder_is_refused():
    config = tiny_config(29)
    state = _hf_state(config)
    state["cls.predictions.decoder.weight"] = torch.randn(config.vocab_size, config.hidden_size)
    with pytest.raises(ValueError, match="differs from the word embeddings"):
        checkpoint.load_hf_state_dict(MaskedLM(config), state)


def test_checkpoint_that_does_not_fit_its_config(tmp_path):
    config = tiny_config(30)
    state = _hf_state(config)
    wrong = {**config.to_hf(), "intermediate_size": config.intermediate_size + 8}
    write_checkpoint(tmp_path, wrong, state)
    with pytest.raises(ValueError, match="intermediate.dense.weight has shape"):
        MaskedLM.from_pretrained(tmp_path)


def test_sharded_checkpoints_load_and_are_held_to_their_index(tmp_path):
    config = tiny_config(33)
    hf = hf_twin(transformers.BertForMaskedLM, config, 33)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index_path = tmp_path / "sharded" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "sharded" / "model.safetensors").exists()
    model = MaskedLM.from_pretrained(tmp_path / "sharded")
    assert torch.equal(model.encoder.embeddings.word.weight, hf.bert.embeddings.word_embeddings.weight)

    def tampered(name, change):
        folder = tmp_path / name
        folder.mkdir()
        for f in (tmp_path / "sharded").iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        change(folder, json.loads(index_path.read_text()))
        return folder

    def duplicate(folder, index):  # a second copy of one tensor, in another shard, zeroed
        key, first = next(iter(index["weight_map"].items()))
        other = next(s for s in shards if s != first)
        state = load_file(folder / other)
        state[key] = torch.zeros_like(load_file(folder / first)[key])
        save_file(state, folder / other, metadata={"format": "pt"})

    def unheld(folder, index):
        index["weight_map"]["bert.encoder.layer.9.output.dense.weight"] = shards[0]
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    def outside(folder, index):
        first = shards[0]
        (tmp_path / "elsewhere.safetensors").write_bytes((folder / first).read_bytes())
        index["weight_map"] = {k: (str(tmp_path / "elsewhere.safetensors") if v == first else v)
                               for k, v in index["weight_map"].items()}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    for change, message in ((duplicate, "which is listed under"), (unheld, "no shard holds"),
                            (outside, "must be files beside the index")):
        with pytest.raises(ValueError, match=message):
            MaskedLM.from_pretrained(tampered(change.__name__, change))


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        MaskedLM.from_pretrained(tmp_path / "nowhere")
    config = tiny_config(31)
    MaskedLM(config).save_pretrained(tmp_path / "ok")

    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    good = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        MaskedLM.from_pretrained(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        MaskedLM.from_pretrained(tmp_path / "corrupt")

    os.remove(tmp_path / "corrupt" / "model.safetensors")
    (tmp_path / "corrupt" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        MaskedLM.from_pretrained(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MaskedLM.from_pretrained(tmp_path / "corrupt")
    os.remove(tmp_path / "corrupt" / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        MaskedLM.from_pretrained(tmp_path / "corrupt")


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    # Both files are written under temporary names before either is renamed: a failure
    # while writing the config must not leave new weights beside the old config.
    old = Encoder(tiny_config(30, hidden_size=32, num_heads=2))
    old.save_pretrained(tmp_path)
    new = Encoder(tiny_config(30, hidden_size=16, num_heads=2))

    def failing_write(self, path, architecture="BertModel"):
        with open(path, "w") as f:
            f.write("{")  # a partial file, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(EncoderConfig, "write_json", failing_write)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temporaries left
    reloaded = Encoder.from_pretrained(tmp_path)
    assert_same_tensors(reloaded.state_dict(), old.state_dict())


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_checkpoint_files_get_the_usual_permissions(tmp_path, umask):
    # Not mkstemp's 0600 nor the 0600 file safetensors creates: what any new file gets,
    # so a checkpoint shared through a group-readable directory stays readable.
    previous = os.umask(umask)
    try:
        Encoder(tiny_config(31)).save_pretrained(tmp_path)
    finally:
        os.umask(previous)
    for name in ("config.json", "model.safetensors"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name
