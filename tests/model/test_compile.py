"""torch.compile(fullgraph=True) of a whole MaskedLM training step with static shapes.

The compiled function is the forward and loss; AOTAutograd compiles its
backward as one graph too, which `loss.backward()` runs (Dynamo itself does not
trace a `.backward()` call). With mask_capacity and token_capacity nothing in the step depends on the data's
shape: one compilation serves batches with different padding and label counts
(checked with `fail_on_recompile`), and the compiled step matches eager.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from fastmlm.model import MaskedLM
from tests.model.helpers import padded_batch, random_labels, relative_error, tiny_config

pytestmark = pytest.mark.slow

BATCH, SEQ = 3, 8


def make_model(**overrides):
    config = tiny_config(40, num_layers=2, num_heads=2, hidden_size=16, intermediate_size=32, vocab_size=48,
                         max_position_embeddings=16, **overrides)
    torch.manual_seed(40)
    return MaskedLM(config, mask_capacity=12, token_capacity=BATCH * SEQ, last_layer_subset=True)


def loss_of(model, ids, mask, types, labels):
    return model(ids, mask, types, labels=labels).loss


def train_step(loss_fn, model, optimizer, ids, mask, types, labels):
    loss = loss_fn(model, ids, mask, types, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    return loss.detach()


def batches(config):
    for seed in (41, 42, 43):
        ids, mask, types = padded_batch(config, seed, batch=BATCH, seq=SEQ)
        yield ids, mask, types, random_labels(ids, mask, seed, p=0.25)


def test_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    eager = make_model()
    compiled_model = copy.deepcopy(eager)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.1)
    compiled_opt = torch.optim.SGD(compiled_model.parameters(), lr=0.1)
    compiled_loss = torch.compile(loss_of, fullgraph=True)
    for i, batch in enumerate(batches(eager.config)):
        expected = train_step(loss_of, eager, eager_opt, *batch)
        if i == 0:
            actual = train_step(compiled_loss, compiled_model, compiled_opt, *batch)
        else:
            # Different padding and label counts, same shapes: no new graph.
            with torch.compiler.set_stance("fail_on_recompile"):
                actual = train_step(compiled_loss, compiled_model, compiled_opt, *batch)
        assert relative_error(actual, expected) < 1e-5, f"step {i}"
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        assert relative_error(q, p) < 1e-5, name


def test_compiled_training_step_with_attention_dropout():
    """Attention dropout in train mode compiles with fullgraph=True and draws a fresh mask per call.

    The per-layer seed is a device tensor drawn inside the graph, so there is
    no data-dependent int and no graph break; calls with the same weights and
    batch differ only through the mask, and eval() (no dropout) matches eager.
    """
    torch._dynamo.reset()
    model = make_model(attention_dropout=0.3)
    batch = next(batches(model.config))
    model.train()
    with torch.no_grad():  # eager first: also the baseline the compiled draws are compared with
        eager_train = torch.stack([loss_of(model, *batch) for _ in range(4)])
    compiled_loss = torch.compile(loss_of, fullgraph=True)
    losses = []
    for _ in range(4):
        with torch.compiler.set_stance("fail_on_recompile") if losses else contextlib.nullcontext():
            loss = compiled_loss(model, *batch)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    losses = torch.stack(losses)
    assert len(set(losses.tolist())) == 4, f"a loss repeats: the dropout mask did not change {losses}"
    # Same distribution of masks as eager: the spread between draws is alike, the means close.
    assert abs(float(eager_train.mean() - losses.mean())) < 3 * float(eager_train.std() + losses.std())
    # Dropout is what changed between calls: in eval mode the compiled step is eager's.
    model.eval()
    with torch.no_grad():
        eager_eval = loss_of(model, *batch)
        compiled_eval = torch.compile(loss_of, fullgraph=True)(model, *batch)
    assert relative_error(compiled_eval, eager_eval) < 1e-5
    assert not torch.isclose(losses, eager_eval).any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_captures_the_training_step():
    """mode='reduce-overhead': the forward and backward replay as CUDA graphs, no skipped partitions."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = make_model().cuda()
    compiled_model = copy.deepcopy(eager)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.1)
    compiled_opt = torch.optim.SGD(compiled_model.parameters(), lr=0.1)
    compiled_loss = torch.compile(loss_of, fullgraph=True, mode="reduce-overhead")
    for i, batch in enumerate(batches(eager.config)):
        batch = [t.cuda() for t in batch]
        expected = train_step(loss_of, eager, eager_opt, *batch)
        actual = train_step(compiled_loss, compiled_model, compiled_opt, *batch)
        assert relative_error(actual, expected) < 2e-3, f"step {i}"
    assert counters["inductor"].get("cudagraph_skips", 0) == 0, dict(counters["inductor"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replays_draw_fresh_attention_dropout():
    """mode='reduce-overhead' with attention dropout: captured once, every replay draws a new mask."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = make_model(attention_dropout=0.3).cuda().train()
    batch = [t.cuda() for t in next(batches(model.config))]
    compiled_loss = torch.compile(loss_of, fullgraph=True, mode="reduce-overhead")
    losses = []
    for _ in range(5):  # the first calls warm up and record; the later ones replay
        loss = compiled_loss(model, *batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        losses.append(loss.detach().clone())
    losses = torch.stack(losses)
    assert torch.isfinite(losses).all()
    assert len(set(losses.tolist())) == 5, f"a loss repeats: a replay reused a dropout mask {losses}"
    assert counters["inductor"].get("cudagraph_skips", 0) == 0, dict(counters["inductor"])
