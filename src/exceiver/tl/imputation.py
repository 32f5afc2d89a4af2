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

from exceiver.data.counts import count_layers
from exceiver.data.vocab import dataset_genes
from exceiver.devices import inference_device
from exceiver.errors import ExceiverInputError, plain
from exceiver.inference import decode_expression, decode_values
from exceiver.tl.genes import resolve_genes

log = logging.getLogger(__name__)

IMPUTED_KEY = "exceiver_imputed"
METHODS = ("counts", "values")


def impute(model, adata: ad.AnnData, genes: Sequence[str] | None = None, *, method: str = "counts",
           batch: str | None = None, key_added: str = IMPUTED_KEY, inplace: bool = True,
           gene_key: str | None = None, layer: str | None = None, batch_size: int | None = None,
           device: str | None = None, allow_non_integer: bool = False, name: str = "dataset",
           progress: bool = True) -> np.ndarray:
    """Imputed log-normalised expression, log1p(counts per 1e4 of the cell's library), >= 0.

    The log1p scale is the one `impute` has always returned and the one scanpy users work on;
    with `method="counts"` it is log1p of an *expected* count, so `np.expm1` of it is exactly the
    expected normalised expression (shares x 1e4), not an average of logs.

    Parameters
    ----------
    model
        An `Exceiver`.
    adata
        Cells of raw counts; their tokens are the genes they express.
    genes
        None: every gene of `adata` (its var), also written to `adata.layers[key_added]` unless
        `inplace=False`; the columns of genes the model cannot fill (outside its vocabulary, or
        never expressed in its training cells) are NaN, with a warning saying how many. A list of
        vocabulary genes: only those, returned (a layer holds every gene of var); with "counts",
        a gene this dataset did not measure gets its share relative to the genes it did.
    method
        "counts": the count decoder's expected expression, each gene's softmax share over the
        genes this dataset measured (the share the count objective trains) x 1e4; the model needs
        a count decoder. "values": the masked-value head's level of a gene if expressed.
    batch
        A model trained with batches: the batch (one of `model.batches["categories"]`) that the
        count decoder is conditioned on; None averages the expression over all of the model's
        batches (a new dataset's cells belong to none of them). Models without batches: None.
    gene_key, layer, allow_non_integer, name
        Where the counts and gene identifiers are, and the dataset's name in messages (`Exceiver`).
    key_added, inplace, batch_size, device, progress
        The layer written, whether to write it, cells per batch, where to run, a progress bar.

    Returns
    -------
    float32 array [cells, genes of var] (genes=None) or [cells, len(genes)].
    """
    inference_device(device)  # before any data is read
    conditions = _batch_codes(model, method, batch)
    gene_key, layer = model.data_keys(adata.var.columns, count_layers(adata), gene_key, layer)
    ids = model.vocab.ids(dataset_genes(adata, gene_key))
    usable = ids >= 0
    usable[usable] = model.scaler.trained_genes[ids[usable]]
    measured = np.unique(ids[usable])  # the dataset's genes that the count decoder's shares are over
    reading = dict(gene_key=gene_key, layer=layer, batch_size=batch_size, device=device,
                   allow_non_integer=allow_non_integer, name=name, progress=progress)
    if genes is not None:
        query = resolve_genes(model, genes, "genes to impute")
        if method == "counts" and not len(measured):
            raise ExceiverInputError(f"none of the genes of {name} can be imputed: {_unfilled(ids, usable)}")
        return _predict(model, adata, query, measured, method, conditions, reading)
    columns = np.flatnonzero(usable)
    if not len(columns):
        raise ExceiverInputError(f"none of the genes of {name} can be imputed: {_unfilled(ids, usable)}")
    predicted = _predict(model, adata, ids[columns], measured, method, conditions, reading)
    if len(columns) < adata.n_vars:
        message = (f"{adata.n_vars - len(columns):,} of {adata.n_vars:,} genes of {name} cannot be imputed "
                   f"({_unfilled(ids, usable)}): their columns are NaN")
        log.info(message)
        warnings.warn(message, UserWarning, stacklevel=2)
        full = np.full((adata.n_obs, adata.n_vars), np.nan, dtype=np.float32)
        full[:, columns] = predicted
        predicted = full
    if inplace:
        adata.layers[key_added] = predicted
        settings = {"scale": "log1p(counts / library x 1e4)", "method": method, "n_imputed_genes": int(len(columns))}
        if model.config.n_batches and method == "counts":
            settings["batch"] = "mean over the model's batches" if batch is None else str(batch)
        adata.uns.setdefault("exceiver", {})[key_added] = settings
    return predicted


def _batch_codes(model, method: str, batch: str | None) -> torch.Tensor | None:
    """The model's batch codes that the count decoder is conditioned on (None: no batch
    embedding); refuses a method or batch the model cannot use, before any data is read."""
    if method not in METHODS:
        raise ExceiverInputError(f"method={method!r} is not one of {', '.join(map(repr, METHODS))}")
    if method == "values":
        if batch is not None:
            raise ExceiverInputError(f"batch={batch!r} conditions the count decoder; method='values' takes no batch")
        return None
    if model.module.count_decoder is None:
        raise ExceiverInputError("this model has no count decoder (trained without the count objective): "
                                 "use method='values'")
    if not model.config.n_batches:
        if batch is not None:
            raise ExceiverInputError(f"batch={batch!r}: this model was trained without batches")
        return None
    categories = [str(c) for c in model.batches["categories"]]
    if batch is None:
        return torch.arange(len(categories))
    if str(batch) not in categories:
        raise ExceiverInputError(f"batch={batch!r} is not one of the model's {len(categories)} batches of "
                                 f"{model.batches.get('key')!r}: {plain(categories[:5])}")
    return torch.tensor([categories.index(str(batch))])


def _unfilled(ids: np.ndarray, usable: np.ndarray) -> str:
    outside = int((ids < 0).sum())
    return (f"{outside:,} not in the model's vocabulary, {len(ids) - outside - int(usable.sum()):,} never "
            f"expressed in its training cells")


@torch.inference_mode()
def _predict(model, adata: ad.AnnData, query: np.ndarray, measured: np.ndarray, method: str,
             conditions: torch.Tensor | None, reading: dict) -> np.ndarray:
    """[cells, query genes] on the log1p scale, cell batch by cell batch."""
    out = np.empty((adata.n_obs, len(query)), dtype=np.float32)
    query_ids, measured_ids = torch.from_numpy(query), torch.from_numpy(measured)
    for batch, latents in model._latents(adata, reading["gene_key"], reading["layer"], reading["batch_size"],
                                         reading["device"], reading["progress"], "imputing",
                                         allow_non_integer=reading["allow_non_integer"], name=reading["name"]):
        on = latents.device
        if method == "values":
            decoded = decode_values(model.module, latents, query_ids.to(on))
        else:
            decoded = torch.log1p(decode_expression(
                model.module, latents, query_ids.to(on), measured_ids.to(on),
                None if conditions is None else conditions.to(on), model.scaler.target_sum))
        out[batch.cells.cpu().numpy()] = decoded.float().cpu().numpy()
    return _log_expression(model, out, query) if method == "values" else out


def _log_expression(model, values: np.ndarray, ids: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Model values [cells, genes] -> log-normalised expression, in place by column chunks, clipped
    at 0 (an expression level cannot be negative; a prediction below it means "not expressed")."""
    for start in range(0, len(ids), chunk):
        part = values[:, start:start + chunk]
        part[:] = np.maximum(model.scaler.log_expression(ids[start:start + chunk], part), 0.0)
    return values
