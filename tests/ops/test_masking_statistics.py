"""mask_tokens statistics on every backend: BERT's 15% / 80-10-10 within binomial bounds."""
import math

import pytest
import torch

from fastmlm.ops import BackendUnavailable, mask_tokens, use_backend
from fastmlm.ops.masking import MASK_TOKENS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
VOCAB, MASK_ID = 30000, 103


def _within(successes: int, trials: int, p: float, sigmas: float = 6.0) -> bool:
    return abs(successes - trials * p) <= sigmas * math.sqrt(trials * p * (1 - p)) + 1


def _batch(device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, VOCAB, (64, 128), generator=g)
    lengths = torch.randint(1, 129, (64,), generator=g)
    attention = (torch.arange(128).view(1, -1) < lengths.view(-1, 1)).long()
    special = torch.zeros_like(ids)
    special[:, 0] = 1
    special[torch.arange(64), lengths - 1] = 1
    return ids.to(device), attention.to(device), special.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", list(MASK_TOKENS.backends))
def test_bernoulli_rates(backend, device):
    ids, attention, special = _batch(device)
    eligible = (attention == 1) & (special == 0)
    selected = masked = randomised = trials = 0
    try:
        with use_backend(backend, "mask_tokens"):
            for seed in range(8):
                out, labels = mask_tokens(ids, mask_token_id=MASK_ID, vocab_size=VOCAB, seed=seed,
                                          special_tokens_mask=special, attention_mask=attention)
                chosen = labels != -100
                assert not (chosen & ~eligible).any(), "a special token or padding was selected"
                assert torch.equal(labels[chosen], ids[chosen])
                trials += int(eligible.sum())
                selected += int(chosen.sum())
                masked += int((chosen & (out == MASK_ID)).sum())
                randomised += int((chosen & (out != MASK_ID) & (out != ids)).sum())
                assert torch.equal(out[~chosen], ids[~chosen])
    except BackendUnavailable as exc:
        pytest.skip(str(exc).splitlines()[0])
    assert _within(selected, trials, 0.15)
    assert _within(masked, selected, 0.8)
    # A random token equals the original with probability 1/VOCAB: negligible here.
    assert _within(randomised, selected, 0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", list(MASK_TOKENS.backends))
def test_exact_counts(backend, device):
    ids, attention, special = _batch(device)
    eligible = ((attention == 1) & (special == 0)).sum(dim=1)
    try:
        with use_backend(backend, "mask_tokens"):
            _, labels = mask_tokens(ids, mask_token_id=MASK_ID, vocab_size=VOCAB, seed=5, budget="exact",
                                    special_tokens_mask=special, attention_mask=attention)
    except BackendUnavailable as exc:
        pytest.skip(str(exc).splitlines()[0])
    expected = torch.floor(eligible.double() * 0.15 + 0.5).long()
    assert torch.equal((labels != -100).sum(dim=1), expected)


def test_generator_supplies_the_seed():
    ids = torch.randint(0, 100, (4, 30))
    a = mask_tokens(ids, mask_token_id=1, vocab_size=100, generator=torch.Generator().manual_seed(7))
    b = mask_tokens(ids, mask_token_id=1, vocab_size=100, generator=torch.Generator().manual_seed(7))
    c = mask_tokens(ids, mask_token_id=1, vocab_size=100, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
