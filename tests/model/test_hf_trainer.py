"""fastmlm's models in HuggingFace's Trainer, the training script many users already have."""
from __future__ import annotations

import pytest
import torch

from fastmlm import MaskedLM, SequenceClassifier
from fastmlm.config import EncoderConfig

CONFIG = EncoderConfig(vocab_size=90, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                       max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0)
SEQ = 12


def example(i):
    """A padded example with MLM labels and a class label, as a collator would give it."""
    gen = torch.Generator().manual_seed(i)
    length = 4 + i % (SEQ - 4)
    ids = torch.randint(5, CONFIG.vocab_size, (SEQ,), generator=gen)
    mask = (torch.arange(SEQ) < length).long()
    labels = torch.where((torch.rand(SEQ, generator=gen) < 0.3) & mask.bool(), ids, -100)
    labels[0] = ids[0]
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels, "class_label": i % 3}


EXAMPLES = [example(i) for i in range(8)]


def trainer(model, tmp_path, examples, **options):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    transformers.logging.set_verbosity_error()
    options = {"max_steps": 2, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
               "learning_rate": 1e-3, "report_to": [], "use_cpu": True, "save_strategy": "no", "seed": 0, **options}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), **options)
    return transformers.Trainer(model=model, args=args, train_dataset=examples, eval_dataset=examples)


def test_masked_lm_trains_and_evaluates_in_the_trainer(tmp_path):
    # The Trainer reads outputs as out[0] (the loss) and out[1:], and turns on
    # activation checkpointing through transformers 5's entry point.
    torch.manual_seed(0)
    model = MaskedLM(CONFIG)
    examples = [{k: v for k, v in e.items() if k != "class_label"} for e in EXAMPLES]
    run = trainer(model, tmp_path, examples, activation_checkpointing=True)
    result = run.train()
    assert model.is_activation_checkpointing and result.global_step == 2
    assert torch.isfinite(torch.tensor(result.training_loss))
    # eval_loss: the mean over its batches of 4 (in order) of the model's own loss.
    model.eval()
    with torch.no_grad():
        losses = [model(**{k: torch.stack([e[k] for e in examples[i:i + 4]]) for k in examples[0]}).loss
                  for i in (0, 4)]
    assert run.evaluate()["eval_loss"] == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)


