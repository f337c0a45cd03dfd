"""BERT's input embeddings on packed tokens: word + token type + position, LayerNorm, dropout."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastmlm.config import EncoderConfig


class Embeddings(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        # padding_idx as in BERT: the pad row gets no gradient from the lookup
        # (it still gets one through the tied decoder).
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = config.hidden_dropout

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        # Summed in BERT's order so fp32 results match HuggingFace to the last bits.
        x = self.word(input_ids) + self.token_type(token_type_ids)
        x = x + self.position(position_ids)
        x = self.norm(x)
        return F.dropout(x, self.dropout, self.training)
