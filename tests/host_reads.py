"""Counting host reads of tensor values: on a GPU each one is a synchronisation."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values on the host (each one a GPU synchronisation there):
    scalars (int(), item()) through the dispatcher, tolist() through a patched method."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        tolist = torch.Tensor.tolist

        def counted_tolist(t):
            self.count += 1
            return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))

