"""Label transfer: a labelled reference's labels (cell types, conditions, ...) carried to query
cells through the model's cell embedding, as scanpy's `ingest` and scArches' kNN do.

Both datasets are embedded on the model genes they both measured, so that a gene only one of them
has cannot pull their embeddings apart. Two read-outs of the embedding:
- "linear" (the default): logistic regression with balanced class weights on standardised
  embeddings (the same fit as `finetune(mode="freeze")`); confidence = its predicted probability;
- "knn": the labels of the query cell's nearest reference cells, each vote weighted by 1 / distance;
  confidence = the chosen label's share of the weighted vote.
Query cells whose confidence is below `min_confidence` are labelled "unknown".
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.neighbors import KNeighborsClassifier
from typing_extensions import Unpack

from exceiver.data.contract import ModelCells, ReadingOptions
from exceiver.data.counts import count_layers
from exceiver.data.sources import read_datasets
from exceiver.devices import inference_device
from exceiver.errors import ExceiverInputError, option
from exceiver.inference import CellModel, cell_embedding, check_model, record
from exceiver.train.probe import linear_probe

log = logging.getLogger(__name__)

METHODS = ("knn", "linear")
UNKNOWN = "unknown"
N_NEIGHBORS = 15
# Measured on pbmc3k, cellbench and kang with two models (benchmarks/label_transfer.py; README,
# "Label transfer"): logistic regression led kNN by 0.04 mean macro-F1 (by 0.11 on pbmc3k, whose
# rare types have 1-3 reference cells: kNN's neighbours outvote them), kNN led on cellbench by
# 0.01. Below 0.5 no label holds the majority: those cells (about 2%) were wrong half the time,
# against 8-11% overall, and calling them unknown left macro-F1 unchanged; higher thresholds cost it.
DEFAULT_METHOD = "linear"
MIN_CONFIDENCE = 0.5
# Embeddings of two datasets are compared only on genes both measured; below this share of the
# trained model genes that the richer of the two measures, they say too little to be compared (the
# share of a 19,000-gene vocabulary would refuse every targeted panel, however well matched).
MIN_SHARED_GENES = 0.1


def transfer(reference: np.ndarray, codes: np.ndarray, n_classes: int, query: np.ndarray, *,
             method: str = DEFAULT_METHOD, n_neighbors: int = N_NEIGHBORS) -> np.ndarray:
    """Probabilities [query cells, n_classes] of each label, from reference embeddings with labels
    `codes` (0..n_classes-1, each present) to query embeddings."""
    if method == "knn":
        knn = KNeighborsClassifier(n_neighbors=min(n_neighbors, len(codes)), weights="distance")
        return knn.fit(reference, codes).predict_proba(query)
    weight, bias = linear_probe(reference, codes, n_classes)
    logits = query.astype(np.float64) @ weight.T + bias
    proba = np.exp(logits - logits.max(1, keepdims=True))
    return proba / proba.sum(1, keepdims=True)


def annotate(model: CellModel, reference: ad.AnnData | str | Path, query: ad.AnnData | str | Path, label_key: str, *,
             method: str = DEFAULT_METHOD, n_neighbors: int = N_NEIGHBORS, min_confidence: float = MIN_CONFIDENCE,
             key_added: str = "exceiver_label", inplace: bool = True, batch_size: int | None = None,
             device: str | None = None, progress: bool = True, **reading: Unpack[ReadingOptions]) -> pd.DataFrame:
    """Transfer `reference.obs[label_key]` to the query cells through the model's cell embedding.

    Parameters
    ----------
    model
        A trained model (`exceiver.Exceiver`).
    reference, query
        Raw counts (AnnData or .h5ad paths); reference cells without a label are ignored (with a
        count in the log).
    label_key
        The reference's obs column of labels.
    method
        "linear" (the default: ahead of "knn" by 0.04 mean macro-F1 in our measurements) or
        "knn" (n_neighbors, distance-weighted; it flagged cell types missing from the reference as
        unknown more often than "linear", which is confidently wrong about them).
    min_confidence
        Query cells whose chosen label has a lower probability are labelled "unknown".
    key_added
        `query.obs[key_added]` (the label) and `{key_added}_confidence`, with the settings in
        `query.uns["exceiver"][key_added]`, unless `inplace=False`.
    batch_size, device, progress
        How inference runs.
    **reading
        How each dataset is read (`exceiver.Exceiver.read`); `gene_key` and `layer` apply to each
        dataset that has that var column / layer (the others use what the model remembers).

    Returns
    -------
    A DataFrame indexed by the query's cells: the label and its confidence in [0, 1].
    """
    if method not in METHODS:
        raise ExceiverInputError(f"unknown label-transfer method {method!r}; choose one of {METHODS}")
    if n_neighbors < 1 or not 0 <= min_confidence <= 1:
        raise ExceiverInputError(f"{option('n_neighbors')} must be >= 1 and {option('min_confidence')} in [0, 1]")
    check_model(model)
    inference_device(device)  # before any data is read
    reference, query_data = (data if isinstance(data, ad.AnnData) else read_datasets(data)[0][1]
                             for data in (reference, query))
    if query_data.n_obs == 0:
        raise ExceiverInputError("the query has no cells")
    reference, codes, classes = _labelled(reference, label_key)
    shared_cells, n_shared = _on_shared_genes(model, {"reference": reference, "query": query_data}, reading)
    ref_embedding, query_embedding = (cell_embedding(model, cells, batch_size=batch_size, device=device,
                                                     progress=progress) for cells in shared_cells)
    proba = transfer(ref_embedding, codes, len(classes), query_embedding, method=method, n_neighbors=n_neighbors)
    confidence = proba.max(1).astype(np.float32)
    labels = np.asarray(classes, dtype=object)[proba.argmax(1)]
    unknown = confidence < min_confidence
    labels[unknown] = UNKNOWN
    categories = classes if UNKNOWN in classes else [*classes, UNKNOWN]
    result = pd.DataFrame({key_added: pd.Categorical(labels, categories=categories),
                           f"{key_added}_confidence": confidence}, index=query_data.obs_names)
    log.info("%s query cells labelled from %s reference cells (%s); %s (%.1f%%) %r (confidence < %g)",
             f"{len(result):,}", f"{len(codes):,}", method, f"{int(unknown.sum()):,}", 100 * unknown.mean(),
             UNKNOWN, min_confidence)
    if inplace:
        for column in result.columns:
            query_data.obs[column] = result[column]
        record(query_data, key_added, {
            "method": method, "label_key": label_key, "n_neighbors": int(n_neighbors),
            "min_confidence": float(min_confidence), "pooling": model.module.default_pooling,
            "classes": list(classes), "n_reference_cells": int(len(codes)), "n_shared_genes": int(n_shared),
            "n_unknown": int(unknown.sum())})
    return result


def _labelled(reference: ad.AnnData, label_key: str) -> tuple[ad.AnnData, np.ndarray, list[str]]:
    """The reference's labelled cells, their integer codes and the sorted class names."""
    if reference.n_obs == 0:
        raise ExceiverInputError("the reference has no cells")
    if label_key not in reference.obs.columns:
        raise ExceiverInputError(f"label column {label_key!r} is not in the reference's obs; "
                                 f"available columns: {list(reference.obs.columns)}")
    labels = reference.obs[label_key]
    has_label = labels.notna().to_numpy()
    if not has_label.any():
        raise ExceiverInputError(f"no cell of the reference has a {label_key!r} label")
    if not has_label.all():
        log.info("%s of %s reference cells have no %r label and are ignored", f"{int((~has_label).sum()):,}",
                 f"{reference.n_obs:,}", label_key)
        reference, labels = reference[has_label], labels[has_label]
    labels = labels.astype(str)
    counts = labels.value_counts()
    if len(counts) < 2:
        raise ExceiverInputError(f"the reference's {label_key!r} has a single label ({counts.index[0]!r}): "
                                 "nothing to choose between")
    single = sorted(counts.index[counts == 1])
    if single:
        log.warning("labels with a single reference cell: %s (they can be transferred, but rest on that one cell)",
                    ", ".join(single[:10]) + (f" and {len(single) - 10} more" if len(single) > 10 else ""))
    classes = sorted(counts.index)
    return reference, pd.Categorical(labels, categories=classes).codes.astype(np.int64), classes


