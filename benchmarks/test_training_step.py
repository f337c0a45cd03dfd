"""A whole BERT MLM training step (forward, backward, AdamW): fastmlm against HuggingFace.

The headline comparison a user makes: the same weights, the same padded batch of mixed
lengths and the same labels (15% of the real tokens), one optimiser step each.
Variants:
  * hf:         transformers `BertForMaskedLM` (attn_implementation="sdpa") on the padded
                batch, as an HF script runs it: padding goes through every layer and the head
                makes logits at every position;
  * hf_patched: the same model after `fastmlm.patch_hf(model)`, the one-line change to an HF
                script (unpadded, fused attention, sparse head);
  * fastmlm:    `MaskedLM(config, last_layer_subset=True)` with the same weights (the last
                layer computes queries and feed-forward at labelled rows only);
  * fastmlm_checkpointed: the same with `activation_checkpointing_enable()` (each layer
                recomputed in the backward: what memory it saves, what time it costs).
Sizes: GPU, BERT-base (12 layers, H = 768) under bf16 autocast with fp32 weights (what
`Trainer(bf16=True)` does), 32 sequences of 32-512 tokens, dropout 0.1 everywhere. CPU, a
BERT-small (4 layers, H = 512, 8 heads) in fp32, 16 sequences of 16-128 tokens, hidden dropout
0.1 and attention dropout 0: on the CPU fastmlm's fused attention (torch's sdpa kernel)
declines dropout, as `fastmlm pretrain`'s CPU default does (docs/ops.md). V = 30522 in both.

Before timing, each variant's loss and gradients are checked against HF's model in fp32 with
dropout off (eval mode) on the same batch: the loss and every parameter's gradient, matched
by HuggingFace name (the largest relative error and its parameter are kept); the checkpointed
variant's training step (dropout on) also against the same step without checkpointing. The
errors go to `extra_info` with `real_tokens`, `padded_tokens`, `labelled`, `peak_memory_bytes` (one step, AdamW state
already allocated, beyond what was allocated before it) and, when timed,
`real_tokens_per_second` (real tokens / median step time). Throughput counts real tokens only:
HF's padding is work it does, not work the model needs.
Run: python -m pytest benchmarks/test_training_step.py --benchmark-only
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from tests.memory_timeline import cpu_timeline, memory_from_timeline

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
VOCAB, MASK_P, IGNORE = 30522, 0.15, -100
if CUDA:
    LAYERS, HIDDEN, HEADS, BATCH, MIN_LEN, MAX_LEN, ATTENTION_DROPOUT = 12, 768, 12, 32, 32, 512, 0.1
else:
    LAYERS, HIDDEN, HEADS, BATCH, MIN_LEN, MAX_LEN, ATTENTION_DROPOUT = 4, 512, 8, 16, 16, 128, 0.0


def hf_model():
    """BertForMaskedLM with seed-0 weights, fp32, on DEVICE."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=4 * HIDDEN,
                                     max_position_embeddings=512, hidden_dropout_prob=0.1,
                                     attention_probs_dropout_prob=ATTENTION_DROPOUT, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(config).to(DEVICE)


def make_batch():
    """(input_ids, attention_mask, labels) [BATCH, MAX_LEN]: right-padded, lengths in [MIN_LEN, MAX_LEN]."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (BATCH,), generator=gen)
    lengths[0] = MAX_LEN  # one full row: the padded width is MAX_LEN
    mask = (torch.arange(MAX_LEN).view(1, -1) < lengths.view(-1, 1)).long()
    ids = torch.randint(1000, VOCAB, (BATCH, MAX_LEN), generator=gen) * mask  # 0 = [PAD]
    chosen = (torch.rand(BATCH, MAX_LEN, generator=gen) < MASK_P) & mask.bool()
    labels = torch.where(chosen, ids, IGNORE)
    ids = torch.where(chosen, 103, ids)  # [MASK] (the 80/10/10 split does not change the work)
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


def fastmlm_model(hf):
    from fastmlm import EncoderConfig, MaskedLM
    from fastmlm.checkpoint import load_hf_state_dict

    model = MaskedLM(EncoderConfig.from_hf(hf.config.to_dict()), last_layer_subset=True).to(DEVICE)
    load_hf_state_dict(model, hf.state_dict(), source="the HuggingFace twin")
    return model


def fastmlm_checkpointed_model(hf):
    model = fastmlm_model(hf)
    model.activation_checkpointing_enable()
    return model


def hf_patched_model(hf):
    from fastmlm import patch_hf

    return patch_hf(copy.deepcopy(hf))


def hf_loss(model, ids, mask, labels):
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def fastmlm_loss(model, ids, mask, labels):
    return model(ids, mask, labels=labels).loss


VARIANTS = {"hf": (lambda hf: hf, hf_loss), "hf_patched": (hf_patched_model, hf_loss),
            "fastmlm": (fastmlm_model, fastmlm_loss),
            "fastmlm_checkpointed": (fastmlm_checkpointed_model, fastmlm_loss)}


def autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else contextlib.nullcontext()


def hf_named_gradients(model) -> dict[str, torch.Tensor]:
    """Every parameter's gradient under its HuggingFace name (fastmlm's fused qkv split back)."""
    if not hasattr(model, "encoder"):  # a transformers model, patched or not
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    from fastmlm.checkpoint import key_table

    params = dict(model.named_parameters())
    return {name: part for ours, theirs in key_table(model) if params[ours].grad is not None
            for name, part in zip(theirs, params[ours].grad.chunk(len(theirs)))}


def gradients(model, loss_fn, batch, *, use_autocast, train=False, seed=0):
    """(loss, {HF name: gradient}) of one step: eval mode (no dropout) unless `train`."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with autocast() if use_autocast else contextlib.nullcontext():
        loss = loss_fn(model, *batch)
    loss.backward()
    grads = {name: g.float().clone() for name, g in hf_named_gradients(model).items()}
    model.zero_grad(set_to_none=True)
    model.train()
    return loss.detach().float(), grads


