"""fastmlm: custom kernels for fast BERT-style masked-language-model pre-training.

    from fastmlm import Encoder, MaskedLM

Public names are imported on first use, so `import fastmlm` (and `fastmlm
info`) stay fast and work even when an optional part cannot load.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "EncoderConfig": "fastmlm.config",
    "Encoder": "fastmlm.model",
    "MaskedLM": "fastmlm.model",
    "SequenceClassifier": "fastmlm.model",
    "TokenClassifier": "fastmlm.model",
    "patch_hf": "fastmlm.hf",
}

__all__ = ["__version__", "ops", *_PUBLIC]


def __getattr__(name: str):
    if name == "ops":
        return importlib.import_module("fastmlm.ops")
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'fastmlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
