"""The Exceiver network: a Perceiver IO over a cell's expressed genes.

encoder:   a learned latent array cross-attends to the gene tokens (gene embedding x value);
processor: self-attention blocks over the latents;
decoder:   query embeddings (genes, or a class token) cross-attend to the latents, and a head maps
           each query to a predicted value (or class logits).
Attention runs through `scaled_dot_product_attention` with a boolean padding mask: a cell's cost
is linear in its number of expressed genes, and its outputs do not depend on how it was padded.

`ExceiverConfig.paper_compatible` switches the same modules to the original release's computation
(see docs/original.md): every measured gene is a token, zero-count genes get a +1 attention logit
(the original's float padding mask), LayerNorm on the encoder's tokens, a LayerNorm inside the
cross-attention feed-forwards, and post-norm processor blocks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from exceiver.errors import ModelFileError

POOLINGS = ("mean", "flatten", "cell")
VALUE_ENCODINGS = ("zscore", "rank")


@dataclass
class ExceiverConfig:
    """Architecture and pretraining task of an Exceiver model."""

    n_genes: int = 0  # vocabulary size, set from the data
    gene_dim: int = 32  # gene embedding width (also the decoder's width)
    n_latents: int = 32
    latent_dim: int = 64
    n_layers: int = 2  # processor self-attention blocks
    n_heads: int = 4  # processor heads
    cross_heads: int = 4  # encoder and decoder cross-attention heads
    ff_dim: int = 256  # processor feed-forward width
    cross_ff_mult: int = 4  # cross-attention feed-forward width, as a multiple of its input width
    head_hidden: int = 0  # hidden width of the value and class heads (0: gene_dim)
    gene_bias: bool = False  # a learned per-gene offset on predicted values (starts at gene means)
    dropout: float = 0.0
    n_classes: int = 0  # > 0 adds the class-token head
    mask_fraction: float = 0.15  # fraction of a cell's expressed genes masked in pretraining
    zero_query_ratio: float = 0.0  # zero-count genes queried per masked gene (0: off)
    max_tokens: int = 4096  # expressed genes per cell beyond this are subsampled
    class_hidden: int = 0  # hidden width of the class head (0: n_classes, as the original)
    paper_compatible: bool = False  # compute exactly as the original release (imported checkpoints)
    # Invariance objective: two random subsets of a cell's tokens must give embeddings that pick
    # each other out of the batch (InfoNCE on projected mean latents); 0 turns it off.
    contrastive_weight: float = 0.0
    contrastive_keep: float = 0.5  # fraction of a cell's tokens in each view
    contrastive_temperature: float = 0.1
    # Detection objective: a second head says whether each queried gene is expressed (masked
    # expressed genes vs sampled zero-count genes; needs zero_query_ratio > 0). Which genes are on
    # is identity, whatever the depth; the value head is then trained on expressed genes only.
    detection_weight: float = 0.0
    # Cell readout: a learned query attends to the latents (attention pooling) and gives the cell
    # embedding used by the contrastive term and by `embed` (pooling "cell"); needs the contrastive
    # term, the only objective that trains it.
    cell_query: bool = False
    # Depth made explicit: two extra tokens per cell carry its log total counts and log number of
    # expressed genes (gene ids n_genes + 2 and + 3), so that the latents need not encode depth.
    depth_tokens: bool = False
    # Token values and targets: "zscore" (the paper's transform) or "rank": each gene's rank
    # among the cell's expressed genes, which does not depend on the cell's depth.
    value_encoding: str = "zscore"

    def __post_init__(self) -> None:
        sizes = dict(gene_dim=self.gene_dim, n_latents=self.n_latents, latent_dim=self.latent_dim,
                     n_heads=self.n_heads, cross_heads=self.cross_heads, ff_dim=self.ff_dim,
                     cross_ff_mult=self.cross_ff_mult)
        small = [name for name, value in sizes.items() if value < 1]
        if small or min(self.n_genes, self.n_layers, self.head_hidden, self.n_classes, self.class_hidden) < 0:
            raise ValueError(f"model sizes must be positive (got {small or 'a negative size'})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for dim, heads, what in [
            (self.latent_dim, self.n_heads, "latent_dim / n_heads"),
            (self.latent_dim, self.cross_heads, "latent_dim / cross_heads"),
            (self.gene_dim, self.cross_heads, "gene_dim / cross_heads"),
        ]:
            if dim % heads:
                raise ValueError(f"{what} must divide evenly, got {dim} / {heads}")
        if not 0.0 <= self.mask_fraction < 1.0:
            raise ValueError(f"mask_fraction must be in [0, 1), got {self.mask_fraction}")
        if self.zero_query_ratio < 0:
            raise ValueError(f"zero_query_ratio must be >= 0, got {self.zero_query_ratio}")
        if self.paper_compatible and self.zero_query_ratio > 0:  # zero genes are tokens there: no leak allowed
            raise ValueError("zero-gene queries are not available in paper-compatible mode (zero genes are tokens)")
        if self.contrastive_weight < 0 or not 0 < self.contrastive_keep <= 1 or self.contrastive_temperature <= 0:
            raise ValueError("contrastive_weight must be >= 0, contrastive_keep in (0, 1], contrastive_temperature > 0")
        if self.detection_weight < 0 or (self.detection_weight > 0 and self.zero_query_ratio <= 0):
            raise ValueError("detection_weight must be >= 0 and needs zero_query_ratio > 0 (zero genes to detect)")
        if self.value_encoding not in VALUE_ENCODINGS:
            raise ValueError(f"value_encoding must be one of {VALUE_ENCODINGS}, got {self.value_encoding!r}")
        if self.paper_compatible and self.value_encoding != "zscore":
            raise ValueError("paper-compatible models use the original's z-scored values")
        if self.paper_compatible and self.depth_tokens:
            raise ValueError("depth tokens are not available in paper-compatible mode (the original has none)")
        if self.cell_query and not self.contrastive_weight:
            raise ValueError("cell_query needs contrastive_weight > 0 (the contrastive term trains it)")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @classmethod
    def preset(cls, name: str, **overrides) -> ExceiverConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ExceiverConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelFileError(f"model config has unknown fields {unknown}")
        return cls(**values)


PRESETS: dict[str, dict] = {
    # The released configuration of the original Exceiver (Connell et al. 2022).
    "paper": dict(
        gene_dim=4, n_latents=128, latent_dim=4, n_layers=8, n_heads=4, cross_heads=4,
        ff_dim=2048, cross_ff_mult=1, head_hidden=1,
    ),
    # Width chosen for quality per CPU-minute (docs/presets.md); objectives chosen by the embedding
    # study (docs/evaluation.md): masked values + detection of expressed vs zero genes + a light
    # contrastive term gave the best zero-shot cell identity with masked MSE still < 0.6x gene mean.
    "default": dict(
        gene_dim=32, n_latents=32, latent_dim=64, n_layers=2, n_heads=4, cross_heads=4,
        ff_dim=256, cross_ff_mult=4, gene_bias=True, class_hidden=64,
        zero_query_ratio=1.0, detection_weight=1.0, contrastive_weight=0.2,
    ),
}


# The attention logit that the original's float padding mask adds to zero-count gene tokens.
ZERO_TOKEN_LOGIT = 1.0


def _mlp(d_in: int, hidden: int, d_out: int, mid_norm: bool = False) -> nn.Sequential:
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

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = _split_heads(self.q(x), self.n_heads)
        if q.dim() == 3:  # queries shared by all cells (the latent array)
            q = q.expand(kv.shape[0], *q.shape)
        k, v = _split_heads(self.kv(kv), 2 * self.n_heads).chunk(2, dim=-3)
        mask = None if kv_mask is None else kv_mask[:, None, None, :].to(q.dtype if kv_mask.is_floating_point() else torch.bool)
        return self.out(_merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention + feed-forward, with residuals on the query stream."""

    def __init__(self, dim: int, kv_dim: int, n_heads: int, ff_mult: int, norm_kv: bool, mid_norm: bool = False):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        # Gene tokens are embedding x value: a LayerNorm would cancel each token's value scale.
        self.norm_kv = nn.LayerNorm(kv_dim) if norm_kv else nn.Identity()
        self.attn = CrossAttention(dim, kv_dim, n_heads)
        self.ff = _mlp(dim, ff_mult * dim, dim, mid_norm)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm_q(x), self.norm_kv(kv), kv_mask)
        return x + self.ff(x)


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


