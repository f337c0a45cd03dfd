"""Cases for mlm_head: the loss and the gradients of every input of BERT's MLM head."""
import torch

from fastmlm.ops import mlm_head
from tests.ops.harness import OpCase, strided_view

PARAMETERS = ("hidden_all", "dense_weight", "dense_bias", "norm_weight", "norm_bias", "decoder_weight", "decoder_bias")


def head_case(name, rows, picks, hidden, vocab, *, ignored=0.2, reduction="mean", label_smoothing=0.0, z_loss=0.0,
              decoder_bias=True, index_dtype=torch.int64, strided=False):
    def build(device, dtype, generator):
        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype).to(device)

        targets = torch.randint(0, vocab, (picks,), generator=generator)
        targets = torch.where(torch.rand(picks, generator=generator) < ignored, -100, targets)
        inputs = {
            "hidden_all": randn(rows, hidden),
            "index": torch.randint(0, max(rows, 1), (picks,), generator=generator).to(index_dtype).to(device),
            "dense_weight": randn(hidden, hidden, scale=hidden**-0.5),
            "dense_bias": randn(hidden, scale=0.1),
            "norm_weight": 1.0 + randn(hidden, scale=0.1),
            "norm_bias": randn(hidden, scale=0.1),
            "decoder_weight": randn(vocab, hidden, scale=hidden**-0.5),
            "decoder_bias": randn(vocab, scale=0.1) if decoder_bias else None,
            "targets": targets.to(device),
        }
        if strided:  # every input a view into larger or transposed storage
            inputs = {k: None if t is None else strided_view(t) for k, t in inputs.items()}
        return inputs

    def call(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight, decoder_bias,
             targets):
        return mlm_head(hidden_all, index, dense_weight, dense_bias, norm_weight, norm_bias, decoder_weight,
                        decoder_bias, targets, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)

    return OpCase("mlm_head", name, build, call, grads=PARAMETERS)


CASES = [
    head_case("one-row", 3, 1, 16, 37, ignored=0.0),
    head_case("empty-selection", 5, 0, 16, 37),
    head_case("duplicates-int32", 6, 9, 16, 50, index_dtype=torch.int32),
    head_case("all-ignored", 8, 4, 16, 40, ignored=1.0),
    head_case("sum-no-decoder-bias", 12, 7, 24, 61, reduction="sum", decoder_bias=False),
    head_case("smoothing-z-loss", 20, 11, 32, 97, label_smoothing=0.1, z_loss=1e-3),
    head_case("strided-inputs", 10, 6, 16, 45, strided=True),
    head_case("strided-inputs-none", 10, 6, 16, 45, strided=True, reduction="none"),
]
