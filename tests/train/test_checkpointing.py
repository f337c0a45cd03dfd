"""Checkpoint files: safetensors + JSON only, exact optimizer round trip, atomic writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastmlm.train import checkpointing
from fastmlm.train.pretrain import linear_warmup_decay


def _toy(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(2, 10))
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps, start=0):
    losses = []
    for step in range(start, start + steps):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(step))
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _save_model(model):
    def save(directory):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    return save


def test_linear_warmup_decay():
    f = linear_warmup_decay(4, 10)
    assert [f(s) for s in range(10)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert f(10) == 0.0 and f(50) == 0.0


def test_checkpoint_roundtrip_continues_identically(tmp_path):
    model, optimizer, scheduler = _toy()
    _train(model, optimizer, scheduler, 3)
    path = checkpointing.save_checkpoint(tmp_path, 3, save_model=_save_model(model), optimizer=optimizer,
                                         scheduler=scheduler, extra_state={"losses": [1.0, 2.0]})
    assert path == tmp_path / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "optimizer.safetensors",
                                                      "training_state.json"]
    reference = _train(model, optimizer, scheduler, 4, start=3)

    # A fresh process: new objects, weights and state from the files only.
    model2, optimizer2, scheduler2 = _toy(seed=1)
    model2.load_state_dict(load_file(str(path / "model.safetensors")))
    state = checkpointing.load_checkpoint_state(path, optimizer2, scheduler2)
    assert state["step"] == 3 and state["losses"] == [1.0, 2.0]
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(1e-2 * linear_warmup_decay(2, 10)(3))
    assert _train(model2, optimizer2, scheduler2, 4, start=3) == reference


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    model, optimizer, scheduler = _toy()
    _train(model, optimizer, scheduler, 2)
    path = checkpointing.save_checkpoint(tmp_path, 2, save_model=_save_model(model), optimizer=optimizer,
                                         scheduler=scheduler)
    for file in path.iterdir():
        if file.suffix == ".json":
            json.loads(file.read_text())
            continue
        assert file.suffix == ".safetensors"
        # safetensors: an 8-byte little-endian header length, then a JSON header;
        # not torch.save's zip ("PK") nor a bare pickle.
        data = file.read_bytes()
        header_length = int.from_bytes(data[:8], "little")
        assert json.loads(data[8 : 8 + header_length])
        load_file(str(file))
    tensors = load_file(str(path / "optimizer.safetensors"))
    assert set(tensors) == {f"state.{i}.{n}" for i in range(6) for n in ("step", "exp_avg", "exp_avg_sq")}


def test_optimizer_and_state_files_get_the_usual_permissions(tmp_path):
    model, optimizer, scheduler = _toy()
    previous = os.umask(0o027)
    try:
        path = checkpointing.save_checkpoint(tmp_path, 1, save_model=lambda d: None, optimizer=optimizer,
                                             scheduler=scheduler)
    finally:
        os.umask(previous)
    for name in ("optimizer.safetensors", "training_state.json"):
        assert os.stat(path / name).st_mode & 0o777 == 0o640, name


def test_failed_save_leaves_no_partial_checkpoint(tmp_path):
    model, optimizer, scheduler = _toy()
    _train(model, optimizer, scheduler, 1)
    checkpointing.save_checkpoint(tmp_path, 1, save_model=_save_model(model), optimizer=optimizer, scheduler=scheduler)

    def broken_save(directory):
        (directory / "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpointing.save_checkpoint(tmp_path, 2, save_model=broken_save, optimizer=optimizer, scheduler=scheduler)
    # Only the complete checkpoint of step 1 exists; no temporary directory is left.
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]
    assert checkpointing.latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000001"


def test_incomplete_and_stale_directories_are_ignored_and_pruned(tmp_path):
    model, optimizer, scheduler = _toy()
    root = tmp_path / "checkpoints"
    (root / "step-00000009").mkdir(parents=True)  # no training_state.json: not a checkpoint
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs (not reused this soon)
    (root / f".step-00000008.tmp-{dead.pid}").mkdir()  # left by a killed process
    (root / f".step-00000007.tmp-{os.getppid()}").mkdir()  # another live process, still writing
    assert checkpointing.latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3):
        checkpointing.save_checkpoint(tmp_path, step, save_model=_save_model(model), optimizer=optimizer,
                                      scheduler=scheduler, keep_last=2)
    assert [s for s, _ in checkpointing.list_checkpoints(tmp_path)] == [2, 3]
    assert not (root / f".step-00000008.tmp-{dead.pid}").exists()
    assert (root / f".step-00000007.tmp-{os.getppid()}").exists()
    # A checkpoint set aside by a run killed before its re-saved copy was in place comes back.
    checkpointing.checkpoint_dir(tmp_path, 3).rename(root / f".step-00000003.old-{dead.pid}")
    checkpointing.save_checkpoint(tmp_path, 4, save_model=_save_model(model), optimizer=optimizer,
                                  scheduler=scheduler, keep_last=3)
    assert [s for s, _ in checkpointing.list_checkpoints(tmp_path)] == [2, 3, 4]


def test_saving_a_step_again_replaces_it_whole(tmp_path):
    model, optimizer, scheduler = _toy()
    first = checkpointing.save_checkpoint(tmp_path, 4, save_model=_save_model(model), optimizer=optimizer,
                                          scheduler=scheduler, extra_state={"tag": "first"})
    _train(model, optimizer, scheduler, 1)
    again = checkpointing.save_checkpoint(tmp_path, 4, save_model=_save_model(model), optimizer=optimizer,
                                          scheduler=scheduler, extra_state={"tag": "again"})
    assert again == first
    assert json.loads((again / checkpointing.STATE_FILE).read_text())["tag"] == "again"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000004"]  # nothing set aside left


def test_optimizer_state_with_different_groups_is_rejected(tmp_path):
    model, optimizer, scheduler = _toy()
    _train(model, optimizer, scheduler, 1)
    path = checkpointing.save_checkpoint(tmp_path, 1, save_model=_save_model(model), optimizer=optimizer,
                                         scheduler=scheduler)
    other = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="parameter groups"):
        checkpointing.load_checkpoint_state(path, other, torch.optim.lr_scheduler.LambdaLR(other, lambda s: 1.0))


def test_damaged_checkpoint_files_are_clear_errors(tmp_path):
    model, optimizer, scheduler = _toy()
    _train(model, optimizer, scheduler, 1)
    path = checkpointing.save_checkpoint(tmp_path, 1, save_model=_save_model(model), optimizer=optimizer,
                                         scheduler=scheduler)
    state_file, optimizer_file = path / checkpointing.STATE_FILE, path / checkpointing.OPTIMIZER_FILE
    good_state, good_optimizer = state_file.read_bytes(), optimizer_file.read_bytes()
    optimizer_file.write_bytes(good_optimizer[: len(good_optimizer) // 2])
    with pytest.raises(ValueError, match="optimizer.safetensors is not a readable safetensors file"):
        checkpointing.load_checkpoint_state(path, optimizer, scheduler)
    optimizer_file.write_bytes(good_optimizer)
    state_file.write_bytes(good_state[:-5])
    with pytest.raises(ValueError, match="training_state.json is not valid JSON"):
        checkpointing.load_checkpoint_state(path, optimizer, scheduler)


def test_write_json_atomic(tmp_path):
    checkpointing.write_json_atomic(tmp_path / "a.json", {"x": 1})
    with pytest.raises(TypeError):
        checkpointing.write_json_atomic(tmp_path / "a.json", {"x": object()})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}  # the old content survives
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
