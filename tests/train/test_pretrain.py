"""Pre-training loop and command line, on a tiny model and corpus (CPU, a few seconds each)."""
from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

from fastmlm.cli import SUBCOMMANDS, Subcommand, main, register
from fastmlm.data import stdlib_docstring_documents
from fastmlm.train import PretrainConfig, pretrain
from fastmlm.train import checkpointing
from fastmlm.train.setup import resolve_device

TINY = dict(batch_size=8, max_length=32, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
            vocab_size=400, log_every=2, bucket_pool_batches=4, device="cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster on a busy machine
    (idle OpenMP workers spinning against other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """A small BERT-format corpus: a few stdlib modules' docstrings, one sentence per line."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    documents = stdlib_docstring_documents(["heapq", "bisect", "textwrap", "string", "json", "base64"])
    path.write_text("\n\n".join("\n".join(doc) for doc in documents) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_file(corpus_file, tmp_path_factory):
    """One trained tokenizer for runs that must see identical data (WordPiece
    training itself is not bit-reproducible across trainings)."""
    from fastmlm.data import corpus_documents, corpus_sentences, train_wordpiece

    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_wordpiece(corpus_sentences(corpus_documents([corpus_file])), vocab_size=400).save(path)
    return str(path)


def _config(tmp_path, corpus_file, name="run", **overrides):
    return PretrainConfig(out_dir=str(tmp_path / name), corpus=[corpus_file], **{**TINY, **overrides})


def _quiet(_):
    pass


def test_loss_falls_and_encoder_is_saved(tmp_path, corpus_file):
    from fastmlm import Encoder

    result = pretrain(_config(tmp_path, corpus_file, steps=40, learning_rate=1e-2, log_every=5), log=_quiet)
    assert len(result.losses) == 40 and all(torch.isfinite(torch.tensor(result.losses)))
    # From about ln(vocab) = 6.0 to below 5.7 (step-to-step noise of a window mean is about 0.1).
    assert result.final_loss < result.initial_loss - 0.3, (result.initial_loss, result.final_loss)
    assert result.tokens_per_s > 0 and 0 < result.masked_tokens_per_s < result.tokens_per_s
    encoder = Encoder.from_pretrained(result.encoder_dir)
    assert encoder.config.hidden_size == 32 and (result.encoder_dir / "tokenizer.json").is_file()
    run = json.loads((result.out_dir / "run.json").read_text())
    assert run["config"]["steps"] == 40 and len(run["data_fingerprint"]) == 64
    # Only safetensors and JSON in the run directory: no pickle anywhere.
    files = [p for p in result.out_dir.rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".safetensors", ".json") for p in files), files


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path, corpus_file, tokenizer_file):
    # Dropout on, so the per-step reseeding of dropout is exercised too.
    settings = dict(steps=8, hidden_dropout=0.1, checkpoint_every=3, tokenizer=tokenizer_file)
    full = pretrain(_config(tmp_path, corpus_file, "full", **settings), log=_quiet)

    first = pretrain(_config(tmp_path, corpus_file, "split", stop_after=5, **settings), log=_quiet)
    assert first.steps_done == 5 and first.encoder_dir is None
    checkpoints = checkpointing.list_checkpoints(first.out_dir)
    assert [s for s, _ in checkpoints] == [3, 5]
    # Step 3 is mid-log-window (log_every=2): its loss history is still complete.
    state = json.loads((checkpoints[0][1] / "training_state.json").read_text())
    assert state["step"] == 3 and state["losses"] == pytest.approx(full.losses[:3], rel=1e-6)
    second = pretrain(_config(tmp_path, corpus_file, "split", resume=True, **settings), log=_quiet)
    assert second.resumed_from_step == 5 and second.steps_done == 8
    torch.testing.assert_close(torch.tensor(second.losses), torch.tensor(full.losses), rtol=1e-6, atol=1e-6)
    # The final weights agree as well.
    from safetensors.torch import load_file
    a = load_file(str(full.encoder_dir / "model.safetensors"))
    b = load_file(str(second.encoder_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_run_directory_guards(tmp_path, corpus_file):
    pretrain(_config(tmp_path, corpus_file, steps=2), log=_quiet)
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain(_config(tmp_path, corpus_file, steps=2), log=_quiet)
    with pytest.raises(ValueError, match="different configuration.*seed"):
        pretrain(_config(tmp_path, corpus_file, steps=2, seed=1, resume=True), log=_quiet)
    # Resuming a finished run does no steps and leaves it finished.
    again = pretrain(_config(tmp_path, corpus_file, steps=2, resume=True), log=_quiet)
    assert again.resumed_from_step == 2 and len(again.losses) == 2
    # --stop-after below the checkpoint's step reports where the run is, not the stop value.
    again = pretrain(_config(tmp_path, corpus_file, steps=2, resume=True, stop_after=1), log=_quiet)
    assert again.steps_done == 2 and len(again.losses) == 2


def test_causal_objective(tmp_path, corpus_file):
    result = pretrain(_config(tmp_path, corpus_file, steps=12, objective="causal", learning_rate=1e-2),
                      log=_quiet)
    assert result.final_loss < result.initial_loss
    # Nearly every real token is a target: far more than the 15% of MLM.
    assert result.masked_tokens_per_s > 0.8 * result.tokens_per_s


def test_init_from_checkpoint_and_its_tokenizer(tmp_path, corpus_file):
    base = pretrain(_config(tmp_path, corpus_file, "base", steps=2), log=_quiet)
    # The encoder directory is a HuggingFace BertModel checkpoint with a tokenizer:
    # continue pre-training from it (its MLM head starts fresh).
    result = pretrain(_config(tmp_path, corpus_file, "continued", steps=2, init=str(base.encoder_dir)),
                      log=_quiet)
    tokenizer = json.loads((result.out_dir / "tokenizer.json").read_text())
    assert tokenizer["model"]["vocab"] == json.loads((base.out_dir / "tokenizer.json").read_text())["model"]["vocab"]
    # The fresh head comes from --seed, not from whatever torch's generator held.
    torch.manual_seed(12345)
    again = pretrain(_config(tmp_path, corpus_file, "again", steps=2, init=str(base.encoder_dir)), log=_quiet)
    assert again.losses == result.losses
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        pretrain(_config(tmp_path, corpus_file, "nowhere", steps=2, init=str(tmp_path / "nowhere")), log=_quiet)


def test_mask_capacity_drops_masked_rows_past_it(tmp_path, corpus_file, tokenizer_file):
    # As --mask-capacity says, on every device: a batch with more masked rows than the
    # capacity trains on the first ones (an eager-mode model call would refuse it).
    result = pretrain(_config(tmp_path, corpus_file, steps=2, tokenizer=tokenizer_file, mask_capacity=3), log=_quiet)
    assert len(result.losses) == 2 and all(math.isfinite(loss) for loss in result.losses)
    assert result.masked_tokens_per_s > 0


def test_a_diverged_run_stops_before_logging_or_saving_it(tmp_path, corpus_file, tokenizer_file, monkeypatch,
                                                           capsys):
    import importlib

    pretrain_module = importlib.import_module("fastmlm.train.pretrain")  # the package exports a function of that name
    real_training_step = pretrain_module.training_step

    def diverging_at_step_3(*args, **kwargs):
        step_fn = real_training_step(*args, **kwargs)

        def step(step, batch):
            loss, grad_norm, count = step_fn(step, batch)
            return (torch.full_like(loss, math.nan) if step == 2 else loss), grad_norm, count
        return step

    monkeypatch.setattr(pretrain_module, "training_step", diverging_at_step_3)
    settings = dict(steps=6, log_every=5, checkpoint_every=2, tokenizer=tokenizer_file)
    with pytest.raises(FloatingPointError, match="loss is nan at step 3"):
        pretrain(_config(tmp_path, corpus_file, **settings), log=_quiet)
    assert checkpointing.latest_checkpoint(tmp_path / "run").name.endswith("2")  # step 2's, none after
    assert main(["pretrain", "--out", str(tmp_path / "cli"), "--corpus", corpus_file, "--tokenizer",
                 tokenizer_file, "--steps", "6", "--log-every", "5", "--hidden-size", "32", "--num-layers", "1",
                 "--num-heads", "2", "--intermediate-size", "64", "--batch-size", "4", "--max-length", "32"]) == 2
    assert "training diverged" in capsys.readouterr().err


def test_config_validation():
    with pytest.raises(ValueError, match="objective"):
        PretrainConfig(objective="electra")
    with pytest.raises(ValueError, match="steps"):
        PretrainConfig(steps=0)
    with pytest.raises(ValueError, match="mlm_probability"):
        PretrainConfig(mlm_probability=1.5)
    with pytest.raises(ValueError, match="max_grad_norm"):  # a negative norm would flip every gradient
        PretrainConfig(max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="keep_checkpoints"):
        PretrainConfig(keep_checkpoints=0)
    with pytest.raises(ValueError, match="not a multiple of num_heads"):
        PretrainConfig(hidden_size=32, num_heads=3)
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda"):
        resolve_device("bogus")
    with pytest.raises(ValueError, match="max_length must be at least 5"):
        PretrainConfig(max_length=4)
    for bad, message in (({"adam_eps": 0.0}, "adam_eps"), ({"weight_decay": -0.5}, "weight_decay"),
                         ({"learning_rate": 0.0}, "learning_rate"), ({"adam_betas": (0.9, 1.0)}, "adam_betas"),
                         ({"hidden_dropout": 1.0}, "hidden_dropout"), ({"bucket_pool_batches": -1}, "bucket_pool"),
                         ({"mask_capacity": 0}, "mask_capacity")):
        with pytest.raises(ValueError, match=message):  # AdamW takes eps 0 and trains to NaN
            PretrainConfig(**bad)
    assert PretrainConfig(corpus="/data/one.txt").corpus == ["/data/one.txt"]  # one path, not its characters


def test_fresh_run_does_not_take_a_stale_tokenizer(tmp_path, corpus_file, tokenizer_file):
    # A failed earlier run may leave tokenizer.json behind; a fresh run (no --resume) builds
    # the tokenizer its options ask for instead of silently reusing that file.
    stale = tmp_path / "run"
    stale.mkdir()
    (stale / "tokenizer.json").write_text(pathlib.Path(tokenizer_file).read_text())
    result = pretrain(_config(tmp_path, corpus_file, steps=1, vocab_size=250), log=_quiet)
    vocab = json.loads((result.out_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) <= 250 < len(json.loads(pathlib.Path(tokenizer_file).read_text())["model"]["vocab"])


def test_cli_pretrain_and_errors(tmp_path, corpus_file, capsys):
    out = tmp_path / "cli"
    argv = ["pretrain", "--out", str(out), "--corpus", corpus_file, "--steps", "2", "--batch-size", "4",
            "--max-length", "32", "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2",
            "--intermediate-size", "64", "--vocab-size", "300", "--log-every", "1", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "step      2/2" in printed and "done:" in printed and (out / "encoder" / "model.safetensors").is_file()
    assert main(argv) == 2  # checkpoints exist and no --resume: one clear error line
    assert "--resume" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0
    with pytest.raises(SystemExit):
        main(["pretrain", "--objective", "electra"])


def test_cli_registry_accepts_new_subcommands(capsys):
    def add_arguments(parser):
        parser.add_argument("--name", default="x")

    def run(args):
        print(f"hello {args.name}")
        return 0

    register(Subcommand("_hello", "test subcommand", add_arguments, run))
    try:
        assert main(["_hello", "--name", "fastmlm"]) == 0
        assert capsys.readouterr().out == "hello fastmlm\n"
        with pytest.raises(ValueError, match="already registered"):
            register(Subcommand("_hello", "again", add_arguments, run))
    finally:
        del SUBCOMMANDS["_hello"]


def test_cli_info(capsys):
    from fastmlm import info

    assert main(["info"]) == 0
    assert capsys.readouterr().out.strip() == info.report().strip()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("objective", ["mlm", "causal"])
def test_pretrain_on_cuda_bf16_and_resume(tmp_path, corpus_file, tokenizer_file, objective):
    settings = dict(steps=30, device="cuda", precision="bf16", learning_rate=1e-2, tokenizer=tokenizer_file,
                    log_every=5, hidden_dropout=0.1, attention_dropout=0.1, objective=objective)
    full = pretrain(_config(tmp_path, corpus_file, "full", **settings))
    assert all(torch.isfinite(torch.tensor(full.losses)))
    assert full.final_loss < full.initial_loss - 0.3, (full.initial_loss, full.final_loss)
    pretrain(_config(tmp_path, corpus_file, "split", stop_after=12, **settings), log=_quiet)
    resumed = pretrain(_config(tmp_path, corpus_file, "split", resume=True, **settings), log=_quiet)
    # Same batches, masks and dropout; only the order of floating-point sums
    # (atomics in GPU backward kernels) may differ.
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full.losses), rtol=2e-2, atol=2e-2)


def test_gradient_checkpointing_trains_the_same_run(tmp_path, corpus_file, tokenizer_file):
    # --gradient-checkpointing changes memory, not results: same losses and weights (dropout on).
    settings = dict(steps=3, hidden_dropout=0.1, attention_dropout=0.1, tokenizer=tokenizer_file)
    plain = pretrain(_config(tmp_path, corpus_file, "plain", **settings), log=_quiet)
    checkpointed = pretrain(_config(tmp_path, corpus_file, "checkpointed", gradient_checkpointing=True, **settings),
                            log=_quiet)
    assert checkpointed.losses == plain.losses
    from safetensors.torch import load_file
    a = load_file(str(plain.encoder_dir / "model.safetensors"))
    b = load_file(str(checkpointed.encoder_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
