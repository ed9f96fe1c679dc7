"""A BERT classifier whose last layer computes the [CLS] row only: same logits, less work.

`BertForSequenceClassification` reads one token of the last hidden state (the pooler takes
position 0), yet the last layer computes every position. Keys and values of the last layer
still need every token, but its query, attention output, feed-forward and LayerNorms need
only row 0: at 128 tokens that skips about 1/7 of the model's matrix work (10 of the last
layer's 12 d x d-sized products). The wrapper is exported instead of the full model; the
export's parity check compares it with the unmodified model, so a mismatch cannot ship.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


def supports_cls_only(model: Any) -> bool:
    """The exact class whose head reads position 0 through the pooler, eager attention."""
    return type(model).__name__ == "BertForSequenceClassification" and getattr(model.bert, "pooler", None) is not None


class ClsOnlyLastLayer(torch.nn.Module):
    """(input_ids, attention_mask) -> logits of ``model`` (a BertForSequenceClassification)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        bert = model.bert
        # The same modules minus the last layer and the pooler: shallow copies with their own
        # module tables, so the weights are shared and ``model`` itself is left whole.
        encoder = copy.copy(bert.encoder)
        encoder._modules = dict(bert.encoder._modules)
        encoder.layer = torch.nn.ModuleList(list(bert.encoder.layer)[:-1])
        trunk = copy.copy(bert)
        trunk._modules = dict(bert._modules)
        trunk.encoder = encoder
        trunk.pooler = None
        self.trunk = trunk
        self.last = bert.encoder.layer[-1]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (b, s, d)
        b, s, d = h.shape
        attn = self.last.attention.self
        heads, dh = attn.num_attention_heads, attn.attention_head_size
        cls = h[:, :1]  # (b, 1, d)
        q = attn.query(cls).view(b, 1, heads, dh).transpose(1, 2)  # (b, H, 1, dh)
        k = attn.key(h).view(b, s, heads, dh).transpose(1, 2)  # (b, H, s, dh)
        v = attn.value(h).view(b, s, heads, dh).transpose(1, 2)  # (b, H, s, dh)
        scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling  # (b, H, 1, s)
        masked = (attention_mask[:, None, None, :] == 0)  # (b, 1, 1, s)
        scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)  # (b, H, 1, dh)
        ctx = ctx.transpose(1, 2).reshape(b, 1, d)
        out = self.last.attention.output  # dense + dropout + LayerNorm(x + residual)
        a = out.LayerNorm(out.dense(ctx) + cls)
        ffn = self.last.output
        y = ffn.LayerNorm(ffn.dense(self.last.intermediate(a)) + a)  # (b, 1, d)
        pooled = self.model.bert.pooler(y)  # tanh(dense(y[:, 0]))
        logits: torch.Tensor = self.model.classifier(pooled)  # (b, num_labels)
        return logits
