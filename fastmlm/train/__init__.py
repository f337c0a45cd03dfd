"""Training loops: pre-training (`pretrain`), checkpoints and resume."""
from fastmlm.train.pretrain import PretrainResult, linear_warmup_decay, pretrain
from fastmlm.train.pretrain_config import PretrainConfig

__all__ = ["PretrainConfig", "PretrainResult", "linear_warmup_decay", "pretrain"]
