"""Imputation: each cell's predicted expression of genes, from its observed tokens.

Models pretrained with `zero_query_ratio > 0` have also learned to predict the value of genes a
cell does not detect; without it, the decoder only ever saw expressed genes as queries, so its
predictions read as "the level if expressed".
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import anndata as ad
import numpy as np
from typing_extensions import Unpack

from exceiver.data.contract import ModelCells, ReadingOptions
from exceiver.devices import inference_device
from exceiver.inference import CellModel, decoded_values, record

log = logging.getLogger(__name__)

IMPUTED_KEY = "exceiver_imputed"


def impute(model: CellModel, adata: ad.AnnData, genes: Sequence[str] | None = None, *,
           key_added: str = IMPUTED_KEY, inplace: bool = True, batch_size: int | None = None,
           device: str | None = None, progress: bool = True, **reading: Unpack[ReadingOptions]) -> np.ndarray:
    """Predicted log-normalised expression (log1p of counts per 1e4, >= 0) of each cell.

    Parameters
    ----------
    model
        A trained model (`exceiver.Exceiver`).
    adata
        Raw counts, read as the model reads data (mouse data through a human+mouse model's own
        gene map included).
    genes
        None: every gene of `adata` (its var), also written to `adata.layers[key_added]` unless
        `inplace=False`; columns of genes the model cannot predict (outside its vocabulary, also
        through its gene map, or never expressed in its training cells) are NaN, with a warning.
        A list of genes (as the dataset names them): a [cells, genes] array, returned only.
    key_added
        The layer, and `uns["exceiver"][key_added]` for the settings.
    batch_size, device, progress
        How inference runs; cells are processed in batches and genes in chunks.
    **reading
        How the dataset is read (`exceiver.Exceiver.read`).

    Returns
    -------
    float32 array [cells, genes].
    """
    inference_device(device)  # before any data is read
    cells = model.read(adata, **reading)
    options = {"batch_size": batch_size, "device": device, "progress": progress}
    if genes is not None:
        return _imputed(model, cells, cells.resolve_genes(genes, "genes to impute"), options)
    ids = cells.gene_ids.copy()
    usable = ids >= 0
    usable[usable] = cells.trained[ids[usable]]
    columns = np.flatnonzero(usable)
    predicted = _imputed(model, cells, ids[columns], options)
    if len(columns) < len(ids):
        warnings.warn(f"{len(ids) - len(columns):,} of {len(ids):,} genes of {cells.name} cannot be imputed (not in "
                      f"the model's trained genes): NaN in layers[{key_added!r}]", UserWarning, stacklevel=2)
        full = np.full((cells.n_cells, len(ids)), np.nan, dtype=np.float32)
        full[:, columns] = predicted
        predicted = full
    if inplace:
        adata.layers[key_added] = predicted
        record(adata, key_added, {"scale": "log1p(counts / library x 1e4)", "n_imputed_genes": int(len(columns))})
    return predicted


def _imputed(model: CellModel, cells: ModelCells, gene_ids: np.ndarray, options: dict) -> np.ndarray:
    """Log-normalised predictions of vocabulary genes `gene_ids` (repeats decoded once: several
    of a dataset's genes can read as one model gene)."""
    unique, inverse = np.unique(gene_ids, return_inverse=True)
    return _log_expression(model, decoded_values(model, cells, unique, **options), unique)[:, inverse]


def _log_expression(model: CellModel, values: np.ndarray, ids: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Model values [cells, genes] -> log-normalised expression, in place by column chunks, clipped
    at 0 (an expression level cannot be negative; a prediction below it means "not expressed")."""
    for start in range(0, len(ids), chunk):
        part = values[:, start:start + chunk]
        part[:] = np.maximum(model.scaler.log_expression(ids[start:start + chunk], part), 0.0)
    return values
