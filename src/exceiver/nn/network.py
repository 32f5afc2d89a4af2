"""The Exceiver network: a Perceiver IO over a cell's expressed genes.

encoder:   a learned latent array cross-attends to the gene tokens (gene embedding x value);
processor: self-attention blocks over the latents;
decoder:   query embeddings (genes, or a class token) cross-attend to the latents, and heads map
           each query to a predicted value, whether it is expressed, or class logits.
Attention runs through `scaled_dot_product_attention` with a boolean padding mask: a cell's cost
is linear in its number of expressed genes, and its outputs do not depend on how it was padded.

`ExceiverConfig.paper_compatible` switches the same modules to the original release's computation
(see docs/original.md): every measured gene is a token, zero-count genes get a +1 attention logit
(the original's float padding mask), LayerNorm on the encoder's tokens, a LayerNorm inside the
cross-attention feed-forwards, and post-norm processor blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from exceiver.data.tokenizer import CellBatch
from exceiver.nn.attention import CrossAttentionBlock, SelfAttentionBlock, mlp
from exceiver.nn.config import ExceiverConfig

POOLINGS = ("bottleneck", "mean", "flatten")

# The attention logit that the original's float padding mask adds to zero-count gene tokens.
ZERO_TOKEN_LOGIT = 1.0
# Tables with one row per batch: the count decoder's input, and with batch_injection
# "every_layer" its hidden layer and rank code (continued runs extend them; query mapping trains them).
BATCH_TABLES = ("batch_embedding", "batch_hidden_embedding", "batch_rank_embedding")
# A learned posterior's log-variance head starts with this bias (sigma about e^-1 = 0.37; 0.24-0.56
# over cells and dimensions of a fresh `default` network): under the spread of the initial
# bottleneck means (about 0.6), so the decoder reads cells from the first step, and close enough to
# the prior's 0 that dimensions the decoder does not use reach it within about 1,000 Adam steps at
# the `default` preset's learning rate (a bias moves about one learning rate per step).
INITIAL_LOG_VARIANCE = -2.0


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
        self.gene_emb = nn.Embedding(c.n_genes + 2, c.gene_dim, padding_idx=self.pad_id)
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
        self.value_head = mlp(c.gene_dim, head_hidden, 1)
        self.gene_bias = nn.Parameter(torch.zeros(c.n_genes + 2)) if c.gene_bias else None
        if not c.n_classes:
            self.class_head = None
        elif c.class_input == "token":
            self.class_head = mlp(c.gene_dim, c.class_hidden or c.n_classes, c.n_classes)
        else:  # a linear probe of the cell embedding
            self.class_head = nn.Linear(self.embedding_width(c.class_input), c.n_classes)
        self.projection = mlp(c.latent_dim, c.latent_dim, c.latent_dim) if c.projection_head else None
        self.detection_head = mlp(c.gene_dim, head_hidden, 1) if c.detection_head else None
        # Only the count objective trains the bottleneck: without it, none (an untrained projection
        # would be a misleading cell embedding).
        pooled = c.latent_dim * (c.n_latents if c.bottleneck_input == "flatten" else 1)
        self.bottleneck = (nn.Sequential(nn.LayerNorm(pooled), nn.Linear(pooled, c.bottleneck_dim))
                           if c.bottleneck_dim and c.count_head else None)
        # A learned posterior variance: log sigma^2 from the bottleneck's normalised input.
        self.bottleneck_log_variance = (nn.Linear(pooled, c.bottleneck_dim) if c.bottleneck_variance == "learned"
                                        else None)
        if self.bottleneck_log_variance is not None:
            nn.init.constant_(self.bottleneck_log_variance.bias, INITIAL_LOG_VARIANCE)
        if c.count_head:  # bottleneck -> a share of the library per gene, and a dispersion per gene
            layers = [nn.Linear(c.bottleneck_dim, c.count_hidden), nn.LayerNorm(c.count_hidden), nn.ReLU()]
            if c.count_rank:  # every gene's logit from a rank-r code: the per-gene product costs r, not count_hidden
                layers.append(nn.Linear(c.count_hidden, c.count_rank, bias=False))
            self.count_decoder = nn.Sequential(*layers, nn.Linear(c.count_rank or c.count_hidden, c.n_genes))
            self.gene_log_dispersion = nn.Parameter(torch.zeros(c.n_genes))
        else:
            self.count_decoder = self.gene_log_dispersion = None
        every_layer = bool(c.n_batches) and c.batch_injection == "every_layer"
        widths = (c.bottleneck_dim if c.n_batches else 0, c.count_hidden if every_layer else 0,
                  c.count_rank if every_layer else 0)
        for name, width in zip(BATCH_TABLES, widths):
            setattr(self, name, nn.Embedding(c.n_batches, width) if width else None)
            if width:
                nn.init.zeros_(getattr(self, name).weight)  # no batch effect until one is learned

    @torch.no_grad()
    def init_value_offsets(self, gene_means: torch.Tensor, mean_value: float) -> None:
        """Start predictions at the training data's gene means (per gene with `gene_bias`, else
        the mean expressed value in the head's output bias), so that training spends its steps
        on context rather than on learning average levels."""
        if self.gene_bias is not None:
            self.gene_bias[: len(gene_means)] = gene_means
        else:
            self.value_head[-1].bias.fill_(mean_value)

    def encode(self, batch: CellBatch, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A batch's tokens -> processed latents [B, n_latents, latent_dim]; `token_mask` replaces
        the batch's own (e.g. a random subset of each cell's tokens). Taking the whole batch, it
        cannot forget the zero-token flags that paper-compatible models need."""
        mask = batch.token_mask if token_mask is None else token_mask
        return self.process(self.encode_tokens(batch.gene_ids, batch.values, mask, batch.token_zero))

    def encode_tokens(self, gene_ids: torch.Tensor, values: torch.Tensor, token_mask: torch.Tensor,
                      token_zero: torch.Tensor | None = None, *,
                      need_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The encoder's cross-attention alone on token tensors [B, L] (and, with `need_weights`,
        its attention weights [B, heads, latents, tokens]). `token_zero` marks zero-count gene
        tokens (paper-compatible batches): they get the original's +1 attention logit."""
        tokens = self.gene_emb(gene_ids) * values.unsqueeze(-1).to(self.latents.dtype)
        mask = token_mask
        if self.config.paper_compatible and token_zero is not None:
            bias = token_zero.to(tokens.dtype) * ZERO_TOKEN_LOGIT
            mask = bias.masked_fill(~token_mask, float("-inf"))
        return self.encoder(self.latents, tokens, mask, need_weights=need_weights)

    def process(self, latents: torch.Tensor) -> torch.Tensor:
        for block in self.processor:
            latents = block(latents)
        return latents

    def decode(self, latents: torch.Tensor, query_ids: torch.Tensor, *,
               need_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Query genes [B, Q] attend to the latents -> decoder outputs [B, Q, gene_dim] (and, with
        `need_weights`, the attention weights [B, heads, Q, latents])."""
        return self.decoder(self.gene_emb(query_ids), latents, need_weights=need_weights)

    def predict_values(self, latents: torch.Tensor, query_ids: torch.Tensor) -> torch.Tensor:
        return self.values_from_decoded(self.decode(latents, query_ids), query_ids)

    def values_from_decoded(self, decoded: torch.Tensor, query_ids: torch.Tensor) -> torch.Tensor:
        values = self.value_head(decoded).squeeze(-1)
        return values if self.gene_bias is None else values + self.gene_bias[query_ids]

    def class_logits(self, latents: torch.Tensor) -> torch.Tensor:
        """Class logits [B, n_classes]: from the class token's decoded query, or from the cell
        embedding that `config.class_input` names."""
        if self.class_head is None:
            raise ValueError("this model has no class head (config.n_classes == 0)")
        if self.config.class_input != "token":
            return self.class_head(self.pool(latents, self.config.class_input))
        query = torch.full((latents.shape[0], 1), self.class_id, device=latents.device)
        return self.class_head(self.decode(latents, query)[:, 0])

    def forward(self, batch: CellBatch) -> torch.Tensor:
        """The pretraining computation: predicted values of the batch's query genes [B, Q]."""
        return self.predict_values(self.encode(batch), batch.query_ids)

    def count_logits(self, cell: torch.Tensor, batches: torch.Tensor | None = None) -> torch.Tensor:
        """Bottleneck vectors [B, bottleneck_dim] (and each cell's batch, for a model with batches)
        -> unnormalised log shares of every gene [B, n_genes]."""
        if self.count_decoder is None:
            raise ValueError("this model has no count decoder (config.count_head is False)")
        if self.batch_embedding is None or batches is None:
            return self.count_decoder(cell)
        cell = cell + self.batch_embedding(batches)
        if self.batch_hidden_embedding is None:
            return self.count_decoder(cell)
        # "every_layer": the batch also shifts the hidden pre-activation and the rank code
        hidden = self.count_decoder[0](cell) + self.batch_hidden_embedding(batches)
        code = self.count_decoder[1:3](hidden)  # LayerNorm, ReLU
        if self.batch_rank_embedding is not None:
            code = self.count_decoder[3](code) + self.batch_rank_embedding(batches)
        return self.count_decoder[-1](code)

    @property
    def default_pooling(self) -> str:
        """The cell embedding users get: the bottleneck where there is one."""
        return "bottleneck" if self.bottleneck is not None else "mean"

    def bottleneck_posterior(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The bottleneck's posterior: its mean [B, bottleneck_dim] (the cell embedding, as
        `pool(latents, "bottleneck")` gives it) and, with a learned variance, its log-variance
        [B, bottleneck_dim] from the same normalised input (None: unit variance)."""
        if self.bottleneck_log_variance is None:
            return self.pool(latents, "bottleneck"), None
        normalised = self.bottleneck[0](self.pool(latents, self.config.bottleneck_input))
        return self.bottleneck[1](normalised), self.bottleneck_log_variance(normalised)

    def pool(self, latents: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
        """Cell embedding from latents: the cell bottleneck, their mean, or all of them flattened
        (the original's)."""
        if pooling == "bottleneck":
            if self.bottleneck is None:
                raise ValueError("this model has no cell bottleneck (config.bottleneck_dim == 0): use 'mean'")
            return self.bottleneck(self.pool(latents, self.config.bottleneck_input))
        if pooling == "mean":
            return latents.mean(dim=1)
        if pooling == "flatten":
            return latents.flatten(1)
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")

    def embedding_width(self, pooling: str = "mean") -> int:
        c = self.config
        if pooling == "bottleneck":
            return c.bottleneck_dim
        return c.latent_dim * (c.n_latents if pooling == "flatten" else 1)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
