"""The `fastmlm` command line: `fastmlm info | pretrain [...]` (also `python -m fastmlm`).

Subcommands live in one registry, `SUBCOMMANDS`: a new one (e.g. `finetune`)
is a `Subcommand(name, help, add_arguments, run)` passed to `register`. Heavy
imports (torch, the model) happen inside `run`, so `fastmlm info` and
`fastmlm --help` stay fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # returns the exit status


SUBCOMMANDS: dict[str, Subcommand] = {}


def register(subcommand: Subcommand) -> Subcommand:
    if subcommand.name in SUBCOMMANDS:
        raise ValueError(f"subcommand {subcommand.name!r} is already registered")
    SUBCOMMANDS[subcommand.name] = subcommand
    return subcommand


# ---------------------------------------------------------------- info
def _info_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _info_run(args: argparse.Namespace) -> int:
    from fastmlm.info import report

    print(report())
    return 0


register(Subcommand("info", "print the version, the available backends and the devices", _info_arguments, _info_run))


# ---------------------------------------------------------------- pretrain
_PRETRAIN_HELP = {
    "out_dir": "run directory (tokenizer, checkpoints, encoder/)",
    "steps": "optimizer steps in the whole run (the LR schedule spans them)",
    "batch_size": "sequences per step",
    "max_length": "tokens per example, [CLS] and [SEP]s included",
    "learning_rate": "peak learning rate",
    "warmup_steps": "linear warm-up steps (default: 6%% of --steps)",
    "weight_decay": "AdamW weight decay (not on biases and LayerNorm weights)",
    "adam_betas": "AdamW betas",
    "adam_eps": "AdamW epsilon",
    "max_grad_norm": "gradient clipping norm",
    "seed": "run seed: data order, masking, dropout and initial weights derive from it (a WordPiece "
            "tokenizer trained by the run is not bit-reproducible: pass --tokenizer for identical runs)",
    "device": "auto, cpu, cuda or cuda:N",
    "cpu_threads": "torch threads on a CPU run, 0 = torch's default (1 can be faster on a busy machine)",
    "precision": "auto = bf16 autocast on CUDA, fp32 on CPU",
    "objective": "mlm (masked tokens) or causal (next token, causal attention)",
    "mlm_probability": "fraction of tokens selected for masking",
    "masking_budget": "bernoulli (each token independently) or exact (round(p * n) per row)",
    "corpus": "plain-text corpus files (default: docstrings of the Python standard library)",
    "document_per": "block = documents separated by blank lines, one sentence per line; line = one document per line",
    "tokenizer": "tokenizer.json, vocab.txt, or a directory with one (default: train a WordPiece vocabulary)",
    "vocab_size": "vocabulary size of a trained tokenizer",
    "init": "HuggingFace BERT checkpoint directory to continue pre-training from",
    "hidden_size": "model width (fresh model)",
    "num_layers": "transformer layers (fresh model)",
    "num_heads": "attention heads (fresh model)",
    "intermediate_size": "feed-forward width (fresh model)",
    "hidden_dropout": "dropout on hidden states (fresh model)",
    "attention_dropout": "dropout on attention weights (fresh model)",
    "last_layer_subset": "run the last layer only at masked positions",
    "mask_capacity": "static number of masked rows per batch (no host sync; extra masked rows are dropped)",
    "bucket_pool_batches": "length-bucketing pool in batches (0 = off)",
    "log_every": "log every N steps",
    "checkpoint_every": "checkpoint every N steps (0 = only at the end)",
    "keep_checkpoints": "how many recent checkpoints to keep",
    "resume": "continue from the newest checkpoint in --out (start fresh if there is none)",
    "stop_after": "end this session after N total steps (resume later with --resume)",
    "compile": "torch.compile the model",
    "gradient_checkpointing": "keep only each layer's input and recompute the layer in the backward "
                              "(the layers' activations are not held, for about one more forward pass)",
}


def _pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per PretrainConfig field, so the CLI never lags behind the config."""
    from fastmlm.train.pretrain_config import PretrainConfig

    hints = typing.get_type_hints(PretrainConfig)
    defaults = PretrainConfig()
    for field in dataclasses.fields(PretrainConfig):
        flags = [f"--{field.name.replace('_', '-')}"]
        if field.name == "out_dir":
            flags.insert(0, "--out")
        hint, default = hints[field.name], getattr(defaults, field.name)
        kwargs: dict = {"dest": field.name, "default": default, "help": _PRETRAIN_HELP.get(field.name, "")}
        if default is not None and default is not False and default != []:
            kwargs["help"] += f" (default: {default})"
        args = typing.get_args(hint)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = list(args)
        elif typing.get_origin(hint) is list:
            kwargs.update(nargs="+", type=str)
        elif typing.get_origin(hint) is tuple:
            kwargs.update(nargs=len(args), type=args[0], metavar=tuple(f"B{i + 1}" for i in range(len(args))))
        else:
            scalar = next((a for a in args if a is not type(None)), hint)  # X | None -> X
            kwargs["type"] = scalar
        parser.add_argument(*flags, **kwargs)


def _pretrain_run(args: argparse.Namespace) -> int:
    from fastmlm.train.pretrain import pretrain
    from fastmlm.train.pretrain_config import PretrainConfig

    config = PretrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)})
    pretrain(config)
    return 0


register(Subcommand("pretrain", "pre-train a BERT-style masked language model (tiny default: about 1-2 minutes on a 2-core CPU)",
                    _pretrain_arguments, _pretrain_run))


# ---------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmlm", description="fast BERT-style masked-language-model pre-training")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for subcommand in SUBCOMMANDS.values():
        sub = commands.add_parser(subcommand.name, help=subcommand.help, description=subcommand.help)
        subcommand.add_arguments(sub)
        sub.set_defaults(run=subcommand.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as error:
        # Configuration and input problems, and a diverged run: one clear line, not a traceback.
        print(f"fastmlm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastmlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