class ExceiverModule(nn.Module):
    """Pure network: tokens -> latents -> predictions. Gene id `n_genes` is padding (a fixed zero
    vector; the original's mask token) and `n_genes + 1` is the class-token query."""

    def __init__(self, config: ExceiverConfig):
        super().__init__()
        if config.n_genes < 1:
            raise ValueError("config.n_genes must be set to the vocabulary size")
        self.config = c = config
        self.pad_id, self.class_id = c.n_genes, c.n_genes + 1
        head_hidden = c.head_hidden or c.gene_dim
        self.gene_emb = nn.Embedding(c.n_genes + (4 if c.depth_tokens else 2), c.gene_dim, padding_idx=self.pad_id)
        self.latents = nn.Parameter(torch.randn(c.n_latents, c.latent_dim))
        original = c.paper_compatible
        self.encoder = CrossAttentionBlock(c.latent_dim, c.gene_dim, c.cross_heads, c.cross_ff_mult,
                                           norm_kv=original, mid_norm=original)
        self.processor = nn.ModuleList(
            SelfAttentionBlock(c.latent_dim, c.n_heads, c.ff_dim, c.dropout, post_norm=original)
            for _ in range(c.n_layers)
        )
        self.decoder = CrossAttentionBlock(c.gene_dim, c.latent_dim, c.cross_heads, c.cross_ff_mult,
                                           norm_kv=True, mid_norm=original)
        self.value_head = _mlp(c.gene_dim, head_hidden, 1)
        self.gene_bias = nn.Parameter(torch.zeros(c.n_genes + 2)) if c.gene_bias else None
        self.class_head = _mlp(c.gene_dim, c.class_hidden or c.n_classes, c.n_classes) if c.n_classes else None
        self.projection = _mlp(c.latent_dim, c.latent_dim, c.latent_dim) if c.contrastive_weight else None
        self.detection_head = _mlp(c.gene_dim, head_hidden, 1) if c.detection_weight else None
        if c.cell_query:
            self.cell_token = nn.Parameter(torch.randn(1, c.latent_dim))
            self.cell_pool = CrossAttentionBlock(c.latent_dim, c.latent_dim, c.cross_heads, c.cross_ff_mult,
                                                 norm_kv=True)

    @torch.no_grad()
    def init_value_offsets(self, gene_means: torch.Tensor, mean_value: float) -> None:
        """Start predictions at the training data's gene means (per gene with `gene_bias`, else
        the mean expressed value in the head's output bias), so that training spends its steps
        on context rather than on learning average levels."""
        if self.gene_bias is not None:
            self.gene_bias[: len(gene_means)] = gene_means
        else:
            self.value_head[-1].bias.fill_(mean_value)

    def encode(self, gene_ids: torch.Tensor, values: torch.Tensor, token_mask: torch.Tensor,
               token_zero: torch.Tensor | None = None) -> torch.Tensor:
        """Gene tokens [B, L] -> processed latents [B, n_latents, latent_dim]."""
        return self.process(self.encode_tokens(gene_ids, values, token_mask, token_zero))

    def encode_tokens(self, gene_ids: torch.Tensor, values: torch.Tensor, token_mask: torch.Tensor,
                      token_zero: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's cross-attention alone. `token_zero` marks zero-count gene tokens (paper-
        compatible batches only): they get the original's +1 attention logit."""
        tokens = self.gene_emb(gene_ids) * values.unsqueeze(-1).to(self.latents.dtype)
        mask = token_mask
        if self.config.paper_compatible and token_zero is not None:
            bias = token_zero.to(tokens.dtype) * ZERO_TOKEN_LOGIT
            mask = bias.masked_fill(~token_mask, float("-inf"))
        return self.encoder(self.latents, tokens, mask)

    def process(self, latents: torch.Tensor) -> torch.Tensor:
        for block in self.processor:
            latents = block(latents)
        return latents

    def decode(self, latents: torch.Tensor, query_ids: torch.Tensor) -> torch.Tensor:
        """Query genes [B, Q] attend to the latents -> decoder outputs [B, Q, gene_dim]."""
        return self.decoder(self.gene_emb(query_ids), latents)

    def predict_values(self, latents: torch.Tensor, query_ids: torch.Tensor) -> torch.Tensor:
        return self.values_from_decoded(self.decode(latents, query_ids), query_ids)

    def values_from_decoded(self, decoded: torch.Tensor, query_ids: torch.Tensor) -> torch.Tensor:
        values = self.value_head(decoded).squeeze(-1)
        return values if self.gene_bias is None else values + self.gene_bias[query_ids]

    def class_logits(self, latents: torch.Tensor) -> torch.Tensor:
        if self.class_head is None:
            raise ValueError("this model has no class head (config.n_classes == 0)")
        query = torch.full((latents.shape[0], 1), self.class_id, device=latents.device)
        return self.class_head(self.decode(latents, query)[:, 0])

    def forward(self, gene_ids, values, token_mask, query_ids, token_zero=None) -> torch.Tensor:
        """The pretraining computation: predicted values of the query genes [B, Q]."""
        return self.predict_values(self.encode(gene_ids, values, token_mask, token_zero), query_ids)

    @property
    def default_pooling(self) -> str:
        return "cell" if self.config.cell_query else "mean"

    def pool(self, latents: torch.Tensor, pooling: str | None = None) -> torch.Tensor:
        """Cell embedding from latents: their mean, all of them flattened (the original's), or the
        learned cell query's view of them; None: the model's default ("cell" if it has one)."""
        pooling = pooling or self.default_pooling
        if pooling == "mean":
            return latents.mean(dim=1)
        if pooling == "flatten":
            return latents.flatten(1)
        if pooling == "cell":
            if not self.config.cell_query:
                raise ValueError("pooling 'cell' needs a model trained with a cell query (config.cell_query)")
            return self.cell_pool(self.cell_token, latents)[:, 0]
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")

    def embedding_width(self, pooling: str | None = None) -> int:
        c = self.config
        return c.latent_dim * (c.n_latents if (pooling or self.default_pooling) == "flatten" else 1)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
