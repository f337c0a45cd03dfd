"""The gradient-in-forward path of mlm_cross_entropy and mlm_head (fastmlm/ops/summed_loss.py).

On the CPU, with the `cpu` backend and logits that fit one chunk, a mean or sum
loss goes through the `*_summed` op: a mean folds 1 / count into the gradients
at forward time, a backward with upstream gradient exactly 1 hands them out
untouched, any other upstream gradient scales them in place. Each case is
checked against the `torch` backend (plain autograd) in fp64-free fp32.
"""
from __future__ import annotations

import pytest
import torch

from fastmlm.kernels.compiled import cross_entropy as ce
from fastmlm.ops import mlm_cross_entropy, mlm_head, use_backend
from tests.tolerances import assert_close

pytestmark = pytest.mark.skipif(ce.available("cpu") is not None, reason=str(ce.available("cpu")))

IGNORE = -100


def _cross_entropy_problem(seed, all_ignored=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(11, 16, generator=g)
    weight = torch.randn(37, 16, generator=g) * 0.3
    bias = torch.randn(37, generator=g)
    targets = torch.randint(0, 37, (11,), generator=g)
    targets[::3] = IGNORE
    if all_ignored:
        targets.fill_(IGNORE)
    leaves = [hidden, weight, bias]

    def loss_of(tensors, reduction):
        return mlm_cross_entropy(tensors[0], tensors[1], targets, tensors[2], ignore_index=IGNORE,
                                 reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    return leaves, loss_of


def _head_problem(seed, all_ignored=False):
    g = torch.Generator().manual_seed(seed)
    width, vocab = 16, 37
    leaves = [torch.randn(9, width, generator=g), torch.randn(width, width, generator=g) * 0.25,
              torch.randn(width, generator=g), 1 + 0.1 * torch.randn(width, generator=g),
              torch.randn(width, generator=g), torch.randn(vocab, width, generator=g) * 0.25,
              torch.randn(vocab, generator=g)]
    index = torch.tensor([0, 4, 4, 8, 2])
    targets = torch.tensor([3, IGNORE, 36, 0, 7])
    if all_ignored:
        targets.fill_(IGNORE)

    def loss_of(tensors, reduction):
        return mlm_head(tensors[0], index, *tensors[1:], targets, ignore_index=IGNORE, reduction=reduction,
                        label_smoothing=0.1, z_loss=1e-3)
    return leaves, loss_of


PROBLEMS = {"mlm_cross_entropy": _cross_entropy_problem, "mlm_head": _head_problem}


def _loss_and_grads(backend, family, leaves, loss_of, reduction, upstream):
    tensors = [t.clone().requires_grad_() for t in leaves]
    with use_backend(backend, family):
        loss = loss_of(tensors, reduction)
        node = type(loss.grad_fn).__name__
        if upstream is None:
            loss.backward()
        else:
            loss.backward(torch.tensor(upstream))
    return loss.detach(), [t.grad for t in tensors], node


@pytest.mark.parametrize("family", list(PROBLEMS))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("upstream", [None, 2.5, 0.0], ids=["backward()", "upstream-2.5", "upstream-0"])
@pytest.mark.parametrize("all_ignored", [False, True], ids=["labelled", "all-ignored"])
def test_summed_path_matches_autograd(family, reduction, upstream, all_ignored):
    leaves, loss_of = PROBLEMS[family](seed=3, all_ignored=all_ignored)
    loss, grads, node = _loss_and_grads("cpu", family, leaves, loss_of, reduction, upstream)
    # The loss is the summed op's own output: a CPU mean's 1 / count is inside the op, not a division after it.
    assert "summed" in node, f"expected the {family} summed op to produce the loss, got {node}"
    expected_loss, expected_grads, _ = _loss_and_grads("torch", family, leaves, loss_of, reduction, upstream)
    assert_close(loss, expected_loss, torch.float32, "loss")
    for i, (a, e) in enumerate(zip(grads, expected_grads)):
        assert torch.isfinite(a).all(), f"gradient {i} has non-finite values"
        assert_close(a, e, torch.float32, f"gradient {i}")
    if all_ignored:
        assert loss.item() == 0.0 and all(not g.any() for g in grads)


@pytest.mark.parametrize("family", list(PROBLEMS))
@pytest.mark.parametrize("second_pass", ["retain_graph", "create_graph"])
def test_summed_path_refuses_what_its_handed_out_gradients_cannot_give(family, second_pass):
    # The gradients are scaled in place (so one backward pass per forward) and carry no
    # graph (so a gradient penalty through them would silently get none).
    leaves, loss_of = PROBLEMS[family](seed=4)
    tensors = [t.clone().requires_grad_() for t in leaves]
    with use_backend("cpu", family):
        loss = loss_of(tensors, "mean")
    assert "summed" in type(loss.grad_fn).__name__
    if second_pass == "retain_graph":
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="one backward pass per forward"):
            loss.backward()
    else:
        with pytest.raises(RuntimeError, match="no double backward"):
            torch.autograd.grad(loss, tensors[0], create_graph=True)


@pytest.mark.parametrize("family", list(PROBLEMS))
def test_handed_out_gradients_are_plain_tensors(family):
    # autograd.grad without create_graph returns tensors outside the graph, so a
    # fast-weights step (w - lr * grad) then trains like any other tensor.
    leaves, loss_of = PROBLEMS[family](seed=6)
    tensors = [t.clone().requires_grad_() for t in leaves]
    with use_backend("cpu", family):
        grads = torch.autograd.grad(loss_of(tensors, "mean"), tensors)
        assert not any(g.requires_grad or g.grad_fn is not None for g in grads)
        stepped = [t - 0.1 * g for t, g in zip(tensors, grads)]
        loss_of(stepped, "mean").backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in tensors)


