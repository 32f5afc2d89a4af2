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

from exceiver.data.sources import read_datasets
from exceiver.data.vocab import dataset_genes
from exceiver.errors import ExceiverInputError, option
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
# model's trained genes in common they say too little to be compared.
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


def annotate(model, reference: ad.AnnData | str | Path, query: ad.AnnData | str | Path, label_key: str, *,
             method: str = DEFAULT_METHOD, n_neighbors: int = N_NEIGHBORS, min_confidence: float = MIN_CONFIDENCE,
             key_added: str = "exceiver_label", inplace: bool = True, gene_key: str | None = None,
             layer: str | None = None, batch_size: int | None = None, device: str | None = None,
             allow_non_integer: bool = False, progress: bool = True) -> pd.DataFrame:
    """Transfer `reference.obs[label_key]` to the query cells through the model's cell embedding.

    Returns a DataFrame indexed by the query's cells: `key_added` (the label, or "unknown" where
    the confidence is below `min_confidence`) and `{key_added}_confidence` (the probability of the
    chosen label, in [0, 1]); also written to `query.obs`, with the settings in
    `query.uns["exceiver_annotate"]` ("exceiver" is `key_added` without its "_label" suffix),
    unless `inplace=False`.

    method: "linear" (the default: ahead of "knn" by 0.04 mean macro-F1 in our measurements) or
        "knn" (n_neighbors, distance-weighted; it flagged cell types missing from the reference as
        unknown more often than "linear", which is confidently wrong about them).
    Reference cells without a label are ignored (with a count in the log). gene_key and layer apply
    to each dataset that has that var column / layer (the others use var_names / X, or what the
    model was trained with).
    """
    if method not in METHODS:
        raise ExceiverInputError(f"unknown label-transfer method {method!r}; choose one of {METHODS}")
    if n_neighbors < 1 or not 0 <= min_confidence <= 1:
        raise ExceiverInputError(f"{option('n_neighbors')} must be >= 1 and {option('min_confidence')} in [0, 1]")
    reference, query_data = (data if isinstance(data, ad.AnnData) else read_datasets(data)[0][1]
                             for data in (reference, query))
    if query_data.n_obs == 0:
        raise ExceiverInputError("the query has no cells")
    reference, codes, classes = _labelled(reference, label_key)
    on_shared, n_shared = _on_shared_genes(model, [("reference", reference), ("query", query_data)], gene_key, layer)
    ref_embedding, query_embedding = (
        model.embed(adata, gene_key=key, layer=data_layer, inplace=False, batch_size=batch_size, device=device,
                    allow_non_integer=allow_non_integer, progress=progress) for adata, key, data_layer in on_shared)

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
        query_data.uns[f"{key_added.removesuffix('_label')}_annotate"] = {
            "method": method, "label_key": label_key, "n_neighbors": int(n_neighbors),
            "min_confidence": float(min_confidence), "pooling": model.module.default_pooling,
            "classes": list(classes), "n_reference_cells": int(len(codes)), "n_shared_genes": int(n_shared),
            "n_unknown": int(unknown.sum())}
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


def _on_shared_genes(model, datasets: list[tuple[str, ad.AnnData]], gene_key: str | None,
                     layer: str | None) -> tuple[list[tuple[ad.AnnData, str, str]], int]:
    """Each dataset restricted to the trained model genes that all of them measured, with the gene
    key and layer to read it by ("var_names" and "X" for the defaults), and the number of those
    genes; refuses datasets that share too few. `gene_key` and `layer` apply to the datasets that
    have them."""
    if gene_key not in (None, "var_names") and not any(gene_key in a.var.columns for _, a in datasets):
        raise ExceiverInputError(f"{option('gene_key', gene_key)}: no such var column in the reference or the query; "
                                 f"their columns: {sorted({c for _, a in datasets for c in a.var.columns})}")
    trained = model.scaler.trained_genes
    keys, ids, usable, read = [], [], [], []
    for name, adata in datasets:
        given_key = gene_key if gene_key in (None, "var_names") or gene_key in adata.var.columns else None
        given_layer = layer if layer in (None, "X") or layer in adata.layers else None
        adata, given_key, given_layer = model.in_model_genes(adata, given_key, given_layer, name=name)
        read.append((name, adata))  # translated into model genes where the model's gene map applies
        key, data_layer = model.data_keys(adata.var.columns, adata.layers.keys(), given_key, given_layer)
        keys.append((key or "var_names", data_layer or "X"))
        ids.append(model.vocab.ids(dataset_genes(adata, key)))
        measured = np.zeros(len(trained), dtype=bool)
        measured[ids[-1][ids[-1] >= 0]] = True
        usable.append(measured & trained)
    shared = np.logical_and.reduce(usable)
    n_trained, n_shared = int(trained.sum()), int(shared.sum())
    if n_shared < MIN_SHARED_GENES * n_trained:
        n_ref, n_query = (int(u.sum()) for u in usable)
        raise ExceiverInputError(
            f"the reference and the query share {n_shared:,} of the model's {n_trained:,} trained genes "
            f"({n_shared / n_trained:.1%}; the reference measures {n_ref:,} of them, the query {n_query:,}), "
            f"below the {MIN_SHARED_GENES:.0%} needed to compare their cells; are both indexed by gene identifiers "
            f"of the model's kind (e.g. {model.vocab.genes[0]!r})? {option('gene_key')} names a var column of them")
    restricted = []
    for (name, adata), (key, data_layer), gene_ids, measured in zip(read, keys, ids, usable):
        if (measured & ~shared).any():
            log.info("%s: embedded on the %s trained model genes that both datasets measured (of its %s)",
                     name, f"{n_shared:,}", f"{int(measured.sum()):,}")
            keep = gene_ids >= 0
            keep[keep] = shared[gene_ids[keep]]
            adata = adata[:, keep]
        restricted.append((adata, key, data_layer))
    return restricted, n_shared