def _on_shared_genes(model: CellModel, datasets: dict[str, ad.AnnData],
                     reading: ReadingOptions) -> tuple[list[ModelCells], int]:
    """Each dataset read by the model and restricted to the trained model genes that all of them
    measured, and the number of those genes; refuses datasets that share too few. `gene_key`
    and `layer` apply to the datasets that have them."""
    gene_key, layer = reading.get("gene_key"), reading.get("layer")
    if gene_key not in (None, "var_names") and not any(gene_key in a.var.columns for a in datasets.values()):
        raise ExceiverInputError(f"{option('gene_key', gene_key)}: no such var column in the reference or the query; "
                                 f"their columns: {sorted({c for a in datasets.values() for c in a.var.columns})}")
    read = []
    for name, adata in datasets.items():
        own = {**reading, "name": reading.get("name", name)}
        if gene_key not in (None, "var_names") and gene_key not in adata.var.columns:
            own.pop("gene_key")
        if layer not in (None, "X") and layer not in count_layers(adata):
            own.pop("layer")
        read.append(model.read(adata, empty="keep", **own))  # cells without counts are refused once restricted
    usable = [cells.measured for cells in read]
    shared = np.logical_and.reduce(usable)
    n_ref, n_query = (int(u.sum()) for u in usable)
    n_shared, n_richer = int(shared.sum()), max(n_ref, n_query, 1)
    if n_shared < MIN_SHARED_GENES * n_richer:
        raise ExceiverInputError(
            f"the reference and the query share {n_shared:,} trained model genes ({n_shared / n_richer:.1%} of the "
            f"{n_richer:,} that the {'reference' if n_ref >= n_query else 'query'} measures; the other measures "
            f"{min(n_ref, n_query):,}), below the {MIN_SHARED_GENES:.0%} needed to compare their cells; are both indexed "
            f"by gene identifiers of the model's kind (e.g. {model.vocab.genes[0]!r})? {option('gene_key')} names a "
            "var column of them")
    restricted = []
    for cells, measured in zip(read, usable):
        if (measured & ~shared).any():
            log.info("%s: embedded on the %s trained model genes that both datasets measured (of its %s)",
                     cells.name, f"{n_shared:,}", f"{int(measured.sum()):,}")
        restricted.append(cells.keep_genes(shared))
    return restricted, n_shared
