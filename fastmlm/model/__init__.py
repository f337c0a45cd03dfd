"""The model: Encoder (BERT embeddings + post-LayerNorm layers on packed tokens) and MaskedLM."""
from fastmlm.model.encoder import Encoder, Pooler
from fastmlm.model.masked_lm import MaskedLM, MaskedLMOutput

__all__ = ["Encoder", "MaskedLM", "MaskedLMOutput", "Pooler"]
