"""The embedding monitor of a pretraining run: at every validation round, a labelled dataset is
embedded by the network being trained, read as `Exceiver.embed` reads it, and its cell types are
scored by kNN macro-F1 (k=15, 5-fold stratified: `exceiver.evaluate.cells`). The count loss does
not follow what users judge of an embedding (the shipped model's was lowest at step 15,824 of
110,518), so the score is logged as `monitor_knn_macro_f1` and early stopping and the kept weights
follow it on request (`monitor="embedding"`, higher is better); the loss stays the default.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd

from exceiver.data.labels import cell_labels
from exceiver.data.sources import DataInput, read_datasets
from exceiver.errors import ExceiverInputError, option
from exceiver.evaluate.cells import knn_cross_validated
from exceiver.inference import CellModel, cell_embedding

log = logging.getLogger(__name__)

MONITOR_METRIC = "monitor_knn_macro_f1"
CRITERIA = ("loss", "embedding")  # what early stopping and the kept weights follow
MIN_CELLS = 2  # of each class: the fewest that a stratified split can put on both sides of a fold


@dataclass(frozen=True)
class MonitorCells:
    """The labelled cells a run monitors (a seeded sample of a dataset's labelled cells, in memory)
    and the criterion that early stopping and the kept weights follow."""

    adata: ad.AnnData
    label_key: str
    name: str
    criterion: str

    def identity(self) -> dict:
        """What a resumed run must share with the interrupted one (run.json): the settings and a
        digest of the sampled cells and their labels."""
        digest = hashlib.sha256()
        for values in (self.adata.obs_names, self.adata.obs[self.label_key].astype(str)):
            digest.update("\n".join(values).encode())
        return {"criterion": self.criterion, "data": self.name, "label_key": self.label_key,
                "n_cells": self.adata.n_obs, "cells": digest.hexdigest()[:16]}


def monitored_cells(data: DataInput | None, label_key: str, *, criterion: str, max_cells: int,
                  seed: int) -> MonitorCells | None:
    """The monitor's cells, checked before any work: its label column must hold two classes or more
    of `MIN_CELLS` cells or more each; at most `max_cells` labelled cells are kept, drawn with `seed`.

    Parameters
    ----------
    data
        A labelled AnnData or .h5ad path of raw counts (None: no monitor).
    label_key
        The obs column of cell types.
    criterion
        "loss" (the validation loss) or "embedding" (the monitor's score): what early stopping and
        the kept weights follow.
    max_cells, seed
        The sample's size and seed.

    Returns
    -------
    The sampled cells, or None without monitor data.
    """
    if criterion not in CRITERIA:
        raise ExceiverInputError(f"{option('monitor', criterion)} is not a criterion: use "
                                 f"{' or '.join(option('monitor', c) for c in CRITERIA)}")
    if data is None:
        if criterion == "embedding":
            raise ExceiverInputError(f"{option('monitor', 'embedding')} needs {option('monitor_data')}: a labelled "
                                     f"dataset (.h5ad or AnnData) whose {option('monitor_label_key')} column holds "
                                     "cell types")
        return None
    if not isinstance(data, (str, Path, ad.AnnData)):
        raise ExceiverInputError(f"{option('monitor_data')} takes one AnnData or .h5ad path, got {type(data).__name__}")
    if max_cells < 2 * MIN_CELLS:
        raise ExceiverInputError(f"{option('monitor_cells')} must be >= {2 * MIN_CELLS} (two classes of "
                                 f"{MIN_CELLS} cells), got {max_cells}")
    [(name, adata)] = read_datasets(data)
    name = name if isinstance(data, (str, Path)) else "monitor data"
    labels = cell_labels(adata.obs, label_key, min_cells=MIN_CELLS, name=name)
    rows = np.flatnonzero(labels.labelled)
    if len(rows) > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))
    sample = adata[rows]
    return MonitorCells(sample.to_memory() if adata.isbacked else sample.copy(), label_key, name, criterion)


class EmbeddingMonitor:
    """Scores the cell embedding that `model` (the network being trained, with the run's
    vocabulary, scaler, tokenizer and data contract) makes of the monitored cells."""

    def __init__(self, watched: MonitorCells, model: CellModel, *, seed: int):
        cells = model.read(watched.adata, empty="drop", name=watched.name)  # the reading path of `Exceiver.embed`
        labels = cells.adata.obs[watched.label_key].astype(str).to_numpy()
        counts = pd.Series(labels).value_counts()
        scored = counts.index[counts >= MIN_CELLS]
        if len(scored) < 2:
            raise ExceiverInputError(f"{watched.name}: of its {len(labels):,} monitored cells with counts in the "
                                     f"model's genes, {len(scored)} class of {watched.label_key!r} has {MIN_CELLS} "
                                     f"cells or more, and two are needed: monitor more cells ({option('monitor_cells')})")
        rows = np.flatnonzero(np.isin(labels, scored))
        if len(rows) < len(labels):
            log.info("%s: %d monitored cells of classes with fewer than %d of them are not scored", watched.name,
                     len(labels) - len(rows), MIN_CELLS)
        self.cells = cells if len(rows) == len(labels) else cells.subset(rows)
        self.labels, self.model, self.seed, self.watched = labels[rows], model, seed, watched

    @property
    def selects(self) -> bool:
        """Whether early stopping and the kept weights follow the monitor's score."""
        return self.watched.criterion == "embedding"

    def describe(self) -> dict:
        """The monitor as a model's metrics.json records it."""
        return {"criterion": self.watched.criterion, "data": self.watched.name, "label_key": self.watched.label_key,
                "n_cells": self.cells.n_cells, "n_classes": int(len(set(self.labels)))}

    def score(self, trainer: L.Trainer) -> float:
        """kNN macro-F1 of the cell types on the current weights' embedding, computed by the process
        of rank 0 (on the network's device) and the same number in every process."""
        score = float("nan")
        if trainer.is_global_zero:
            device = next(self.model.module.parameters()).device
            embedding = cell_embedding(self.model, self.cells, device=str(device), progress=False)
            score = knn_cross_validated(embedding, self.labels, seed=self.seed)["knn_macro_f1"]
        return float(trainer.strategy.broadcast(score, src=0))
