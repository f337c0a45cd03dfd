"""Pre-training data: corpus readers, WordPiece tokenizer, sentence packing, batching, MLMCollator."""
from fastmlm.data.batching import StepBatchSampler, derive_seed
from fastmlm.data.collator import MLMCollator
from fastmlm.data.corpus import (
    STDLIB_CORPUS_MODULES,
    read_text_documents,
    split_sentences,
    stdlib_docstring_documents,
)
from fastmlm.data.packing import PackedExample, PackedExamples, pack_documents
from fastmlm.data.pretraining_data import (
    build_packed_examples,
    corpus_documents,
    corpus_sentences,
    tokenized_documents,
)
from fastmlm.data.tokenizer import SPECIAL_TOKENS, TextTokenizer, load_tokenizer, train_wordpiece

__all__ = [
    "MLMCollator",
    "PackedExample",
    "PackedExamples",
    "SPECIAL_TOKENS",
    "STDLIB_CORPUS_MODULES",
    "StepBatchSampler",
    "TextTokenizer",
    "build_packed_examples",
    "corpus_documents",
    "corpus_sentences",
    "derive_seed",
    "load_tokenizer",
    "pack_documents",
    "read_text_documents",
    "split_sentences",
    "stdlib_docstring_documents",
    "tokenized_documents",
    "train_wordpiece",
]
