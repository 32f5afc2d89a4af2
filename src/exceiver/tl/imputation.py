"""Imputation: each cell's expected expression of genes, from its observed tokens.

Two readings of a model. The count decoder (`method="counts"`, the default) gives each gene's
expected share of the cell's library, what scVI's `get_normalized_expression` gives: zeros and
counts averaged together, so a gene that a cell type rarely detects sits low. The masked-value
head (`method="values"`) gives the level a gene would have if the cell expressed it: models
pretrained without `zero_query_ratio > 0` only ever saw expressed genes as its queries.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import anndata as ad
import numpy as np
import torch
from typing_extensions import Unpack

from exceiver.data.contract import ModelCells, ReadingOptions
from exceiver.data.vocab import dataset_genes
from exceiver.devices import inference_device
from exceiver.errors import ExceiverInputError, option, plain
from exceiver.inference import CellModel, cell_latents, check_model, decode_expression, decode_values, record

log = logging.getLogger(__name__)

IMPUTED_KEY = "exceiver_imputed"
METHODS = ("counts", "values")


def impute(model: CellModel, adata: ad.AnnData, genes: Sequence[str] | None = None, *, method: str = "counts",
           batch: str | None = None, key_added: str = IMPUTED_KEY, inplace: bool = True,
           batch_size: int | None = None, device: str | None = None, progress: bool = True,
           **reading: Unpack[ReadingOptions]) -> np.ndarray:
    """Imputed log-normalised expression, log1p(counts per 1e4 of the cell's library), >= 0.

    The log1p scale is the one `impute` has always returned and the one scanpy users work on;
    with `method="counts"` it is log1p of an *expected* count, so `np.expm1` of it is exactly the
    expected normalised expression (shares x 1e4), not an average of logs.

    Parameters
    ----------
    model
        A trained model (`exceiver.Exceiver`).
    adata
        Raw counts, read as the model reads data (mouse data through a human+mouse model's own
        gene map included); their tokens are the genes they express.
    genes
        None: every gene of `adata` (its var), also written to `adata.layers[key_added]` unless
        `inplace=False`; the columns of genes the model cannot fill (outside its vocabulary, also
        through its gene map, or never expressed in its training cells) are NaN, with a warning
        saying how many. A list of genes (as the dataset names them): only those, returned (a
        layer holds every gene of var); with "counts", a gene this dataset did not measure gets
        its share relative to the genes it did.
    method
        "counts": the count decoder's expected expression, each gene's softmax share over the
        genes this dataset measured (the share the count objective trains) x 1e4; the model needs
        a count decoder. "values": the masked-value head's level of a gene if expressed.
    batch
        A model trained with batches: the batch (one of `model.batches["categories"]`) that the
        count decoder is conditioned on; None averages the expression over all of the model's
        batches (a new dataset's cells belong to none of them). Models without batches: None.
    key_added, inplace
        The layer written (settings in `uns["exceiver"][key_added]`), and whether to write it.
    batch_size, device, progress
        Cells per batch, where to run, a progress bar.
    **reading
        How the dataset is read (`exceiver.Exceiver.read`).

    Returns
    -------
    float32 array [cells, genes of var] (genes=None) or [cells, len(genes)].
    """
    check_model(model)
    inference_device(device)  # before any data is read
    conditions = _batch_codes(model, method, batch)
    cells = model.read(adata, **reading)
    measured = np.flatnonzero(cells.measured)  # the dataset's genes that the count decoder's shares are over
    if method == "counts" and not len(measured):
        raise ExceiverInputError(f"none of the genes of {cells.name} can be imputed: {_unfilled(cells)}")
    options = {"batch_size": batch_size, "device": device, "progress": progress}
    if genes is not None:
        return _predict(model, cells, cells.resolve_genes(genes, "genes to impute"), measured, method, conditions,
                        options)
    ids = _var_gene_ids(cells)
    usable = ids >= 0
    usable[usable] = cells.trained[ids[usable]]
    columns = np.flatnonzero(usable)
    predicted = _predict(model, cells, ids[columns], measured, method, conditions, options)
    if len(columns) < len(usable):
        message = (f"{len(usable) - len(columns):,} of {len(usable):,} genes of {cells.name} cannot be imputed "
                   f"({_unfilled(cells)}): their columns are NaN")
        log.info(message)
        warnings.warn(message, UserWarning, stacklevel=2)
        full = np.full((cells.n_cells, len(usable)), np.nan, dtype=np.float32)
        full[:, columns] = predicted
        predicted = full
    if inplace:
        adata.layers[key_added] = predicted
        settings = {"scale": "log1p(counts / library x 1e4)", "method": method, "n_imputed_genes": int(len(columns))}
        if model.module.config.n_batches and method == "counts":
            settings["batch"] = "mean over the model's batches" if batch is None else str(batch)
        record(adata, key_added, settings)
    return predicted


def _batch_codes(model: CellModel, method: str, batch: str | None) -> torch.Tensor | None:
    """The model's batch codes that the count decoder is conditioned on (None: no batch
    embedding); refuses a method or batch the model cannot use, before any data is read."""
    if method not in METHODS:
        raise ExceiverInputError(f"{option('method', method)} is not one of {', '.join(METHODS)}")
    if method == "values":
        if batch is not None:
            raise ExceiverInputError(f"{option('batch', batch)} conditions the count decoder; {option('method', 'values')} takes no batch")
        return None
    if model.module.count_decoder is None:
        raise ExceiverInputError("this model has no count decoder (trained without the count objective): "
                                 f"use {option('method', 'values')}")
    if not model.module.config.n_batches:
        if batch is not None:
            raise ExceiverInputError(f"{option('batch', batch)}: this model was trained without batches")
        return None
    categories = [str(c) for c in model.batches["categories"]]
    if batch is None:
        return torch.arange(len(categories))
    if str(batch) not in categories:
        raise ExceiverInputError(f"{option('batch', batch)} is not one of the model's {len(categories)} batches of "
                                 f"{model.batches.get('key')!r}: {plain(categories[:5])}")
    return torch.tensor([categories.index(str(batch))])


def _var_gene_ids(cells: ModelCells) -> np.ndarray:
    """The vocabulary id of each gene of `adata.var` (the layer's columns), -1 where the model has
    none; with counts in `adata.raw`, whose genes may be more, looked up by name."""
    if len(cells.gene_ids) == cells.adata.n_vars:
        return cells.gene_ids.copy()
    key = cells.gene_key if cells.gene_key in cells.adata.var.columns else None
    return cells.model_gene_ids(dataset_genes(cells.adata, key))


def _unfilled(cells: ModelCells) -> str:
    ids = _var_gene_ids(cells)
    outside = int((ids < 0).sum())
    untrained = int((~cells.trained[ids[ids >= 0]]).sum())
    return f"{outside:,} not in the model's vocabulary, {untrained:,} never expressed in its training cells"


@torch.inference_mode()
def _predict(model: CellModel, cells: ModelCells, query: np.ndarray, measured: np.ndarray, method: str,
             conditions: torch.Tensor | None, options: dict) -> np.ndarray:
    """[cells, query genes] on the log1p scale, cell batch by cell batch; a gene asked for twice
    (several of a dataset's genes can read as one model gene) is decoded once."""
    unique, inverse = np.unique(query, return_inverse=True)
    out = np.empty((cells.n_cells, len(unique)), dtype=np.float32)
    query_ids, measured_ids = torch.from_numpy(unique), torch.from_numpy(measured)
    for batch, latents in cell_latents(model, cells, desc="imputing", **options):
        on = latents.device
        if method == "values":
            decoded = decode_values(model.module, latents, query_ids.to(on))
        else:
            decoded = torch.log1p(decode_expression(
                model.module, latents, query_ids.to(on), measured_ids.to(on),
                None if conditions is None else conditions.to(on), model.scaler.target_sum))
        out[batch.cells.cpu().numpy()] = decoded.float().cpu().numpy()
    out = _log_expression(model, out, unique) if method == "values" else out
    return out[:, inverse]


def _log_expression(model: CellModel, values: np.ndarray, ids: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Model values [cells, genes] -> log-normalised expression, in place by column chunks, clipped
    at 0 (an expression level cannot be negative; a prediction below it means "not expressed")."""
    for start in range(0, len(ids), chunk):
        part = values[:, start:start + chunk]
        part[:] = np.maximum(model.scaler.log_expression(ids[start:start + chunk], part), 0.0)
    return values
