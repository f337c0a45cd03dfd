"""Pre-training: `pretrain(PretrainConfig(...)) -> PretrainResult`.

One run lives in one directory:

    run.json          the config and the fingerprint of the packed data
    tokenizer.json    trained on the corpus, or copied from --tokenizer / --init
    checkpoints/      step-<n>/ (see fastmlm.train.checkpointing)
    encoder/          at the end: the encoder without the MLM head, plus tokenizer.json

Reproducibility and resume. Everything random in a step is a function of the
run seed and the step number: the batch (`StepBatchSampler`), the masking
(`mask_tokens(seed=derive_seed(seed, "mask", step))`, on the device) and the
dropout (torch's generators are reseeded with `derive_seed(seed, "dropout",
step)` before each step). So a resumed run needs no RNG or data-loader state:
it loads weights, optimizer and scheduler, and continues with the same losses
an uninterrupted run would have had.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fastmlm.data import (
    MLMCollator,
    PackedExamples,
    StepBatchSampler,
    TextTokenizer,
    build_packed_examples,
    corpus_documents,
    corpus_sentences,
    derive_seed,
    load_tokenizer,
    train_wordpiece,
)
from fastmlm.train import checkpointing
from fastmlm.train.pretrain_config import PretrainConfig
from fastmlm.train.setup import build_model, build_optimizer, resolve_device, training_step

RUN_FILE = "run.json"
TOKENIZER_FILE = "tokenizer.json"
ENCODER_DIR = "encoder"

@dataclass
class PretrainResult:
    out_dir: Path
    encoder_dir: Path | None  # None when the session stopped early (stop_after)
    steps_done: int
    resumed_from_step: int
    losses: list[float]  # every step of the run, 1..steps_done, including those before a resume
    initial_loss: float  # mean of the first log window
    final_loss: float  # mean of the last log window
    tokens_per_s: float  # real (non-padding) tokens, this session
    masked_tokens_per_s: float  # tokens with a loss, this session
    elapsed_s: float


def linear_warmup_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier for the (s+1)-th step: linear rise over warmup_steps, then linear decay to 0."""

    def multiplier(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        return max(0.0, (total_steps - s) / max(1, total_steps - warmup_steps))

    return multiplier


def _prepare_run_dir(config: PretrainConfig, log: Callable[[str], None]) -> tuple[Path, Path | None]:
    """Create or check the run directory; return it and the checkpoint to resume from."""
    out = Path(config.out_dir)
    if config.init is not None and not Path(config.init).is_dir():
        raise FileNotFoundError(f"--init {config.init} is not a checkpoint directory")
    resume_from = checkpointing.latest_checkpoint(out)
    run_file = out / RUN_FILE
    if resume_from is not None and not config.resume:
        raise FileExistsError(f"{out} already holds checkpoints; pass --resume to continue it, or use another --out")
    if config.resume and run_file.is_file():
        recorded = json.loads(run_file.read_text())["config"]
        mine = config.identity()
        differ = [k for k in mine if recorded.get(k) != mine[k]]
        if differ:
            details = ", ".join(f"{k}: run has {recorded.get(k)!r}, now {mine[k]!r}" for k in differ)
            raise ValueError(f"cannot resume {out} with a different configuration ({details})")
    if config.resume and resume_from is None:
        log(f"no checkpoint in {out}: starting from step 0")
    out.mkdir(parents=True, exist_ok=True)
    return out, resume_from


def _prepare_tokenizer(config: PretrainConfig, out: Path, log: Callable[[str], None]) -> TextTokenizer:
    cached = out / TOKENIZER_FILE
    # Resuming reads the run's own tokenizer. A fresh run builds its own from the options,
    # even where an earlier (failed) run left one: a stale file must not override
    # --tokenizer or --vocab-size.
    if config.resume and cached.is_file():
        return load_tokenizer(cached)
    source = config.tokenizer or (config.init if config.init and _has_tokenizer(config.init) else None)
    if source is None and config.init is not None:
        raise ValueError(f"--init {config.init} has no tokenizer.json or vocab.txt: pass the tokenizer its "
                         "embeddings were trained with as --tokenizer")
    if source is not None:
        tokenizer = load_tokenizer(source)
        log(f"tokenizer: {source} ({tokenizer.vocab_size} tokens)")
    else:
        started = time.perf_counter()
        documents = corpus_documents(config.corpus, document_per=config.document_per)
        tokenizer = train_wordpiece(corpus_sentences(documents), vocab_size=config.vocab_size)
        log(f"tokenizer: trained WordPiece, {tokenizer.vocab_size} tokens in {time.perf_counter() - started:.1f} s")
    tokenizer.save(cached)
    return tokenizer


def _has_tokenizer(directory: str) -> bool:
    return any((Path(directory) / name).is_file() for name in ("tokenizer.json", "vocab.txt"))


def _prepare_data(config: PretrainConfig, tokenizer: TextTokenizer, out: Path,
                  log: Callable[[str], None]) -> PackedExamples:
    started = time.perf_counter()
    documents = corpus_documents(config.corpus, document_per=config.document_per)
    packed = build_packed_examples(documents, tokenizer, max_length=config.max_length,
                                   seed=derive_seed(config.seed, "packing"))
    fingerprint = packed.fingerprint()
    run_file = out / RUN_FILE
    if run_file.is_file() and config.resume:
        recorded = json.loads(run_file.read_text()).get("data_fingerprint")
        if recorded != fingerprint:
            raise ValueError(f"the corpus packs differently from when {out} was started (another Python version's "
                             "docstrings, or changed files): resuming would not reproduce the run")
    else:
        checkpointing.write_json_atomic(run_file, {
            "config": dataclasses.asdict(config) | config.identity(),
            "data_fingerprint": fingerprint,
            "num_examples": len(packed),
            "num_tokens": packed.num_tokens,
            "vocab_size": tokenizer.vocab_size,
        })
    mean_length = packed.num_tokens / len(packed)
    log(f"data: {len(packed)} examples, {packed.num_tokens} tokens (mean {mean_length:.1f}) "
        f"in {time.perf_counter() - started:.1f} s")
    return packed


def _save_encoder(model, tokenizer: TextTokenizer, out: Path) -> Path:
    """Drop the MLM head and write the encoder (and tokenizer) to out/encoder.

    Written whole under a temporary name, then renamed in; an earlier encoder/ is
    renamed aside first and deleted last (a directory cannot be replaced by one
    rename), so an interrupted save leaves a whole encoder under one of the names.
    """
    final = out / ENCODER_DIR
    tmp = out / f".{ENCODER_DIR}.tmp-{os.getpid()}"
    old = out / f".{ENCODER_DIR}.old-{os.getpid()}"
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        tmp.mkdir()
        model.drop_head().save_pretrained(tmp)
        tokenizer.save(tmp / TOKENIZER_FILE)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _window_mean(values: list[float], n: int, first: bool) -> float:
    window = values[:n] if first else values[-n:]
    return sum(window) / len(window) if window else math.nan


def pretrain(config: PretrainConfig, *, log: Callable[[str], None] = print) -> PretrainResult:
    """Run (or resume) pre-training as configured; see the module docstring.

    The per-step reseeding of torch's generators and the CPU thread count stay
    inside this call: the caller's settings are restored on return.
    """
    device = resolve_device(config.device)
    cuda_devices = [device] if device.type == "cuda" else []
    threads = torch.get_num_threads()
    try:
        if device.type == "cpu" and config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        with torch.random.fork_rng(devices=cuda_devices):
            return _pretrain(config, device, log)
    finally:
        torch.set_num_threads(threads)


def _pretrain(config: PretrainConfig, device: torch.device, log: Callable[[str], None]) -> PretrainResult:
    out, resume_from = _prepare_run_dir(config, log)
    tokenizer = _prepare_tokenizer(config, out, log)
    packed = _prepare_data(config, tokenizer, out, log)
    sampler = StepBatchSampler(packed.lengths, config.batch_size, seed=config.seed,
                               bucket_pool_batches=config.bucket_pool_batches)
    collate = MLMCollator(tokenizer.pad_token_id, max_length=config.max_length)

    model = build_model(config, tokenizer, resume_from).to(device)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_warmup_decay(config.resolved_warmup_steps, config.steps))
    losses: list[float] = []
    start_step = 0
    if resume_from is not None:
        state = checkpointing.load_checkpoint_state(resume_from, optimizer, scheduler)
        start_step, losses = state["step"], list(state["losses"])
        log(f"resumed from {resume_from} at step {start_step}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f} M parameters, device {device}, objective {config.objective}")

    step_fn = training_step(model, optimizer, scheduler, config, tokenizer, device)
    # Never before the checkpoint resumed from: --stop-after below it stops at once.
    end_step = max(start_step, min(config.steps, config.stop_after or config.steps))
    # Per-step values stay on the device until a log or a checkpoint reads them
    # (one host synchronisation per window, none per step).
    pending_losses: list[torch.Tensor] = []
    window_targets: list[torch.Tensor] = []
    window_first_step, window_tokens = start_step, 0
    session_tokens = session_targets = 0
    session_started = window_started = time.perf_counter()

    def flush_losses() -> None:
        """Read the pending losses (the window's one host sync); stop on a non-finite one,
        before a log line or a checkpoint is made of a diverged model."""
        if pending_losses:
            start = len(losses)
            losses.extend(torch.stack(pending_losses).float().tolist())
            pending_losses.clear()
            bad = next((i for i in range(start, len(losses)) if not math.isfinite(losses[i])), None)
            if bad is not None:
                raise FloatingPointError(
                    f"loss is {losses[bad]} at step {bad + 1}: training diverged (try a lower --learning-rate); "
                    "checkpoints before it are intact")

    def save(step: int) -> None:
        flush_losses()
        checkpointing.save_checkpoint(
            out, step, save_model=model.save_pretrained, optimizer=optimizer, scheduler=scheduler,
            extra_state={"losses": losses}, keep_last=config.keep_checkpoints)

    target_kind = "masked" if config.objective == "mlm" else "predicted"
    model.train()
    for step in range(start_step, end_step):
        batch = collate([packed[i] for i in sampler.batch_indices(step).tolist()])
        window_tokens += int(batch["attention_mask"].sum())  # host tensor: no sync
        learning_rate = scheduler.get_last_lr()[0]  # this step's (step_fn advances the schedule)
        loss, grad_norm, num_targets = step_fn(step, batch)
        pending_losses.append(loss)
        window_targets.append(num_targets)
        done = step + 1
        if done % config.log_every == 0 or done == end_step:
            flush_losses()
            counts = torch.stack(window_targets).tolist()
            targets = sum(counts)
            seconds = max(time.perf_counter() - window_started, 1e-9)
            # Per target token over the window: a step with few (or no) targets weighs little.
            window_losses = losses[window_first_step:done]
            window_loss = (sum(l * n for l, n in zip(window_losses, counts)) / targets if targets
                           else sum(window_losses) / len(window_losses))
            log(f"step {done:>6}/{config.steps} | loss {window_loss:.4f} | lr {learning_rate:.2e}"
                f" | grad norm {float(grad_norm):.2f} | {window_tokens / seconds:,.0f} tokens/s"
                f" | {targets / seconds:,.0f} {target_kind} tokens/s")
            session_tokens += window_tokens
            session_targets += targets
            window_targets.clear()
            window_first_step, window_tokens = done, 0
            window_started = time.perf_counter()
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done != end_step:
            save(done)
    elapsed = time.perf_counter() - session_started
    if end_step > start_step:
        save(end_step)

    encoder_dir = None
    if end_step == config.steps:
        encoder_dir = _save_encoder(model, tokenizer, out)
    window = max(1, min(config.log_every, len(losses) // 2 or 1))
    result = PretrainResult(
        out_dir=out, encoder_dir=encoder_dir, steps_done=end_step, resumed_from_step=start_step, losses=losses,
        initial_loss=_window_mean(losses, window, first=True), final_loss=_window_mean(losses, window, first=False),
        tokens_per_s=session_tokens / elapsed if elapsed > 0 else 0.0,
        masked_tokens_per_s=session_targets / elapsed if elapsed > 0 else 0.0, elapsed_s=elapsed)
    log(f"done: step {end_step}/{config.steps}, loss {result.initial_loss:.3f} (first {window} steps) -> "
        f"{result.final_loss:.3f} (last {window}), {result.tokens_per_s:,.0f} tokens/s, "
        f"{result.masked_tokens_per_s:,.0f} {target_kind} tokens/s, {elapsed:.1f} s"
        + (f"; encoder saved to {encoder_dir}" if encoder_dir else f"; resume with --resume --out {out}"))
    return result
