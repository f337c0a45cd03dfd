"""Plain PyTorch specifications of every op: the `torch` backend and the tests' ground truth."""
