"""Figures of an evaluation report (PNG), drawn on standalone matplotlib Figures: no pyplot state
and no backend switch, so a notebook that calls exceiver keeps its own plotting setup."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from matplotlib.figure import Figure


def similarity_heatmaps(profiles: dict[str, pd.DataFrame], path: Path, title: str) -> None:
    """The paper's similarity profile (mean cosine similarity between label groups), one panel
    per representation, on a shared colour scale."""
    fig = Figure(figsize=(4.6 * len(profiles), 4.2))
    axes = fig.subplots(1, len(profiles), squeeze=False)
    low = min(np.nanmin(p.to_numpy()) for p in profiles.values())
    high = max(np.nanmax(p.to_numpy()) for p in profiles.values())
    for ax, (name, profile) in zip(axes[0], profiles.items()):
        im = ax.imshow(profile.to_numpy(), cmap="viridis", vmin=low, vmax=high)
        ax.set_xticks(range(len(profile)), profile.columns, rotation=90, fontsize=7)
        ax.set_yticks(range(len(profile)), profile.index, fontsize=7)
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="mean cosine similarity")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def umaps(representations: dict[str, np.ndarray], labels: pd.DataFrame, path: Path, seed: int = 0) -> None:
    """UMAP of each representation (rows), coloured by each label column (columns)."""
    keys = list(labels.columns)
    fig = Figure(figsize=(5.2 * len(keys), 4.2 * len(representations)))
    axes = fig.subplots(len(representations), len(keys), squeeze=False)
    for row, (name, embedding) in enumerate(representations.items()):
        cells = ad.AnnData(np.zeros((len(embedding), 0), dtype=np.float32), obs=labels.astype("category"),
                           obsm={"rep": embedding})
        sc.pp.neighbors(cells, n_neighbors=15, use_rep="rep", random_state=seed)
        sc.tl.umap(cells, random_state=seed)
        for col, key in enumerate(keys):
            sc.pl.umap(cells, color=key, ax=axes[row][col], show=False, title=f"{name}: {key}", size=12)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def reconstruction_by_decile(deciles: list[dict], path: Path) -> None:
    """MSE of the model and the baselines in each decile of the true (masked) value."""
    fig = Figure(figsize=(6, 3.8))
    ax = fig.subplots()
    x = [d["decile"] for d in deciles]
    for method in ("model", "gene_mean", "knn"):
        ax.plot(x, [d[method]["mse"] for d in deciles], marker="o", label=method)
    ax.set_xlabel("decile of the true value (1: lowest)")
    ax.set_ylabel("MSE on masked genes")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def gene_aurocs(auroc: dict[str, dict[str, float]], path: Path) -> None:
    """AUROC per annotation source, one bar per gene representation (0.5: chance)."""
    sources = list(auroc)
    names = list(next(iter(auroc.values())))
    width = 0.8 / len(names)
    fig = Figure(figsize=(1.1 * len(sources) + 2, 3.8))
    ax = fig.subplots()
    for i, name in enumerate(names):
        ax.bar(np.arange(len(sources)) + i * width, [auroc[s][name] for s in sources], width, label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(sources)) + 0.4 - width / 2, sources, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("AUROC: shared annotation vs not")
    ax.set_ylim(0.3, 1.0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