def test_sequence_classifier_predictions_in_the_trainer(tmp_path):
    torch.manual_seed(0)
    model = SequenceClassifier(MaskedLM(CONFIG).encoder, num_labels=3)
    examples = [{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"], "labels": e["class_label"]}
                for e in EXAMPLES]
    run = trainer(model, tmp_path, examples)
    run.train()
    predictions = run.predict(examples)
    model.eval()
    with torch.no_grad():
        logits = model(torch.stack([e["input_ids"] for e in examples]),
                       torch.stack([e["attention_mask"] for e in examples])).logits
    assert predictions.predictions.shape == (8, 3)
    torch.testing.assert_close(torch.as_tensor(predictions.predictions), logits, rtol=1e-5, atol=1e-6)


def test_outputs_index_as_huggingface_outputs():
    model = MaskedLM(CONFIG).eval()
    e = example(1)
    out = model(e["input_ids"][None], e["attention_mask"][None], labels=e["labels"][None])
    assert out[0] is out.loss and out["loss"] is out.loss and out.keys() == ["loss"] and out[1:] == ()
    assert "loss" in out and "logits" not in out and out.get("logits") is None and out.get("loss") is out.loss
    out = model(e["input_ids"][None], e["attention_mask"][None], labels=e["labels"][None], return_logits=True)
    assert out.to_tuple() == (out.loss, out.logits) and len(out) == 2
    with pytest.raises(KeyError, match="no 'positions'"):
        out["positions"]  # an attribute, not one of HuggingFace's fields
    classifier = SequenceClassifier(model.encoder, num_labels=3).eval()
    out = classifier(e["input_ids"][None], e["attention_mask"][None])
    assert out[0] is out.logits and out.keys() == ["logits"]
    out = classifier(e["input_ids"][None], e["attention_mask"][None], labels=torch.tensor([1]))
    assert out[0] is out.loss and out[1] is out.logits


def test_num_items_in_batch_makes_accumulated_gradients_the_whole_batchs():
    # Two micro-batches, each loss a sum over its labelled rows divided by the count of
    # both (what the Trainer passes): their accumulated gradients are the whole batch's mean.
    torch.manual_seed(0)
    model = MaskedLM(CONFIG).train()
    batch = {k: torch.stack([e[k] for e in EXAMPLES]) for k in ("input_ids", "attention_mask", "labels")}
    model(**batch).loss.backward()
    whole = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    count = (batch["labels"] != -100).sum()
    for half in (slice(0, 3), slice(3, 8)):  # unequal halves with unequal label counts
        model(**{k: v[half] for k, v in batch.items()}, num_items_in_batch=count).loss.backward()
    for name, grad in whole.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-7)
    # The same count as an int, on the logits path too.
    full = model(**batch, return_logits=True).loss
    torch.testing.assert_close(model(**batch, num_items_in_batch=int(count), return_logits=True).loss, full)
    # A step whose micro-batches have no labels at all: a zero loss and gradients, not NaN.
    unlabelled = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    model.zero_grad()
    loss = model(**unlabelled, num_items_in_batch=torch.tensor(0)).loss
    loss.backward()
    assert float(loss.detach()) == 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert not MaskedLM(CONFIG, objective="causal").accepts_loss_kwargs  # the Trainer's count would be off
    for bad in (0, -3, 2.5, True, torch.ones(2), torch.tensor(True)):
        with pytest.raises(ValueError, match="num_items_in_batch must be"):
            model(**batch, num_items_in_batch=bad)


def test_trainer_accumulates_with_the_whole_batch_count(tmp_path):
    torch.manual_seed(0)
    model = MaskedLM(CONFIG)
    examples = [{k: v for k, v in e.items() if k != "class_label"} for e in EXAMPLES]
    counts = []
    model.register_forward_pre_hook(lambda m, args, kwargs: counts.append(kwargs.get("num_items_in_batch")),
                                    with_kwargs=True)
    run = trainer(model, tmp_path, examples, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    assert run.model_accepts_loss_kwargs
    result = run.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    # Each micro-batch got the labelled count of its optimiser step's two micro-batches.
    assert len(counts) == 4 and all(c is not None for c in counts)
    assert counts[0] == counts[1] and counts[2] == counts[3]
    assert int(counts[0]) + int(counts[2]) == sum(int((e["labels"] != -100).sum()) for e in examples)


def test_patched_huggingface_model_accumulates_as_one_batch(tmp_path):
    # HuggingFace's BertForMaskedLM takes **kwargs, so the Trainer hands it the step's label
    # count and does not divide by the accumulation steps; transformers 5.24's BERT ignores
    # the count (its gradients come out ~2x here). The patched model divides by it.
    transformers = pytest.importorskip("transformers")
    from fastmlm import patch_hf

    config = transformers.BertConfig(**CONFIG.to_hf())
    examples = [{k: v for k, v in e.items() if k != "class_label"} for e in EXAMPLES[:4]]

    def step_gradients(accumulation):
        torch.manual_seed(0)
        model = patch_hf(transformers.BertForMaskedLM(config))
        grads = {}

        class Grab(transformers.TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

        # One optimiser step over all four examples: the order the Trainer draws them in does not matter.
        run = trainer(model, tmp_path, examples, max_steps=1, per_device_train_batch_size=4 // accumulation,
                      gradient_accumulation_steps=accumulation, max_grad_norm=0)
        run.add_callback(Grab())
        run.train()
        return grads

    once, accumulated = step_gradients(1), step_gradients(2)
    assert once.keys() == accumulated.keys() and once
    for name, grad in once.items():
        if not name.endswith("attention.self.key.bias"):  # zero up to rounding
            assert float((accumulated[name] - grad).norm() / grad.norm()) < 1e-5, name