@pytest.mark.parametrize("dtype,upstream", [(torch.float16, 65536.0), (torch.bfloat16, 1 / 3)],
                         ids=["fp16-loss-scale-2**16", "bf16-one-third"])
def test_upstream_gradient_is_not_rounded_to_the_input_dtype(dtype, upstream):
    # 2**16 is inf in fp16 and 1/3 is 0.2% off in bf16: the scale is applied in fp32.
    g = torch.Generator().manual_seed(7)
    hidden = (0.01 * torch.randn(4, 8, generator=g)).to(dtype)
    targets = torch.tensor([0, 1, 2, 3])
    weight = torch.randn(6, 8, generator=g).to(dtype)
    w64 = weight.double().requires_grad_()
    (mlm_cross_entropy(hidden.double(), w64, targets, reduction="sum") * upstream).backward()
    w = weight.clone().requires_grad_()
    with use_backend("cpu", "mlm_cross_entropy"):
        (mlm_cross_entropy(hidden, w, targets, reduction="sum") * upstream).backward()
    assert torch.isfinite(w.grad).all()
    assert_close(w.grad, w64.grad.to(dtype), dtype, "weight gradient")


def _summed_op_args(family):
    """Arguments of a direct call of `fastmlm::<family>_summed` (scale 0.25) on fresh inputs."""
    g = torch.Generator().manual_seed(8)
    width, vocab, rows = 16, 37, 7
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[1] = IGNORE
    decoder = (torch.randn(vocab, width, generator=g) * 0.25, torch.randn(vocab, generator=g))
    options = (IGNORE, 0.1, 1e-3, 0.25)  # ignore_index, label_smoothing, z_loss, scale
    if family == "mlm_cross_entropy":
        return (torch.randn(rows, width, generator=g), decoder[0], decoder[1], targets, *options)
    head = (torch.randn(width, width, generator=g) * 0.25, torch.randn(width, generator=g),
            1 + 0.1 * torch.randn(width, generator=g), torch.randn(width, generator=g))
    hidden_all, index = torch.randn(11, width, generator=g), torch.tensor([0, 4, 4, 10, 2, 7, 5])
    return (hidden_all, index, *head, *decoder, targets, 1e-12, *options)


@pytest.mark.parametrize("family", list(PROBLEMS))
def test_summed_op_runs_a_backend_without_a_fused_path(family):
    # Called directly, the summed op takes any backend: one without `forward_backward` (the
    # torch reference here) runs its forward, then its backward with every row weighted by
    # the scale. Its loss, log-sum-exp and gradients are those of the fused `cpu` path.
    op = getattr(torch.ops.fastmlm, f"{family}_summed")
    args = _summed_op_args(family)
    with use_backend("torch", family):
        unfused = op(*args)
    with use_backend("cpu", family):
        fused = op(*args)
    assert len(unfused) == len(fused)
    for i, (got, want) in enumerate(zip(unfused, fused)):
        assert_close(got, want, torch.float32, f"output {i}")
