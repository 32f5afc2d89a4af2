"""Attention blocks of the Perceiver IO, on `scaled_dot_product_attention`.

A cross-attention block can also return its attention weights, computed by the same projections
as its output (`need_weights=True`): gene-dependency maps read the model's own attention, not a
copy of it rebuilt outside the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def mlp(d_in: int, hidden: int, d_out: int, mid_norm: bool = False) -> nn.Sequential:
    """LayerNorm, Linear, GELU, [LayerNorm,] Linear: the original places a second LayerNorm
    before the last Linear of its cross-attention feed-forwards."""
    mid = [nn.LayerNorm(hidden)] if mid_norm else []
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, hidden), nn.GELU(), *mid, nn.Linear(hidden, d_out))


def _split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    return x.unflatten(-1, (n_heads, -1)).transpose(-3, -2)  # [..., L, D] -> [..., H, L, D/H]


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-3, -2).flatten(-2)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = _split_heads(self.qkv(x), 3 * self.n_heads).chunk(3, dim=-3)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(_merge_heads(o))


class CrossAttention(nn.Module):
    """Queries of width `dim` attend to keys/values of width `kv_dim`; `kv_mask` is True at real
    keys, or a float tensor added to the attention logits (-inf at padding)."""

    def __init__(self, dim: int, kv_dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None = None, *,
                need_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The attention output; with `need_weights`, also the weights [B, heads, queries, keys]
        (computed explicitly then, which SDPA's fused kernels do not expose)."""
        q = _split_heads(self.q(x), self.n_heads)
        if q.dim() == 3:  # queries shared by all cells (the latent array)
            q = q.expand(kv.shape[0], *q.shape)
        k, v = _split_heads(self.kv(kv), 2 * self.n_heads).chunk(2, dim=-3)
        mask = None
        if kv_mask is not None:
            mask = kv_mask[:, None, None, :].to(q.dtype if kv_mask.is_floating_point() else torch.bool)
        if not need_weights:
            return self.out(_merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if mask is not None:
            logits = logits + mask if mask.is_floating_point() else logits.masked_fill(~mask, float("-inf"))
        weights = logits.softmax(-1)
        return self.out(_merge_heads(weights @ v)), weights


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention + feed-forward, with residuals on the query stream."""

    def __init__(self, dim: int, kv_dim: int, n_heads: int, ff_mult: int, norm_kv: bool, mid_norm: bool = False):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        # Gene tokens are embedding x value: a LayerNorm would cancel each token's value scale.
        self.norm_kv = nn.LayerNorm(kv_dim) if norm_kv else nn.Identity()
        self.attn = CrossAttention(dim, kv_dim, n_heads)
        self.ff = mlp(dim, ff_mult * dim, dim, mid_norm)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None = None, *,
                need_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        attended = self.attn(self.norm_q(x), self.norm_kv(kv), kv_mask, need_weights=need_weights)
        attended, weights = attended if need_weights else (attended, None)
        x = x + attended
        x = x + self.ff(x)
        return (x, weights) if need_weights else x


class SelfAttentionBlock(nn.Module):
    """Self-attention + feed-forward; pre-norm (stable for deep stacks) or post-norm (the original's
    nn.TransformerEncoderLayer)."""

    def __init__(self, dim: int, n_heads: int, ff_dim: int, dropout: float, post_norm: bool = False):
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, n_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + self.drop(self.attn(x)))
            return self.norm2(x + self.drop(self.ff(x)))
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))
