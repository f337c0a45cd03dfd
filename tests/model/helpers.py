"""Shared set-up for the model tests: tiny random configs, HuggingFace twins, padded batches."""
from __future__ import annotations

import random

import torch
import transformers

from fastmlm import checkpoint
from fastmlm.config import EncoderConfig

IGNORE_INDEX = -100
PARITY_TOLERANCE = 1e-4  # fp32, per tensor, relative norm error (the bar)
# On a GPU reductions run in other orders (and cuBLAS may use TF32 for HF's side).
TOLERANCE = {"cpu": PARITY_TOLERANCE, "cuda": 2e-3}

transformers.logging.set_verbosity_error()


def tiny_config(seed: int, **overrides) -> EncoderConfig:
    """A random small config; head dims are multiples of 8 (8, 16, 32) as the fast kernels need."""
    rng = random.Random(seed)
    num_heads = rng.choice([1, 2, 4])
    head_dim = rng.choice([8, 16, 32])
    fields = dict(
        vocab_size=rng.randint(40, 120),
        hidden_size=num_heads * head_dim,
        num_layers=rng.randint(1, 3),
        num_heads=num_heads,
        intermediate_size=rng.choice([16, 48, 64]),
        max_position_embeddings=rng.choice([16, 24, 40]),
        type_vocab_size=rng.choice([2, 3]),
        layer_norm_eps=rng.choice([1e-12, 1e-5]),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=0,
    )
    fields.update(overrides)
    return EncoderConfig(**fields)


def hf_config(config: EncoderConfig, attn_implementation: str = "eager", **extra) -> transformers.BertConfig:
    return transformers.BertConfig(**config.to_hf(), attn_implementation=attn_implementation, **extra)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights larger than BERT's init (and non-trivial LayerNorms) so that errors show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight") or name.endswith("LayerNorm.gamma"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def hf_twin(cls, config: EncoderConfig, seed: int, attn_implementation: str = "eager", *,
            model_kwargs: dict | None = None, **extra):
    """A HuggingFace model with random weights, in eval mode and fp32; extra goes to BertConfig."""
    torch.manual_seed(seed)
    model = cls(hf_config(config, attn_implementation, **extra), **(model_kwargs or {}))
    randomize_(model, seed)
    return model.eval()


def copy_from_hf(ours: torch.nn.Module, hf: torch.nn.Module) -> torch.nn.Module:
    checkpoint.load_hf_state_dict(ours, hf.state_dict(), source="test twin")
    return ours


def padded_batch(config: EncoderConfig, seed: int, batch: int, seq: int, *, left_padding: bool = False):
    """(input_ids, attention_mask, token_type_ids) with lengths 1..seq, two-sentence token types."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
    lengths[0] = seq  # one full row, so the batch width is used
    cols = torch.arange(seq)
    if left_padding:
        mask = (cols.view(1, -1) >= (seq - lengths).view(-1, 1)).long()
    else:
        mask = (cols.view(1, -1) < lengths.view(-1, 1)).long()
    # [CLS] A [SEP] B [SEP]: type 0 up to a random split, 1 after it.
    split = (torch.rand(batch, generator=gen) * lengths).long()
    if left_padding:
        split = split + (seq - lengths)
    types = (cols.view(1, -1) >= split.view(-1, 1)).long() * mask
    types = types.clamp(max=config.type_vocab_size - 1)
    ids = torch.where(mask.bool(), ids, config.pad_token_id)
    return ids, mask, types


def random_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, seed: int, p: float = 0.3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    chosen = (torch.rand(input_ids.shape, generator=gen) < p) & attention_mask.bool()
    chosen.view(-1)[0] = True  # at least one label
    return torch.where(chosen, input_ids, IGNORE_INDEX)


def hf_named_grads(ours: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our parameter gradients under HuggingFace names (the fused qkv split back)."""
    grads = {name: p.grad for name, p in ours.named_parameters()}
    out = {}
    for mine, theirs in checkpoint.key_table(ours):
        if grads.get(mine) is None:
            continue
        for name, part in zip(theirs, grads[mine].chunk(len(theirs), dim=0)):
            out[name] = part
    return out


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values"
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def check(actual, expected, what, device):
    error = relative_error(actual, expected)
    assert error <= TOLERANCE[device], f"{what}: relative error {error:.2e} > {TOLERANCE[device]:.0e}"
