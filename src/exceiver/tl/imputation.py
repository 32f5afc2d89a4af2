"""Imputation: each cell's predicted expression of genes, from its observed tokens.

Models pretrained with `zero_query_ratio > 0` have also learned to predict the value of genes a
cell does not detect; without it, the decoder only ever saw expressed genes as queries, so its
predictions read as "the level if expressed".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anndata as ad
import numpy as np

from exceiver.data.counts import count_layers
from exceiver.data.vocab import dataset_genes
from exceiver.devices import inference_device
from exceiver.tl.genes import resolve_genes

log = logging.getLogger(__name__)

IMPUTED_KEY = "exceiver_imputed"


def impute(model, adata: ad.AnnData, genes: Sequence[str] | None = None, *, key_added: str = IMPUTED_KEY,
           inplace: bool = True, gene_key: str | None = None, layer: str | None = None,
           batch_size: int | None = None, device: str | None = None, allow_non_integer: bool = False,
           name: str = "dataset", progress: bool = True) -> np.ndarray:
    """Predicted log-normalised expression (log1p of counts per 1e4, >= 0), float32, returned.

    genes=None: every gene of `adata` (its var), also written to `adata.layers[key_added]` unless
    `inplace=False`; columns of genes the model cannot predict (outside its vocabulary, or never
    expressed in its training cells) are NaN. A list of vocabulary genes: a [cells, genes] array
    (returned only: a layer holds every gene of var). Cells are processed in batches and query
    genes in chunks; only the output is cells x genes. gene_key, layer, allow_non_integer, name:
    where the counts and gene identifiers are, and the dataset's name in messages (`Exceiver`).
    """
    inference_device(device)  # before any data is read
    gene_key, layer = model.data_keys(adata.var.columns, count_layers(adata), gene_key, layer)
    if genes is not None:
        ids = resolve_genes(model, genes, "genes to impute")
        return _log_expression(model, model.predict_values(
            adata, list(genes), gene_key=gene_key, layer=layer, batch_size=batch_size, device=device,
            allow_non_integer=allow_non_integer, name=name, progress=progress), ids)
    ids = model.vocab.ids(dataset_genes(adata, gene_key))
    usable = ids >= 0
    usable[usable] = model.scaler.trained_genes[ids[usable]]
    columns = np.flatnonzero(usable)
    predicted = model.predict_values(adata, list(np.asarray(model.vocab.genes)[ids[columns]]), gene_key=gene_key,
                                     layer=layer, batch_size=batch_size, device=device,
                                     allow_non_integer=allow_non_integer, name=name, progress=progress)
    predicted = _log_expression(model, predicted, ids[columns])
    if len(columns) < adata.n_vars:
        log.info("%s of %s genes cannot be imputed (not in the model's trained genes): NaN in layers[%r]",
                 f"{adata.n_vars - len(columns):,}", f"{adata.n_vars:,}", key_added)
        full = np.full((adata.n_obs, adata.n_vars), np.nan, dtype=np.float32)
        full[:, columns] = predicted
        predicted = full
    if inplace:
        adata.layers[key_added] = predicted
        adata.uns.setdefault("exceiver", {})[key_added] = {"scale": "log1p(counts / library x 1e4)",
                                                           "n_imputed_genes": int(len(columns))}
    return predicted


def _log_expression(model, values: np.ndarray, ids: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Model values [cells, genes] -> log-normalised expression, in place by column chunks, clipped
    at 0 (an expression level cannot be negative; a prediction below it means "not expressed")."""
    for start in range(0, len(ids), chunk):
        part = values[:, start:start + chunk]
        part[:] = np.maximum(model.scaler.log_expression(ids[start:start + chunk], part), 0.0)
    return values
