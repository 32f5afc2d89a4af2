"""Gene-gene dependency maps: how perturbing each gene of a list moves the others' predictions,
and, as a second view, how much attention flows from each gene's token to each gene's query
through the latents. Saved as tables and drawn as clustered heatmaps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from typing_extensions import Unpack

from exceiver.data.contract import ReadingOptions
from exceiver.devices import inference_device
from exceiver.errors import ExceiverInputError
from exceiver.inference import CellModel, check_model, iterate_batches, on_device, sum_dtype
from exceiver.io import write_json
from exceiver.outputs import atomic_dir
from exceiver.tl.edit import require_token_model
from exceiver.tl.perturbation import perturb


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


def gene_dependencies(model: CellModel, adata: ad.AnnData, genes: Sequence[str], *, mode: str | float = "knockout",
                      groupby: str | None = None, groups: Sequence[str] | None = None, quantile: float = 0.95,
                      min_shift: float = 0.1, batch_size: int | None = None, device: str | None = None,
                      progress: bool = True, **reading: Unpack[ReadingOptions]) -> GeneDependencies:
    """Perturb each gene of `genes` in turn and read the effects on the others, beside the
    attention routes between the same genes (over all cells).

    Parameters
    ----------
    genes
        At least 2 genes, as the dataset names them.
    mode, groupby, groups, quantile, min_shift, batch_size, device, progress, **reading
        As in `exceiver.tl.perturb`.

    Returns
    -------
    The effects and attention matrices, indexed by the genes as the dataset names them.
    """
    genes = [str(g) for g in genes]
    if len(genes) < 2:
        raise ExceiverInputError("a dependency map needs at least 2 genes")
    read = model.read(adata, **reading)
    genes = list(read.data_gene_names(read.resolve_genes(genes, "genes")))  # as the dataset names them
    options = {"batch_size": batch_size, "device": device, "progress": progress, **reading}
    table = perturb(model, adata, genes, mode, query_genes=genes, groupby=groupby, groups=groups, quantile=quantile,
                    min_shift=min_shift, inplace=False, **options)
    effects = table.pivot(index="perturbed_gene", columns="gene", values="effect_size")
    effects = effects.reindex(index=genes, columns=genes)
    attention = attention_routes(model, adata, genes, **options)
    return GeneDependencies(effects, attention, str(mode))


@torch.inference_mode()
def attention_routes(model: CellModel, adata: ad.AnnData, genes: Sequence[str], *, batch_size: int | None = None,
                     device: str | None = None, progress: bool = True,
                     **reading: Unpack[ReadingOptions]) -> pd.DataFrame:
    """[source gene, target gene]: decoder attention of the target's query on each latent times the
    encoder attention of that latent on the source's token (the model's own attention weights,
    heads averaged), summed over latents and averaged over the cells expressing the source. It
    ignores the processor's mixing of latents: a view of routing, not of causation. Genes are
    named as the dataset names them (model names are understood); options as in `exceiver.tl.perturb`."""
    require_token_model(check_model(model))
    inference_device(device)  # before any data is read
    read = model.read(adata, **reading)
    ids = torch.as_tensor(read.resolve_genes(genes, "genes"))
    module = model.module
    with on_device(module, device) as device:
        module.eval()
        ids = ids.to(device)
        dtype = sum_dtype(device)
        total = torch.zeros(len(ids), len(ids), dtype=dtype, device=device)
        n = torch.zeros(len(ids), dtype=dtype, device=device)
        for batch in iterate_batches(read.in_memory(), model.scaler, model.tokenizer, batch_size=batch_size,
                                     device=device, progress=progress, desc="attention"):
            encoded, encoder = module.encode_tokens(batch.gene_ids, batch.values, batch.token_mask, need_weights=True)
            latents = module.process(encoded)  # [B, latents, dim]; encoder weights [B, heads, latents, L]
            _, decoder = module.decode(latents, ids.expand(len(batch), -1), need_weights=True)  # [B, heads, T, latents]
            routes = decoder.mean(1) @ encoder.mean(1)  # [B, T, L]: target query -> token
            source = (batch.gene_ids[:, :, None] == ids) & batch.token_mask[:, :, None]  # [B, L, S]
            total += torch.einsum("btl,bls->st", routes.to(dtype), source.to(dtype))
            n += source.any(1).sum(0)
    names = list(read.data_gene_names(ids.cpu().numpy()))
    matrix = (total / n[:, None]).cpu().numpy()
    matrix[n.cpu().numpy() == 0] = np.nan
    return pd.DataFrame(matrix, index=pd.Index(names, name="source"), columns=pd.Index(names, name="target"))


def plot_dependencies(matrix: pd.DataFrame, path: str | Path, *, title: str = "", centre: bool = True) -> Path:
    """A heatmap with rows and columns ordered by average-linkage clustering (diagonal left blank),
    drawn on a standalone Figure (no pyplot state, so notebooks keep their own backend)."""
    from scipy.cluster.hierarchy import leaves_list, linkage

    values = matrix.to_numpy(dtype=float, copy=True)
    np.fill_diagonal(values, np.nan)
    filled = np.nan_to_num(values)
    order = leaves_list(linkage(filled, "average")) if len(matrix) > 2 else np.arange(len(matrix))
    cols = leaves_list(linkage(filled.T, "average")) if len(matrix.columns) > 2 else np.arange(len(matrix.columns))
    values = values[np.ix_(order, cols)]
    limit = np.nanmax(np.abs(values)) if np.isfinite(values).any() else 1.0
    size = 2 + 0.3 * max(values.shape)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.subplots()
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
    return Path(path)
