"""Gene-gene dependency maps: how perturbing each gene of a list moves the others' predictions,
and, as a second view, how much attention flows from each gene's token to each gene's query
through the latents. Saved as tables and drawn as clustered heatmaps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from exceiver.errors import ExceiverInputError
from exceiver.infer import iterate_batches, resolve_device
from exceiver.io import atomic_dir, write_json
from exceiver.model import CrossAttentionBlock, _split_heads
from exceiver.regulation.edit import require_token_model
from exceiver.regulation.genes import resolve_genes
from exceiver.regulation.perturbation import perturb


@dataclass
class GeneDependencies:
    """`effects[a, b]`: effect size on gene b of perturbing gene a; `attention[a, b]`: share of b's
    decoder attention routed to a's token (NaN where no cell expresses a)."""

    effects: pd.DataFrame
    attention: pd.DataFrame
    mode: str

    def partners(self, n: int = 5) -> pd.DataFrame:
        """Each gene's `n` strongest partners by |effect| (as perturbed gene, on the others)."""
        rows = []
        for gene, effects in self.effects.iterrows():
            others = effects.drop(gene).dropna()
            for rank, (partner, effect) in enumerate(others.reindex(others.abs().sort_values(ascending=False).index)
                                                     .head(n).items(), 1):
                rows.append({"gene": gene, "rank": rank, "partner": partner, "effect_size": effect,
                             "attention": self.attention.loc[gene, partner]})
        return pd.DataFrame(rows, columns=["gene", "rank", "partner", "effect_size", "attention"])

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """effects.csv, attention.csv, partners.csv and clustered heatmaps of both views."""
        with atomic_dir(folder, overwrite=overwrite) as tmp:
            self.effects.to_csv(tmp / "effects.csv")
            self.attention.to_csv(tmp / "attention.csv")
            self.partners().to_csv(tmp / "partners.csv", index=False)
            plot_dependencies(self.effects, tmp / "effects.png", title=f"{self.mode} effect size (row: perturbed)",
                              centre=True)
            plot_dependencies(self.attention, tmp / "attention.png", title="attention routed token -> query",
                              centre=False)
            write_json({"mode": self.mode, "genes": list(self.effects.index)}, tmp / "dependencies.json")
        return Path(folder)


def gene_dependencies(model, adata: ad.AnnData, genes: Sequence[str], *, mode: str | float = "knockout",
                      **kwargs) -> GeneDependencies:
    """Perturb each gene of `genes` in turn (options: `perturb`) and read the effects on the others,
    beside the attention routes between the same genes."""
    genes = [str(g) for g in genes]
    if len(genes) < 2:
        raise ExceiverInputError("a dependency map needs at least 2 genes")
    table = perturb(model, adata, genes, mode, query_genes=genes, **kwargs)
    effects = table.pivot(index="perturbed_gene", columns="gene", values="effect_size")
    effects = effects.reindex(index=genes, columns=genes)
    attention_kwargs = {k: kwargs[k] for k in ("gene_key", "layer", "batch_size", "device", "progress") if k in kwargs}
    attention = attention_routes(model, adata, genes, **attention_kwargs)
    return GeneDependencies(effects, attention, str(mode))


@torch.inference_mode()
def attention_routes(model, adata: ad.AnnData, genes: Sequence[str], *, gene_key: str | None = None,
                     layer: str | None = None, batch_size: int | None = None, device: str | None = None,
                     progress: bool = True) -> pd.DataFrame:
    """[source gene, target gene]: decoder attention of the target's query on each latent times the
    encoder attention of that latent on the source's token (heads averaged), summed over latents and
    averaged over the cells expressing the source. It ignores the processor's mixing of latents:
    a view of routing, not of causation."""
    require_token_model(model)
    ids = torch.as_tensor(resolve_genes(model, genes, "genes"))
    cells = model.cells(adata, gene_key=gene_key, layer=layer)
    module = model.module
    device = resolve_device(device)
    module.to(device)
    ids = ids.to(device)
    total = torch.zeros(len(ids), len(ids), dtype=torch.float64, device=device)
    n = torch.zeros(len(ids), dtype=torch.float64, device=device)
    for batch in iterate_batches(module, cells, model.scaler, batch_size=batch_size, device=device,
                                 progress=progress, desc="attention"):
        tokens = module.gene_emb(batch.gene_ids) * batch.values.unsqueeze(-1)
        encoder = _attention(module.encoder, module.latents, tokens, batch.token_mask)  # [B, latents, L]
        latents = module.encode(batch.gene_ids, batch.values, batch.token_mask)
        queries = module.gene_emb(ids).expand(len(batch), -1, -1)
        decoder = _attention(module.decoder, queries, latents)  # [B, T, latents]
        routes = decoder @ encoder  # [B, T, L]: target query -> token
        source = (batch.gene_ids[:, :, None] == ids) & batch.token_mask[:, :, None]  # [B, L, S]
        total += torch.einsum("btl,bls->st", routes.double(), source.double())
        n += source.any(1).sum(0)
    names = [str(g) for g in genes]
    matrix = (total / n[:, None]).cpu().numpy()
    matrix[n.cpu().numpy() == 0] = np.nan
    return pd.DataFrame(matrix, index=pd.Index(names, name="source"), columns=pd.Index(names, name="target"))


def _attention(block: CrossAttentionBlock, queries: torch.Tensor, kv: torch.Tensor,
               kv_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention weights [B, Q, K] of a cross-attention block, averaged over heads."""
    attn = block.attn
    q = _split_heads(attn.q(block.norm_q(queries)), attn.n_heads)
    if q.dim() == 3:
        q = q.expand(kv.shape[0], *q.shape)
    k, _ = _split_heads(attn.kv(block.norm_kv(kv)), 2 * attn.n_heads).chunk(2, dim=-3)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if kv_mask is not None:
        logits = logits.masked_fill(~kv_mask[:, None, None, :], float("-inf"))
    return logits.softmax(-1).mean(1)


def plot_dependencies(matrix: pd.DataFrame, path: str | Path, *, title: str = "", centre: bool = True) -> Path:
    """A heatmap with rows and columns ordered by average-linkage clustering (diagonal left blank)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.cluster.hierarchy import leaves_list, linkage

    values = matrix.to_numpy(dtype=float, copy=True)
    np.fill_diagonal(values, np.nan)
    filled = np.nan_to_num(values)
    order = leaves_list(linkage(filled, "average")) if len(matrix) > 2 else np.arange(len(matrix))
    cols = leaves_list(linkage(filled.T, "average")) if len(matrix.columns) > 2 else np.arange(len(matrix.columns))
    values = values[np.ix_(order, cols)]
    limit = np.nanmax(np.abs(values)) if np.isfinite(values).any() else 1.0
    size = 2 + 0.3 * max(values.shape)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(values, cmap="RdBu_r" if centre else "viridis", vmin=-limit if centre else None,
                      vmax=limit if centre else None)
    ax.set_xticks(range(len(cols)), matrix.columns[cols], rotation=90, fontsize=7)
    ax.set_yticks(range(len(order)), matrix.index[order], fontsize=7)
    ax.set_xlabel("target gene")
    ax.set_ylabel("perturbed / source gene")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