def relative(got, want):
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def errors_against(got, want) -> dict[str, float]:
    """Relative errors of the loss and, over every parameter, the largest of the gradients'
    (with its name). The key projection's bias is left out: softmax ignores it, so its
    gradient is zero up to rounding on both sides and its relative error is noise."""
    (got_loss, got_grads), (want_loss, want_grads) = got, want
    assert got_grads.keys() == want_grads.keys(), sorted(got_grads.keys() ^ want_grads.keys())
    per_parameter = {name: relative(got_grads[name], want_grads[name]) for name in want_grads
                     if not name.endswith("attention.self.key.bias")}
    worst = max(per_parameter, key=per_parameter.get)
    return {"loss": relative(got_loss, want_loss), "gradient": per_parameter[worst], "worst_parameter": worst}


def peak_memory(step):
    """Peak bytes allocated during one step beyond what was allocated before it."""
    if CUDA:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated() - before
    _, timeline = cpu_timeline(step)
    return memory_from_timeline(timeline)[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_step(benchmark, variant):
    pytest.importorskip("transformers")
    make_model, loss_fn = VARIANTS[variant]
    hf = hf_model()
    batch = make_batch()
    want = gradients(hf, hf_loss, batch, use_autocast=False)
    model = make_model(hf)
    if model is not hf:
        del hf
    errors = errors_against(gradients(model, loss_fn, batch, use_autocast=CUDA), want)
    if getattr(model, "is_activation_checkpointing", False):
        # Checkpointing runs in training only: its step with dropout against the same step without it.
        plan = model.encoder.checkpoint_plan
        model.activation_checkpointing_disable()
        reference = gradients(model, loss_fn, batch, use_autocast=CUDA, train=True)
        model.encoder.checkpoint_plan = plan
        checkpointed = errors_against(gradients(model, loss_fn, batch, use_autocast=CUDA, train=True), reference)
        errors.update({f"checkpointed_{key}": value for key, value in checkpointed.items()})
    # Per parameter, so a layer skipped or a weight not copied shows as an error near 1; on
    # the GPU (bf16 autocast against fp32) only such gross mistakes fail here, and subtler
    # ones (attention over padding: ~1e-2) are the CPU run's and the test suite's to catch.
    limit = 0.1 if CUDA else 1e-3
    numeric = {key: value for key, value in errors.items() if isinstance(value, float)}
    assert max(numeric.values()) <= limit, f"{variant}: relative errors {errors} against HF in fp32"

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(model, *batch)
        loss.backward()
        optimizer.step()
        if CUDA:
            torch.cuda.synchronize()

    step()  # AdamW's state, compilation and caches outside the measurements
    mask, labels = batch[1], batch[2]
    real_tokens = int(mask.sum())
    benchmark.extra_info.update(variant=variant, device=DEVICE, real_tokens=real_tokens,
                                padded_tokens=mask.numel(), labelled=int((labels != IGNORE).sum()),
                                peak_memory_bytes=peak_memory(step),
                                **{f"error_{name}": value for name, value in errors.items()})
    rounds, warmup = (20, 3) if CUDA else (5, 0)
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=warmup)
    stats = getattr(benchmark.stats, "stats", None)  # None under --benchmark-disable
    if stats is not None:
        benchmark.extra_info["real_tokens_per_second"] = real_tokens / stats.median
