"""PretrainConfig: every knob of a pre-training run.

The command line builds one option per field (fastmlm.cli), so a new knob
here is a new `fastmlm pretrain --knob` with no other change.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

# Fields that change what a run computes: a resume must agree on all of them.
_IDENTITY_FIELDS = (
    "steps", "batch_size", "max_length", "learning_rate", "warmup_steps", "weight_decay", "adam_betas",
    "adam_eps", "max_grad_norm", "seed", "objective", "mlm_probability", "masking_budget", "corpus",
    "document_per", "tokenizer", "vocab_size", "init", "hidden_size", "num_layers", "num_heads",
    "intermediate_size", "hidden_dropout", "attention_dropout", "bucket_pool_batches", "precision",
    "last_layer_subset", "mask_capacity",
)


@dataclass
class PretrainConfig:
    """Every knob of a pre-training run; the defaults train a tiny BERT on the
    built-in stdlib-docstring corpus in about a minute on a 2-core CPU."""

    out_dir: str = "runs/pretrain"
    steps: int = 200
    batch_size: int = 16
    max_length: int = 128
    learning_rate: float = 2e-3
    warmup_steps: int | None = None  # None: 6% of steps
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-6
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # torch threads for a CPU run (0: leave torch's setting). On an idle 2-core
    # machine torch's setting ran the default model at 17.4k tokens/s against
    # 11.9k with one thread; on a machine busy with other processes one thread
    # can be much faster (workers spin against them), hence the option.
    cpu_threads: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    objective: Literal["mlm", "causal"] = "mlm"
    mlm_probability: float = 0.15
    masking_budget: Literal["bernoulli", "exact"] = "bernoulli"
    corpus: list[str] = field(default_factory=list)  # text files; empty: the stdlib-docstring corpus
    document_per: Literal["block", "line"] = "block"
    tokenizer: str | None = None  # tokenizer.json / vocab.txt / a directory; None: train one
    vocab_size: int = 8192  # for a trained tokenizer
    init: str | None = None  # a HuggingFace BERT checkpoint directory to continue from
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 512
    hidden_dropout: float = 0.1
    # 0 by default: on a CPU, attention dropout (fastmlm's counter-hash dropout)
    # leaves only the slow reference attention backend, about 3x slower per step.
    attention_dropout: float = 0.0
    last_layer_subset: bool = True  # compute the last layer only at masked rows
    mask_capacity: int | None = None  # static number of masked rows (None: exact, data-dependent)
    bucket_pool_batches: int = 8  # length bucketing pool, in batches; 0: off
    log_every: int = 10
    checkpoint_every: int = 100  # 0: only at the end
    keep_checkpoints: int = 2
    resume: bool = False
    stop_after: int | None = None  # end this session after this many total steps (schedule still uses `steps`)
    compile: bool = False
    gradient_checkpointing: bool = False  # recompute each layer in the backward (less activation memory)

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "max_length", "vocab_size", "hidden_size", "num_layers", "num_heads",
                    "intermediate_size", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.objective not in ("mlm", "causal"):
            raise ValueError(f"objective must be 'mlm' or 'causal', got {self.objective!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps], got {self.warmup_steps}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be positive, got {self.stop_after}")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads must be >= 0, got {self.cpu_threads}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        # clip_grad_norm_ with a negative norm flips every gradient: training would ascend.
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (inf: no clipping), got {self.max_grad_norm}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.hidden_size % self.num_heads:  # checked here, before anything is written to the run directory
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.max_length < 5:  # [CLS] a [SEP] b [SEP]: checked before anything is written
            raise ValueError(f"max_length must be at least 5, got {self.max_length}")
        # The optimiser's and the model's own checks would fire only after the run
        # directory is written; AdamW takes eps = 0 and negative decay, and trains to NaN.
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.adam_eps > 0:
            raise ValueError(f"adam_eps must be > 0, got {self.adam_eps}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two values in [0, 1), got {self.adam_betas}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.bucket_pool_batches < 0:
            raise ValueError(f"bucket_pool_batches must be >= 0, got {self.bucket_pool_batches}")
        if self.mask_capacity is not None and self.mask_capacity < 1:
            raise ValueError(f"mask_capacity must be positive, got {self.mask_capacity}")
        self.adam_betas = tuple(self.adam_betas)
        corpus = [self.corpus] if isinstance(self.corpus, (str, os.PathLike)) else self.corpus
        self.corpus = [str(p) for p in corpus]

    @property
    def resolved_warmup_steps(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, round(0.06 * self.steps))

    def identity(self) -> dict:
        return {name: _jsonable(getattr(self, name)) for name in _IDENTITY_FIELDS}


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value
