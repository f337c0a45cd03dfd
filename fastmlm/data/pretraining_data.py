"""From a corpus and a tokenizer to packed pre-training examples.

`tokenized_documents` tokenizes documents lazily, many sentences per call so
the `tokenizers` library's threads have work, and `build_packed_examples`
drains it into a `PackedExamples`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

from fastmlm.data.corpus import Document, DocumentPer, read_text_documents, stdlib_docstring_documents
from fastmlm.data.packing import PackedExamples, pack_documents
from fastmlm.data.tokenizer import TextTokenizer


def corpus_documents(
    paths: Sequence[str | Path] | None = None, *, document_per: DocumentPer = "block"
) -> Iterator[Document]:
    """Documents of the text files at paths, or of the built-in stdlib-docstring corpus when paths is empty."""
    if isinstance(paths, (str, Path)):  # one path, not a sequence of characters
        paths = [paths]
    if paths:
        return read_text_documents(list(paths), document_per=document_per)
    return stdlib_docstring_documents()


def corpus_sentences(documents: Iterable[Document]) -> Iterator[str]:
    """Every sentence of every document, in order (what a tokenizer trains on)."""
    for document in documents:
        yield from document


def tokenized_documents(
    documents: Iterable[Document], tokenizer: TextTokenizer, *, sentences_per_call: int = 8192
) -> Iterator[list[list[int]]]:
    """Each document as a list of sentences of token ids (no special tokens), lazily."""
    pending: list[Document] = []
    pending_sentences = 0

    def flush() -> Iterator[list[list[int]]]:
        encoded = tokenizer.encode_batch([s for doc in pending for s in doc])
        start = 0
        for doc in pending:
            yield encoded[start : start + len(doc)]
            start += len(doc)

    for document in documents:
        pending.append(document)
        pending_sentences += len(document)
        if pending_sentences >= sentences_per_call:
            yield from flush()
            pending, pending_sentences = [], 0
    if pending:
        yield from flush()


def build_packed_examples(
    documents: Iterable[Document], tokenizer: TextTokenizer, *, max_length: int, seed: int = 0
) -> PackedExamples:
    """Tokenize and pack documents into `[CLS] A [SEP] B [SEP]` examples of <= max_length tokens."""
    examples = pack_documents(
        tokenized_documents(documents, tokenizer),
        max_length=max_length,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        replace_ids=(tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id),
        unk_token_id=tokenizer.unk_token_id,
        seed=seed,
    )
    packed = PackedExamples.from_examples(examples)
    if len(packed) == 0:
        raise ValueError("the corpus produced no examples (is it empty?)")
    return packed
