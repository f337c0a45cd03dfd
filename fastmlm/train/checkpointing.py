"""Training checkpoints: safetensors and JSON only, written atomically.

A checkpoint is a directory `<run>/checkpoints/step-<step:08d>/` holding

    config.json, model.safetensors   the model, via its own save_pretrained
    optimizer.safetensors            every tensor of the optimizer state
    training_state.json              step, optimizer hyper-parameters, scheduler
                                     state, anything the loop adds (written last)

No pickle anywhere: a checkpoint from an untrusted source can at worst hold
wrong numbers, never run code. The directory is assembled under a hidden
temporary name and renamed into place in one `os.replace`, so a crash or an
error leaves either the complete checkpoint or nothing (the temporary directory
is removed on error; one left by a killed process is ignored and swept later).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from fastmlm.checkpoint import read_safetensors, write_safetensors

CHECKPOINTS = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "training_state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write obj as JSON to path through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def optimizer_state_to_safetensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split optimizer.state_dict() into tensors (for safetensors) and JSON metadata.

    Tensor entry `state.<param index>.<name>`; non-tensor per-parameter values and
    the param_groups (hyper-parameters) go to the metadata.
    """
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state_dict["param_groups"]]
    metadata = {"param_groups": groups, "scalar_state": scalars}
    json.dumps(metadata)  # fail here, before anything is written, if a value is not JSON
    return tensors, metadata


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Inverse of optimizer_state_to_safetensors; tensors move to their parameters' devices."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in metadata.get("scalar_state", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in metadata["param_groups"]]
    if len(groups) != len(optimizer.param_groups) or any(
        len(g["params"]) != len(mine["params"]) for g, mine in zip(groups, optimizer.param_groups)
    ):
        raise ValueError("the checkpoint's optimizer has different parameter groups from this model's")
    # Optimizer.load_state_dict casts floating state to the parameter's dtype and device.
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict:
    """The scheduler's state without its lambdas (functions are code, rebuilt by the caller)."""
    state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    json.dumps(state)
    return state


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, directory), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    save_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extra_state: dict | None = None,
    keep_last: int = 2,
) -> Path:
    """Write the checkpoint of `step` atomically and keep only the newest keep_last ones.

    save_model(directory) writes the weights (the model's save_pretrained).
    """
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_model(tmp)
        tensors, optimizer_metadata = optimizer_state_to_safetensors(optimizer)
        write_safetensors(tensors, tmp / OPTIMIZER_FILE, {"format": "fastmlm-optimizer"})
        state = {
            "step": step,
            "optimizer": optimizer_metadata,
            "scheduler": scheduler_state(scheduler),
            **(extra_state or {}),
        }
        write_json_atomic(tmp / STATE_FILE, state)
        for path in tmp.iterdir():
            with path.open("rb") as f:
                os.fsync(f.fileno())
        # The same step saved again (e.g. a resumed run ending where it began): the old one
        # is moved aside, not deleted, until the new one is in place (a directory cannot be
        # replaced by a rename), so a crash in between still leaves a whole checkpoint,
        # which the next save's _prune puts back.
        aside = final.parent / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(run_dir, keep_last)
    return final


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _prune(run_dir: str | Path, keep_last: int) -> None:
    """Remove all but the newest keep_last checkpoints, and temporaries of dead runs."""
    root = Path(run_dir) / CHECKPOINTS
    for entry in root.iterdir():
        # .step-N.tmp-PID / .step-N.old-PID: another live process may still be writing its own.
        match = re.fullmatch(r"\.(step-\d+)\.(tmp|old)-(\d+)", entry.name)
        if match is None or int(match.group(3)) == os.getpid() or _pid_alive(int(match.group(3))):
            continue
        final = root / match.group(1)
        if match.group(2) == "old" and not final.exists():
            os.replace(entry, final)  # set aside by a run killed before its new copy was in place
        else:
            shutil.rmtree(entry, ignore_errors=True)
    if keep_last > 0:
        for _, path in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint_state(
    directory: str | Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict:
    """Restore optimizer and scheduler from a checkpoint; return its training_state.json.

    The model weights are loaded by the caller (MaskedLM.from_pretrained(directory)).
    """
    directory = Path(directory)
    try:
        with (directory / STATE_FILE).open(encoding="utf-8") as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{directory / STATE_FILE} is not valid JSON: {e}") from None
    tensors = read_safetensors(str(directory / OPTIMIZER_FILE))
    load_optimizer_state(optimizer, tensors, state["optimizer"])
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    return state
