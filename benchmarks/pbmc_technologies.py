"""A multi-technology PBMC integration target built from the shared PBMC files: 10x 3' v1 (pbmc3k,
annotated), 10x 3' v2, 10x 3' v3 and 10x 5' (1,000 cells each, no annotation), technology as the
batch. The unannotated cells get pbmc3k's cell types by logistic regression on log-normalised
HVGs (the project's label baseline), and only confident calls are kept; `soundness` checks each
kept type's canonical marker in every technology, so the labels can be judged before any
integration is scored with them.

Why this is a fair target: the labels come from a linear classifier on the measured genes, which
neither exceiver nor scVI is; a method is not rewarded for resembling the labeller more than the
other, and label transfer from pbmc3k (the largest batch) measures agreement with these calls.

    EXCEIVER_SHARED=../shared python benchmarks/pbmc_technologies.py   # the soundness table
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common import Target, fit_logreg_hvg, log_normalised_symbols, shared_folder

REFERENCE = ("pbmc3k_seurat_2638", "10x 3' v1")
UNLABELLED = {"scwg_1k_PBMC_v2_raw": "10x 3' v2", "scwg_1k_PBMC_v3_filt": "10x 3' v3",
              "scwg_5prime_PBMC_filt_1kcells": "10x 5'"}
MIN_CONFIDENCE = 0.9  # a transferred label is kept where its probability reaches this
# Each pbmc3k type's canonical marker (Seurat's PBMC tutorial); the CD4 T types share IL7R.
MARKERS = {"Naive CD4 T": "IL7R", "Memory CD4 T": "IL7R", "CD14+ Mono": "CD14", "B": "MS4A1", "CD8 T": "CD8A",
           "FCGR3A+ Mono": "FCGR3A", "NK": "GNLY", "DC": "FCER1A", "Platelet": "PPBP"}


@dataclass(frozen=True)
class PbmcTechnologies(Target):
    """The built target: `read` returns the four technologies' cells on their shared genes, with
    `cell_type` (pbmc3k's annotation, or the confident transferred call) and `assay`."""

    file: str = "pbmc_technologies"
    label_key: str = "cell_type"
    batch_key: str = "assay"

    @property
    def files(self) -> tuple[str, ...]:
        return (REFERENCE[0], *UNLABELLED)

    def read(self, data: Path):
        return build(data)


def build(data: Path, seed: int = 0):
    """The four files' cells on the genes they share (by symbol), labelled as the module says;
    unlabelled cells below `MIN_CONFIDENCE` are left out."""
    import anndata as ad

    reference = Target(REFERENCE[0], "cell_type").read(data)  # a missing file: one line naming it
    others = {assay: Target(name, "cell_type").read(data) for name, assay in UNLABELLED.items()}
    shared = reference.var_names
    for adata in others.values():
        shared = shared.intersection(adata.var_names)
    classifier, genes = fit_logreg_hvg(reference[:, shared], "cell_type", None, seed)
    parts = [_cells(reference[:, shared], REFERENCE[1], reference.obs["cell_type"].astype(str).to_numpy())]
    for assay, adata in others.items():
        cells = adata[:, shared]
        probabilities = classifier.predict_proba(log_normalised_symbols(cells)[:, genes].X)
        confident = probabilities.max(1) >= MIN_CONFIDENCE
        labels = classifier.classes_[probabilities.argmax(1)]
        parts.append(_cells(cells[confident], assay, labels[confident]))
    return ad.concat(parts, index_unique="-")


def _cells(adata, assay: str, labels: np.ndarray):
    import anndata as ad

    obs = pd.DataFrame({"cell_type": pd.Categorical(labels), "assay": assay}, index=adata.obs_names.astype(str))
    return ad.AnnData(adata.X.astype(np.float32), obs=obs, var=pd.DataFrame(index=adata.var_names))


def soundness(adata) -> pd.DataFrame:
    """Per technology and cell type: cells, and the fold change of the type's marker (mean
    log-normalised expression in the type over the other cells of that technology). Sound calls
    have markers clearly above 1 in every technology, as in pbmc3k's own annotation."""
    logn = log_normalised_symbols(adata)
    rows = []
    for assay in adata.obs["assay"].unique():
        tech = (adata.obs["assay"] == assay).to_numpy()
        for cell_type, marker in MARKERS.items():
            inside = tech & (adata.obs["cell_type"] == cell_type).to_numpy()
            if not inside.any() or marker not in logn.var_names:
                continue
            x = np.asarray(logn[:, marker].X.todense()).ravel() if hasattr(logn.X, "todense") else logn[:, marker].X.ravel()
            fold = (np.expm1(x[inside]).mean() + 1e-3) / (np.expm1(x[tech & ~inside]).mean() + 1e-3)
            rows.append({"assay": assay, "cell_type": cell_type, "cells": int(inside.sum()), "marker": marker,
                         "fold_change": float(fold)})
    return pd.DataFrame(rows)


def main() -> None:
    adata = build(shared_folder() / "data")
    counts = adata.obs.groupby(["assay", "cell_type"], observed=True).size().unstack(fill_value=0)
    print(f"{adata.n_obs} cells, {adata.n_vars} shared genes\n{counts.to_string()}\n")
    print(soundness(adata).to_string(index=False))


if __name__ == "__main__":
    main()
