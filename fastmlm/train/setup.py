"""The pieces `pretrain` assembles: device, model, optimizer and the training step."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from fastmlm.data import TextTokenizer, derive_seed

if TYPE_CHECKING:
    from fastmlm.train.pretrain_config import PretrainConfig


def resolve_device(name: str) -> torch.device:
    """'auto' is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists every device type it knows
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch sees no CUDA GPU (torch {torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    return device


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_model(config: "PretrainConfig", tokenizer: TextTokenizer, resume_from: Path | None):
    """A MaskedLM: from the resume checkpoint, from --init, or fresh with the configured shape."""
    model = _new_or_loaded_model(config, tokenizer, resume_from)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model


def _new_or_loaded_model(config: "PretrainConfig", tokenizer: TextTokenizer, resume_from: Path | None):
    from fastmlm import EncoderConfig, MaskedLM

    # A causal LM predicts nearly every row: the last-layer subset saves nothing there (and the model refuses it).
    options = {"last_layer_subset": config.last_layer_subset and config.objective == "mlm",
               "mask_capacity": config.mask_capacity, "objective": config.objective}
    if resume_from is not None or config.init is not None:
        # A checkpoint without an MLM head (BertModel) gets a fresh one: from the run seed too.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(config.seed, "init"))
            model = MaskedLM.from_pretrained(resume_from or config.init, **options)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary only "
                             f"{model.config.vocab_size}: use the checkpoint's own tokenizer")
        return model
    encoder_config = EncoderConfig(
        # Rows past the tokenizer's vocabulary are never targets; a multiple of 64
        # keeps the output projection's matrix shapes friendly to tensor cores.
        vocab_size=_round_up(tokenizer.vocab_size, 64),
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=max(512, config.max_length),
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        hidden_dropout=config.hidden_dropout,
        attention_dropout=config.attention_dropout,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )
    # The initial weights come from the run seed, not from whatever torch's generator held.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "init"))
        return MaskedLM(encoder_config, **options)


def build_optimizer(model: torch.nn.Module, config: "PretrainConfig") -> torch.optim.AdamW:
    """AdamW; biases and LayerNorm weights (every parameter with fewer than 2 dims) get no weight decay.

    Fused (one kernel over all parameters, as HuggingFace's Trainer defaults to) where torch
    has it for their device: in the default model's CPU step the per-tensor loop took 6.2 ms of
    ~90, the fused step 1.5 ms.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                for p in params)
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps,
                             fused=fused or None)


def autocast_context(config: "PretrainConfig", device: torch.device):
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_step(model, optimizer, scheduler, config: "PretrainConfig", tokenizer: TextTokenizer,
                  device: torch.device) -> Callable[[int, dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """step_fn(step, host_batch) -> (loss, grad_norm, number of target tokens), all device tensors.

    Nothing in a step waits for the device: the returned values are read only
    when the loop logs.
    """
    from fastmlm.ops import mask_tokens
    from fastmlm.ops.checks import no_value_checks

    forward = torch.compile(model) if config.compile else model
    non_blocking = device.type == "cuda"

    def step_fn(step: int, host_batch: dict[str, torch.Tensor]):
        if non_blocking:
            host_batch = {k: v.pin_memory() for k, v in host_batch.items()}
        batch = {k: v.to(device, non_blocking=non_blocking) for k, v in host_batch.items()}
        # Dropout draws from torch's generators: reseed them per step so a resumed
        # run drops exactly what an uninterrupted one would have.
        torch.manual_seed(derive_seed(config.seed, "dropout", step))
        # The data pipeline guarantees ids, types and masks in range, so the value checks
        # are off on every device: on a GPU each would read device memory (a host sync)
        # every step, and with --mask-capacity they would refuse a batch with more masked
        # rows than the capacity, which training drops instead (as the option says).
        with no_value_checks():
            input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
            if config.objective == "mlm":
                input_ids, labels = mask_tokens(
                    input_ids, mask_token_id=tokenizer.mask_token_id, vocab_size=tokenizer.vocab_size,
                    mlm_probability=config.mlm_probability, special_tokens_mask=batch["special_tokens_mask"],
                    attention_mask=attention_mask, seed=derive_seed(config.seed, "mask", step),
                    budget=config.masking_budget)
            else:  # the model shifts: row t predicts token t + 1 of the same sequence
                labels = None
            with autocast_context(config, device):
                out = forward(input_ids, attention_mask=attention_mask, token_type_ids=batch["token_type_ids"],
                              labels=labels)
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        return out.loss.detach(), grad_norm.detach(), out.num_labelled

    return step_fn
