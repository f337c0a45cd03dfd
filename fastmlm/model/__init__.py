"""The model: Encoder (BERT embeddings + post-LayerNorm layers on packed tokens) and MaskedLM."""
from fastmlm.model.encoder import Encoder, Pooler
from fastmlm.model.heads import ClassifierOutput, SequenceClassifier, TokenClassifier
from fastmlm.model.masked_lm import MaskedLM, MaskedLMOutput

__all__ = ["ClassifierOutput", "Encoder", "MaskedLM", "MaskedLMOutput", "Pooler", "SequenceClassifier",
           "TokenClassifier"]
