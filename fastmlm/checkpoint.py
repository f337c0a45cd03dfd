"""Checkpoints: safetensors files in HuggingFace's BERT layout, strict loading.

A directory holds `config.json` (what `transformers.BertConfig` reads) and
`model.safetensors` with BertModel keys (an Encoder) or BertForMaskedLM keys
(a MaskedLM: `bert.` prefix and `cls.predictions.*`, the tied decoder weight
left out as HuggingFace does). So fastmlm output loads in transformers and the
other way round. No pickle is read or written. Saving writes both files in
full under temporary names (flushed to disk) before renaming either into place,
so a crash leaves every file whole, old or new; only a crash between the two
back-to-back renames can pair new weights with the old config.

Loading is strict: every expected key must be present with the expected shape,
and every key must be understood. All problems are collected and reported in
one error before any parameter is touched.

Accepted variations of HuggingFace checkpoints: with or without the `bert.`
prefix, legacy LayerNorm `gamma`/`beta`, stray `position_ids`/`token_type_ids`
buffers, BertForPreTraining's NSP head (ignored), the tied decoder weight
present or absent (when present it must equal the word embeddings), and no
MLM head at all (a MaskedLM then keeps its freshly initialised head).
"""
from __future__ import annotations

import json
import os
import uuid
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from fastmlm.config import EncoderConfig

if TYPE_CHECKING:
    from torch import nn

WEIGHTS_NAME = "model.safetensors"
SHARDED_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

# Our module names -> HuggingFace's, per layer (ours on the left).
_LAYER_NAMES = [
    ("attn_out", "attention.output.dense"),
    ("attn_norm", "attention.output.LayerNorm"),
    ("ffn_in", "intermediate.dense"),
    ("ffn_out", "output.dense"),
    ("ffn_norm", "output.LayerNorm"),
]
_HEAD_PREFIX = "cls.predictions."
_DECODER_WEIGHT = "cls.predictions.decoder.weight"
_DECODER_BIAS = "cls.predictions.decoder.bias"


def _is_masked_lm(model) -> bool:
    return hasattr(model, "encoder") and hasattr(model, "head")


def key_table(model) -> list[tuple[str, list[str]]]:
    """(our state_dict key, the HuggingFace keys it is split into along dim 0)."""
    masked_lm = _is_masked_lm(model)
    encoder = model.encoder if masked_lm else model
    ours, theirs = ("encoder.", "bert.") if masked_lm else ("", "")
    table = [
        ("embeddings.word.weight", "embeddings.word_embeddings.weight"),
        ("embeddings.position.weight", "embeddings.position_embeddings.weight"),
        ("embeddings.token_type.weight", "embeddings.token_type_embeddings.weight"),
        ("embeddings.norm.weight", "embeddings.LayerNorm.weight"),
        ("embeddings.norm.bias", "embeddings.LayerNorm.bias"),
    ]
    rows = [(ours + a, [theirs + b]) for a, b in table]
    for i in range(len(encoder.layers)):
        a, b = f"layers.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            # The fused projection is BERT's query, key and value stacked in that order.
            rows.append((f"{ours}{a}qkv.{p}", [f"{theirs}{b}attention.self.{n}.{p}" for n in ("query", "key", "value")]))
            rows += [(f"{ours}{a}{x}.{p}", [f"{theirs}{b}{y}.{p}"]) for x, y in _LAYER_NAMES]
    if encoder.pooler is not None:
        rows += [(f"{ours}pooler.dense.{p}", [f"{theirs}pooler.dense.{p}"]) for p in ("weight", "bias")]
    if masked_lm and model.head is not None:
        rows += [(f"head.dense.{p}", [f"{_HEAD_PREFIX}transform.dense.{p}"]) for p in ("weight", "bias")]
        rows += [(f"head.norm.{p}", [f"{_HEAD_PREFIX}transform.LayerNorm.{p}"]) for p in ("weight", "bias")]
        rows.append(("head.bias", [f"{_HEAD_PREFIX}bias"]))
    return rows


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under HuggingFace names (fresh contiguous CPU tensors)."""
    state = model.state_dict()
    out = {}
    for ours, theirs in key_table(model):
        for name, part in zip(theirs, state[ours].chunk(len(theirs), dim=0)):
            out[name] = part.detach().to("cpu", copy=True).contiguous()
    return out


def normalize_hf_keys(state: dict[str, torch.Tensor], masked_lm: bool) -> dict[str, torch.Tensor]:
    """HuggingFace keys in the layout `key_table` names: prefix, legacy names, buffers."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key[len("bert."):] if key.startswith("bert.") else key
        if name.endswith(("embeddings.position_ids", "embeddings.token_type_ids")):
            continue  # buffers some versions of transformers saved; not weights
        if name.endswith("LayerNorm.gamma"):
            name = name[: -len("gamma")] + "weight"
        elif name.endswith("LayerNorm.beta"):
            name = name[: -len("beta")] + "bias"
        if not name.startswith("cls.") and masked_lm:
            name = "bert." + name
        if name in out:
            raise ValueError(f"checkpoint holds {key!r} twice (with and without the 'bert.' prefix or "
                             "as gamma/beta and weight/bias)")
        out[name] = value
    return out


