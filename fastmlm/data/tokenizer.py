"""WordPiece tokenizers: train a small one, or load a HuggingFace one.

`TextTokenizer` wraps a `tokenizers.Tokenizer` and knows the ids of the five
BERT special tokens. It encodes text WITHOUT special tokens, truncation or
padding: packing (`fastmlm.data.packing`) adds [CLS]/[SEP] and the collator
pads, so the tokenizer's own post-processing (for example the fixed padding to
128 in many exported tokenizer.json files) must stay out of the way.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, SEP, MASK)


class TextTokenizer:
    """A WordPiece tokenizer plus the ids of [PAD] [UNK] [CLS] [SEP] [MASK]."""

    def __init__(self, tokenizer: Tokenizer):
        tokenizer.no_truncation()
        tokenizer.no_padding()
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; fastmlm needs {list(SPECIAL_TOKENS)}")
        self.tokenizer = tokenizer
        self.pad_token_id: int = tokenizer.token_to_id(PAD)
        self.unk_token_id: int = tokenizer.token_to_id(UNK)
        self.cls_token_id: int = tokenizer.token_to_id(CLS)
        self.sep_token_id: int = tokenizer.token_to_id(SEP)
        self.mask_token_id: int = tokenizer.token_to_id(MASK)

    @property
    def vocab_size(self) -> int:
        # One past the largest id, not the number of distinct tokens: a vocab.txt with a
        # repeated line (real ones have them) has fewer tokens than ids, and the model's
        # embedding must cover every id the tokenizer emits.
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(
            (self.pad_token_id, self.unk_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id)
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (tokenizers' threads do the work)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json to path, atomically (temporary name, then rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            self.tokenizer.save(str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def _bert_pipeline(model: models.Model) -> Tokenizer:
    """BERT's uncased text pipeline around a WordPiece model."""
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def _add_bert_post_processor(tokenizer: Tokenizer) -> Tokenizer:
    """[CLS] a [SEP] (b [SEP], type 1): what a saved tokenizer.json adds for other
    libraries (transformers' PreTrainedTokenizerFast). fastmlm's own encode asks for
    no special tokens: its packing places them."""
    cls_id, sep_id = tokenizer.token_to_id(CLS), tokenizer.token_to_id(SEP)
    if cls_id is not None and sep_id is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
            special_tokens=[(CLS, cls_id), (SEP, sep_id)])
    return tokenizer


def train_wordpiece(texts: Iterable[str], *, vocab_size: int = 8192, min_frequency: int = 2) -> TextTokenizer:
    """Train an uncased WordPiece vocabulary on texts; special tokens get ids 0-4.

    Not bit-reproducible: the `tokenizers` trainer breaks ties between equally
    frequent merges in hash-map order, which changes from process to process, so
    two trainings on the same text can differ in a few rare entries. That is why
    a pre-training run saves its tokenizer in the run directory and a resumed run
    loads it instead of training again. The vocabulary may come out smaller than
    vocab_size on a small corpus.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    tokenizer = _bert_pipeline(models.WordPiece(unk_token=UNK, continuing_subword_prefix="##"))
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(_add_bert_post_processor(tokenizer))


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """Load a HuggingFace tokenizer.json, a BERT vocab.txt, or a directory holding either.

    A vocab.txt gets BERT's uncased pipeline (lower-casing, accent stripping).
    """
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "vocab.txt"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {path}")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    if path.suffix == ".json":
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"{path} is not a readable tokenizer.json: {e}") from None
        return TextTokenizer(tokenizer)
    if path.suffix == ".txt":
        try:
            vocab = models.WordPiece.read_file(str(path))
        except Exception as e:
            raise ValueError(f"{path} is not a readable vocab.txt: {e}") from None
        tokenizer = _bert_pipeline(models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix="##"))
        # Registered as special (at their vocab.txt ids), as a tokenizer.json marks them:
        # "[MASK]" in text is one token, and decoding skips them.
        # Only those the file has: a missing one must fail TextTokenizer's check, not be appended.
        tokenizer.add_special_tokens([t for t in SPECIAL_TOKENS if t in vocab])
        return TextTokenizer(_add_bert_post_processor(tokenizer))
    raise ValueError(f"unrecognised tokenizer file {path}: expected tokenizer.json or vocab.txt")
