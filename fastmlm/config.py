"""EncoderConfig: the shape of a BERT-style encoder, and HuggingFace `config.json` in and out.

Field names are fastmlm's own (`num_layers`, `hidden_dropout`); `from_hf` and `to_hf`
translate to and from `transformers.BertConfig`'s names (`num_hidden_layers`,
`hidden_dropout_prob`). Anything HuggingFace stores that changes the computation and that
fastmlm does not implement (relative position embeddings, decoder mode) is an error,
not silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

# hidden_act values fastmlm computes exactly as HuggingFace's ACT2FN does.
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")

# fastmlm field -> BertConfig key, where they differ.
_HF_NAMES = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "hidden_dropout": "hidden_dropout_prob",
    "attention_dropout": "attention_probs_dropout_prob",
}


@dataclasses.dataclass
class EncoderConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: Optional[int] = 0  # None: no padding row in the word embeddings (HF's null)
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    # Dropout before the classifiers' output layer; None: hidden_dropout (as HF's BertFor*Classification).
    classifier_dropout: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EncoderConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        for name in ("hidden_dropout", "attention_dropout", "classifier_dropout"):
            if name == "classifier_dropout" and self.classifier_dropout is None:
                continue
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"EncoderConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of {ACTIVATIONS}")
        pad = self.pad_token_id
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < self.vocab_size):
            raise ValueError(f"pad_token_id {pad!r} is neither None nor in the vocabulary [0, {self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    # ---- HuggingFace config.json ----
    @classmethod
    def from_hf(cls, config: Any) -> "EncoderConfig":
        """From a `transformers.BertConfig`, its dict, a `config.json` path, or a directory holding one."""
        if hasattr(config, "to_dict") and not isinstance(config, dict):
            config = config.to_dict()
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no config.json at {path}")
            try:
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
            if not isinstance(config, dict):
                raise ValueError(f"{path} does not hold a JSON object")
        model_type = config.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"model_type {model_type!r} is not supported (fastmlm implements BERT)")
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"position_embedding_type {position_type!r} is not supported, only 'absolute'")
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise ValueError("decoder BERT configs (is_decoder / add_cross_attention) are not supported")
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            key = _HF_NAMES.get(field.name, field.name)
            # null means "unset" (the default) except for pad_token_id, where HF reads it as
            # "no padding row": token 0 then trains like any other.
            if key in config and (config[key] is not None or field.name == "pad_token_id"):
                kwargs[field.name] = config[key]
        return cls(**kwargs)

    def to_hf(self) -> dict:
        """A dict `transformers.BertConfig(**d)` accepts (and `config.json` content)."""
        out = {"model_type": "bert", "architectures": ["BertModel"], "position_embedding_type": "absolute",
               "tie_word_embeddings": True}
        for field in dataclasses.fields(self):
            out[_HF_NAMES.get(field.name, field.name)] = getattr(self, field.name)
        return out

    def write_json(self, path: str | os.PathLike, architecture: str = "BertModel") -> None:
        """Write `config.json` content to `path` as it is (flushed to disk); `save` renames it into place."""
        data = self.to_hf()
        data["architectures"] = [architecture]
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    def save(self, path: str | os.PathLike, architecture: str = "BertModel") -> None:
        """Write `config.json` content to `path` via a temporary file and a rename."""
        from fastmlm.checkpoint import replace_atomically

        replace_atomically({os.fspath(path): lambda tmp: self.write_json(tmp, architecture)})