def load_hf_state_dict(model, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy HuggingFace-named weights into `model`, after checking every key and shape."""
    masked_lm = _is_masked_lm(model)
    state = normalize_hf_keys(state, masked_lm)
    state = {k: v for k, v in state.items() if not k.startswith("cls.seq_relationship.")}  # NSP head
    params = model.state_dict()
    word_key = "bert.embeddings.word_embeddings.weight" if masked_lm else "embeddings.word_embeddings.weight"
    has_head = any(k.startswith(_HEAD_PREFIX) for k in state)
    problems: list[str] = []

    if not masked_lm:
        state = {k: v for k, v in state.items() if not k.startswith("cls.")}
    else:
        if _DECODER_BIAS in state:  # HuggingFace ties it to cls.predictions.bias
            decoder_bias = state.pop(_DECODER_BIAS)
            head_bias = state.setdefault(_HEAD_PREFIX + "bias", decoder_bias)
            if head_bias.shape != decoder_bias.shape or not torch.equal(head_bias, decoder_bias):
                problems.append(f"{_DECODER_BIAS} differs from {_HEAD_PREFIX}bias (fastmlm ties them)")
        if _DECODER_WEIGHT in state:
            decoder = state.pop(_DECODER_WEIGHT)
            word = state.get(word_key)
            if word is not None and (word.shape != decoder.shape or not torch.equal(word, decoder)):
                problems.append(f"{_DECODER_WEIGHT} differs from the word embeddings (fastmlm ties them)")

    expected: dict[str, tuple[int, ...]] = {}
    table = key_table(model)
    for ours, theirs in table:
        if masked_lm and ours.startswith("head.") and not has_head:
            continue  # no MLM head in the checkpoint: keep the fresh one
        shape = list(params[ours].shape)
        shape[0] //= len(theirs)
        expected.update({name: tuple(shape) for name in theirs})

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    for name, shape in expected.items():
        if name in state:
            t = state[name]
            if tuple(t.shape) != shape:
                problems.append(f"{name} has shape {tuple(t.shape)}, the config needs {shape}")
            elif not t.is_floating_point():
                problems.append(f"{name} has dtype {t.dtype}, expected a floating-point tensor")
    if problems:
        raise ValueError(f"{source} does not fit the model ({model.__class__.__name__}, {len(expected)} tensors):\n  "
                         + "\n  ".join(problems))

    with torch.no_grad():
        for ours, theirs in table:
            if theirs[0] in expected:
                params[ours].copy_(torch.cat([state[name] for name in theirs], dim=0))


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None


def read_weights(directory: str) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards a model.safetensors.index.json lists."""
    single = os.path.join(directory, WEIGHTS_NAME)
    index = os.path.join(directory, SHARDED_INDEX_NAME)
    if os.path.isfile(single):
        return read_safetensors(single)
    if os.path.isfile(index):
        return _read_shards(directory, index)
    if any(os.path.isfile(os.path.join(directory, n)) for n in ("pytorch_model.bin", "tf_model.h5")):
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}; fastmlm reads safetensors only, never pickle "
                                "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")


