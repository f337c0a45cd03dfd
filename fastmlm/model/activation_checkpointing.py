"""Activation checkpointing of the encoder's layers, under HuggingFace's names.

    model.activation_checkpointing_enable()        # transformers >= 5 (its Trainer calls this)
    model.gradient_checkpointing_enable()          # the older name, same effect

A checkpointed layer keeps only its input in the forward and runs again in the
backward: a step then holds every layer's input plus one layer's activations,
for about one more forward pass of compute. Gradients are those of the plain
step: hidden dropout is recomputed from the restored generator state
(preserve_rng_state, required when hidden dropout is on) and the attention-dropout
seed is drawn before the checkpoint in the order the plain step draws it.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
import torch.utils.checkpoint

# What may go on to torch.utils.checkpoint.checkpoint.
_CHECKPOINT_KWARGS = ("use_reentrant", "preserve_rng_state", "determinism_check", "debug")


@dataclasses.dataclass(frozen=True)
class CheckpointPlan:
    every_n_layers: int  # layer i is checkpointed when i % every_n_layers == 0 (HuggingFace's rule)
    offload: bool        # keep the checkpointed inputs in (pinned) host memory
    kwargs: dict         # for torch.utils.checkpoint.checkpoint

    @property
    def reentrant(self) -> bool:
        return bool(self.kwargs["use_reentrant"])

    def covers(self, layer_index: int) -> bool:
        return layer_index % self.every_n_layers == 0

    def run(self, fn, x: torch.Tensor, *args):
        """fn(x, *args) under a checkpoint (its saved input on the host with offload)."""
        offload = (torch.autograd.graph.save_on_cpu(pin_memory=x.is_cuda, device_type=x.device.type)
                   if self.offload else contextlib.nullcontext())
        with offload:
            return torch.utils.checkpoint.checkpoint(fn, x, *args, **self.kwargs)


def make_plan(hidden_dropout: float, checkpoint_kwargs: Optional[dict], every_n_layers: int,
              offload: bool) -> CheckpointPlan:
    kwargs = {"use_reentrant": False, **(checkpoint_kwargs or {})}
    unknown = sorted(set(kwargs) - set(_CHECKPOINT_KWARGS))
    if unknown:
        raise ValueError(f"activation checkpointing: unsupported checkpoint arguments {unknown} "
                         f"(supported: {', '.join(_CHECKPOINT_KWARGS)})")
    if not kwargs.get("preserve_rng_state", True) and hidden_dropout > 0:
        raise ValueError("activation checkpointing: preserve_rng_state=False would recompute hidden dropout with "
                         "other masks than the forward's (wrong gradients); leave it True")
    if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
        raise ValueError(f"every_n_layers must be a positive int, got {every_n_layers!r}")
    return CheckpointPlan(every_n_layers, bool(offload), kwargs)


class ActivationCheckpointing:
    """HuggingFace's checkpointing switch on the Encoder and on the models built around one.

    The plan lives on the encoder (`checkpoint_plan`, None: off), which is what runs the
    layers; a MaskedLM's and a classifier's switch sets their encoder's.
    """

    def _checkpointed_encoder(self):
        return self.encoder

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Checkpoint every `every_n_layers`-th layer (from the first) in training;
        `activation_checkpointing_kwargs` go to torch.utils.checkpoint.checkpoint (default
        use_reentrant=False); `offload` keeps the checkpointed inputs in pinned host memory."""
        encoder = self._checkpointed_encoder()
        encoder.checkpoint_plan = make_plan(encoder.config.hidden_dropout, activation_checkpointing_kwargs,
                                            every_n_layers, offload)

    def activation_checkpointing_disable(self) -> None:
        self._checkpointed_encoder().checkpoint_plan = None

    @property
    def is_activation_checkpointing(self) -> bool:
        return self._checkpointed_encoder().checkpoint_plan is not None

    # The names of transformers < 5 (and of its Trainer's fallback), same behaviour.
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None,
                                      every_n_layers: int = 1, offload: bool = False) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing
