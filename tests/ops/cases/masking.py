"""Cases for mask_tokens and masked_positions (integer ops: compared bit for bit)."""
import torch

from fastmlm.ops import mask_tokens, masked_positions
from tests.ops.harness import OpCase

INTEGER = (torch.int64,)


def _ids(shape, generator, device, dtype=torch.int64, vocab=1000):
    return torch.randint(0, vocab, shape, generator=generator, dtype=dtype).to(device)


def masking_case(name, shape, *, p=0.15, budget="bernoulli", special=False, padding=False, id_dtype=torch.int64,
                 transposed=False):
    def build(device, dtype, generator):
        rows, cols = shape
        ids = _ids((cols, rows) if transposed else shape, generator, device, id_dtype)
        ids = ids.T if transposed else ids  # a non-contiguous [rows, cols] view
        inputs = {"input_ids": ids, "special_tokens_mask": None, "attention_mask": None,
                  "seed": int(torch.randint(0, 2**62, (), generator=generator))}
        if special:
            mask = torch.zeros(shape, dtype=torch.int64)
            mask[:, 0] = 1
            mask[:, -1] = 1
            inputs["special_tokens_mask"] = mask.to(device)
        if padding:
            lengths = torch.randint(0, cols + 1, (rows,), generator=generator)
            inputs["attention_mask"] = (torch.arange(cols).view(1, -1) < lengths.view(-1, 1)).to(device)
        return inputs

    def call(input_ids, special_tokens_mask, attention_mask, seed):
        return mask_tokens(input_ids, mask_token_id=3, vocab_size=1000, mlm_probability=p, seed=seed,
                           special_tokens_mask=special_tokens_mask, attention_mask=attention_mask, budget=budget)

    return OpCase("mask_tokens", name, build, call, dtypes=INTEGER, exact=True)


def positions_case(name, shape, *, density=0.15, capacity=None, labels_dtype=torch.int64, sliced=False):
    def build(device, dtype, generator):
        full = (shape[0], shape[1] * 2) if sliced else shape
        labels = torch.randint(0, 500, full, generator=generator, dtype=labels_dtype)
        keep = torch.rand(full, generator=generator) < density
        labels = torch.where(keep, labels, -100)
        labels = labels[:, ::2] if sliced else labels
        return {"labels": labels.to(device)}

    def call(labels):
        return masked_positions(labels, capacity=capacity)

    return OpCase("masked_positions", name, build, call, dtypes=INTEGER, exact=True)


CASES = [
    masking_case("one-token", (1, 1), p=1.0),
    masking_case("bernoulli", (4, 37)),
    masking_case("bernoulli-special-padding", (5, 64), special=True, padding=True),
    masking_case("exact", (6, 50), budget="exact", special=True, padding=True),
    masking_case("exact-all", (3, 9), p=1.0, budget="exact"),
    masking_case("none-selected", (3, 20), p=0.0),
    masking_case("int32-noncontiguous", (7, 33), id_dtype=torch.int32, transposed=True, padding=True),
    masking_case("long-rows", (2, 700), budget="exact", padding=True),
    positions_case("no-capacity", (4, 37)),
    positions_case("empty", (3, 11), density=0.0),
    positions_case("empty-capacity", (3, 11), density=0.0, capacity=5),
    positions_case("all", (2, 9), density=1.0, capacity=18),
    positions_case("capacity-spare", (8, 64), capacity=200),
    positions_case("capacity-overflow", (8, 64), density=0.5, capacity=30),
    positions_case("int32-strided", (5, 77), labels_dtype=torch.int32, sliced=True, capacity=100),
    positions_case("large", (16, 512), capacity=2048),
]