def _read_shards(directory: str, index: str) -> dict[str, torch.Tensor]:
    """The shards of a sharded checkpoint, held to their index: every key in the shard the
    index names for it, none twice, none unlisted; shards are files of `directory` itself."""
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError("weight_map must map names to file names")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index} is not a valid safetensors index: {e}") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise ValueError(f"{index} names shard {shard!r}: shards must be files beside the index")
        path = os.path.join(directory, shard)
        for key, tensor in read_safetensors(path).items():
            if weight_map.get(key) != shard:
                where = f"listed under {weight_map[key]}" if key in weight_map else "not in the index"
                raise ValueError(f"{path} holds {key}, which is {where}")
            state[key] = tensor
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise ValueError(f"{index} lists {len(missing)} tensors that no shard holds, e.g. {missing[:3]}")
    return state


def replace_atomically(writers: dict) -> None:
    """For each final path, `writer(temporary_path)` writes the whole file; then all are renamed into place.

    Temporary names are unique siblings (two writers never share one) and are removed
    if anything fails, leaving the final paths untouched.
    """
    temporaries = {}
    try:
        for final, write in writers.items():
            folder, name = os.path.split(os.fspath(final))
            # A random name rather than mkstemp: the writer creates the file, so it gets the
            # usual permissions (mkstemp's are 0600) and the checkpoint stays readable.
            temporaries[final] = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
            write(temporaries[final])
        for final, temporary in temporaries.items():
            os.replace(temporary, final)
    finally:
        for temporary in temporaries.values():
            if os.path.exists(temporary):
                os.unlink(temporary)


def write_safetensors(state: dict, path: str | os.PathLike, metadata: dict) -> None:
    """save_file, then fsync, with the permissions any new file gets (umask applied).

    safetensors creates its file 0600, which would make checkpoints unreadable to the
    group that can read the directory and config.json. The mode a plain create gets is
    read from a fresh probe file beside `path` (thread-safe, unlike reading the umask;
    and `path` itself is never opened, whatever is there already).
    """
    path = os.fspath(path)
    probe = f"{path}.{uuid.uuid4().hex}.mode"
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        mode = os.stat(probe).st_mode & 0o777
    finally:
        os.unlink(probe)
    save_file(state, path, metadata=metadata)
    os.chmod(path, mode)
    with open(path, "rb") as f:  # on disk before the rename makes it the checkpoint
        os.fsync(f.fileno())


def save_pretrained(model, directory: str | os.PathLike) -> None:
    """Write config.json and model.safetensors (HuggingFace layout) into `directory`."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    state = to_hf_state_dict(model)
    config: EncoderConfig = model.config
    architecture = "BertForMaskedLM" if _is_masked_lm(model) else "BertModel"
    replace_atomically({os.path.join(directory, WEIGHTS_NAME): lambda tmp: write_safetensors(state, tmp, {"format": "pt"}),
                        os.path.join(directory, CONFIG_NAME): lambda tmp: config.write_json(tmp, architecture)})


def load_pretrained(cls, directory: str | os.PathLike, *, dtype: torch.dtype = torch.float32, **kwargs) -> "nn.Module":
    """Build `cls` (Encoder or MaskedLM) from a checkpoint directory; kwargs go to its constructor."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    config = EncoderConfig.from_hf(os.path.join(directory, CONFIG_NAME))
    state = read_weights(directory)
    model = cls(config, **kwargs)
    encoder = model.encoder if _is_masked_lm(model) else model
    if kwargs.get("pooler") is False:  # asked for no pooler: the checkpoint's is left out
        state = {k: v for k, v in state.items() if ".pooler." not in f".{k}"}
    elif encoder.pooler is None and any(k.endswith("pooler.dense.weight") for k in state):
        from fastmlm.model.encoder import Pooler  # the model package imports this module
        encoder.pooler = Pooler(config)
        if _is_masked_lm(model):
            # Kept for drop_head()'s encoder (classifiers use it), but the MLM loss never reads it.
            encoder.pooler.freeze_while_unused()
    model.to(dtype)
    load_hf_state_dict(model, state, source=os.path.join(directory, WEIGHTS_NAME))
    return model
