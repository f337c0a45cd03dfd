"""Cases for mlm_cross_entropy: value and the gradients of hidden, weight and bias."""
import torch

from fastmlm.ops import mlm_cross_entropy
from tests.ops.harness import OpCase, strided_view


def ce_case(name, rows, hidden_size, vocab, *, bias=True, ignored=0.2, reduction="mean", label_smoothing=0.0,
            z_loss=0.0, scale=1.0, strided=False, masked_vocab=0):
    """`masked_vocab`: bias -inf on the first `masked_vocab` entries and the last (a masked-out
    vocabulary, more than one kernel block); targets are drawn from the rest."""
    def build(device, dtype, generator):
        hidden = torch.randn(rows, hidden_size, generator=generator, dtype=torch.float64)
        weight = torch.randn(vocab, hidden_size, generator=generator, dtype=torch.float64) * (scale / max(hidden_size, 1)**0.5)
        b = torch.randn(vocab, generator=generator, dtype=torch.float64) if bias else None
        targets = torch.randint(0, vocab, (rows,), generator=generator)
        if masked_vocab:
            b[:masked_vocab] = b[-1] = float("-inf")
            targets = torch.randint(masked_vocab, vocab - 1, (rows,), generator=generator)
        targets = torch.where(torch.rand(rows, generator=generator) < ignored, -100, targets)
        inputs = {"hidden": hidden.to(dtype), "weight": weight.to(dtype), "bias": None if b is None else b.to(dtype),
                  "targets": targets}
        inputs = {k: None if t is None else t.to(device) for k, t in inputs.items()}
        if strided:  # views into larger or transposed storage, made after the cast
            inputs = {k: None if t is None else strided_view(t) for k, t in inputs.items()}
        return inputs

    def call(hidden, weight, bias, targets):
        return mlm_cross_entropy(hidden, weight, targets, bias, reduction=reduction, label_smoothing=label_smoothing,
                                 z_loss=z_loss, return_lse=True)

    return OpCase("mlm_cross_entropy", name, build, call, grads=("hidden", "weight", "bias"))


CASES = [
    ce_case("one-row", 1, 16, 37, ignored=0.0),
    ce_case("odd-vocab", 9, 24, 101),
    ce_case("no-bias-sum", 6, 16, 70, bias=False, reduction="sum"),
    ce_case("none-reduction", 7, 16, 50, reduction="none"),
    ce_case("all-ignored", 5, 16, 40, ignored=1.0),
    ce_case("empty", 0, 16, 40),
    ce_case("zero-hidden-size", 5, 0, 40),  # logits are the bias alone
    ce_case("label-smoothing", 8, 32, 90, label_smoothing=0.1),
    ce_case("z-loss", 8, 32, 90, z_loss=1e-3),
    ce_case("large-logits", 6, 16, 64, scale=300.0),
    ce_case("strided-inputs", 10, 16, 45, strided=True),
    ce_case("strided-inputs-sum", 10, 16, 45, strided=True, reduction="sum", label_smoothing=0.1),
    ce_case("wide-vocab", 17, 32, 700, label_smoothing=0.05, z_loss=1e-4),
    ce_case("masked-vocabulary", 9, 16, 301, masked_vocab=160, z_loss=1e-3),
]
