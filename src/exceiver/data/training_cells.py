"""The cells of a pretraining run: count files read into memory (translated, aligned to one
vocabulary, checked, split, restricted to the most variable genes or a continued model's genes)
or a corpus folder streamed from disk, with the scaler fitted on the training cells.

A continued model's data contract (`exceiver.data.contract`) decides how its new datasets are
read, as every tool reads them: its gene key and layer where a dataset has them, and its gene
pairs (a user's before its own) for the datasets whose genes are their dataset side.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from exceiver.data.cells import CellCounts, align
from exceiver.data.contract import DataContract
from exceiver.data.corpus import CorpusCells, fit_scaler, is_corpus
from exceiver.data.counts import count_layers, counts_var
from exceiver.data.datamodule import validation_cells
from exceiver.data.genemap import GenePairs, map_genes
from exceiver.data.preprocess import GeneScaler, prepare_cells, report_dropped
from exceiver.data.sources import DataInput, read_datasets
from exceiver.data.variable_genes import highly_variable_genes
from exceiver.data.vocab import VAR_NAMES, GeneVocab, build_vocab, dataset_genes, gene_keys, model_vocabulary
from exceiver.errors import ExceiverInputError, option

log = logging.getLogger(__name__)


class PretrainingData(NamedTuple):
    """A pretraining run's cells (in memory or a corpus on disk), with what was fitted on them."""

    source: CellCounts | CorpusCells
    vocab: GeneVocab
    scaler: GeneScaler
    validation: np.ndarray  # bool per cell
    counts: dict  # cell counts for metrics.json
    gene_key: str | None
    layer: str | None
    batch_labels: np.ndarray | None = None  # str per cell, with a batch key


def pretraining_data(data: DataInput | Sequence[DataInput], settings, *, genes=None,
                     n_top_genes: int = 0, gene_key: str | None = None, layer: str | None = None,
                     gene_map: GenePairs | None = None, base_vocab: GeneVocab | None = None, extend_genes: bool = False,
                     batch_key: str | None = None, allow_non_integer: bool = False, standardise: bool = True,
                     progress: bool = True, contract: DataContract | None = None) -> PretrainingData:
    """Datasets read into memory, or a corpus folder streamed from disk: one split rule and one
    scaler fit for both, so the same files and seed give the same training and validation cells
    (`settings`: a `TrainingConfig`). A corpus keeps the genes it was built with (`n_top_genes`
    applies to data read into memory). With `base_vocab` (a continued model's) the vocabulary is
    the model's (`model_vocabulary`), and its `contract` reads the datasets."""
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    if any(is_corpus(item) for item in items):
        if len(items) > 1:
            raise ExceiverInputError("a corpus folder is pretrained on alone; build one corpus from all the files")
        given = [name for name, value in (("gene_map", gene_map), ("batch_key", batch_key)) if value is not None]
        if given:
            raise ExceiverInputError(f"{items[0]} is a corpus folder: {', '.join(map(option, given))} need datasets "
                                     "read into memory (.h5ad files)")
        cells = _corpus_on_disk(items[0], settings, genes, gene_key, layer, allow_non_integer, standardise, progress)
        if base_vocab is not None and cells.vocab != base_vocab:
            raise ExceiverInputError(f"{items[0]} was built with other genes than the model's: build it with the "
                                     "model's genes (exceiver build-corpus ... --genes MODEL_DIR/genes.txt)")
        return cells
    if contract is not None:
        allow_non_integer = allow_non_integer or contract.allow_non_integer
    return _cells_in_memory(data, settings, genes, n_top_genes, gene_key, layer, allow_non_integer, standardise,
                            gene_map=gene_map, base_vocab=base_vocab, extend_genes=extend_genes, batch_key=batch_key,
                            contract=contract)


def _cells_in_memory(data, settings, genes, n_top_genes: int, gene_key: str | None,
                     layer: str | None, allow_non_integer: bool, standardise: bool = True, *,
                     gene_map: GenePairs | None = None, base_vocab: GeneVocab | None = None,
                     extend_genes: bool = False, batch_key: str | None = None,
                     contract: DataContract | None = None) -> PretrainingData:
    """Datasets read into memory (`_read`), aligned to one vocabulary, checked, split, restricted
    to the training cells' most variable genes (with `n_top_genes`) or to a continued model's
    genes, and scaled."""
    datasets, keys, layers = _read(read_datasets(data), gene_key, layer, gene_map, contract)
    tables = [(name, counts_var(adata, lay, name)) for (name, adata), lay in zip(datasets, layers)]  # the counts' genes
    if batch_key is not None:
        check_batch_key(datasets, batch_key)
    vocab = build_vocab(tables, genes, keys)
    cells, labels = _aligned(datasets, keys, layers, vocab, batch_key, allow_non_integer)
    validation = validation_cells(cells.n_cells, settings.val_fraction, settings.seed)
    if n_top_genes and (base_vocab is None or extend_genes):  # cells without counts stay: the split does not move
        training = np.flatnonzero(~validation)
        chosen = highly_variable_genes(cells.subset(training), n_top_genes,
                                       None if labels is None else labels[training])
        vocab, cells = vocab.subset(chosen), cells.select_genes(chosen)
    if base_vocab is not None:
        vocab = model_vocabulary(base_vocab, vocab.genes, extend=extend_genes)
        cells, labels = _aligned(datasets, keys, layers, vocab, batch_key, allow_non_integer)
        validation = validation_cells(cells.n_cells, settings.val_fraction, settings.seed)
    scaler = GeneScaler.fit(cells.subset(np.flatnonzero(~validation)), standardise=standardise)
    expressed = cells.keep_genes(scaler.n_expressed > 0).n_genes_expressed
    for side, split in ((~validation, "training"), (validation, "validation")):
        if not (expressed[side] >= 2).any():
            raise ExceiverInputError(
                f"no {split} cell has 2 or more expressed genes (one to mask, one to see): "
                "masked-expression pretraining needs richer cells or more of them"
            )
    counts = {"n_cells": int(cells.n_cells), "n_train_cells": int((~validation & (expressed > 0)).sum()),
              "n_val_cells": int((validation & (expressed > 0)).sum()),
              "datasets": {name: int(n) for name, n in zip(cells.source_names, np.bincount(cells.source))}}
    log.info("pretraining on %s cells (%s training, %s validation) from %d dataset(s), %s genes",
             f"{cells.n_cells:,}", f"{counts['n_train_cells']:,}", f"{counts['n_val_cells']:,}", len(datasets),
             f"{len(vocab):,}")
    remembered = (gene_key, layer) if contract is None else (gene_key or contract.gene_key, layer or contract.layer)
    return PretrainingData(cells, vocab, scaler, validation, counts, *remembered, labels)


def _read(datasets: list, gene_key: str | None, layer: str | None, pairs: GenePairs | None,
          contract: DataContract | None) -> tuple[list, list, list]:
    """The datasets, each with the gene key and layer to read it by, translated through `pairs`
    where its genes are their dataset side (then its counts are in X and its genes var_names).
    Keys: the call's, else a continued model's (`contract`) where a dataset has them."""
    layers = [layer if contract is None else contract.layer_of(count_layers(adata), layer) for _, adata in datasets]
    tables = [(name, counts_var(adata, lay, name)) for (name, adata), lay in zip(datasets, layers)]
    keys = gene_keys(tables, gene_key)  # the call's key for the datasets that have it
    if contract is not None and gene_key != VAR_NAMES:  # the others: the model's where they have it
        keys = [key or contract.gene_key_of(table.var.columns) for key, (_, table) in zip(keys, tables)]
    if pairs is None:
        return datasets, keys, layers
    read = []
    for i, (name, adata) in enumerate(datasets):
        if pairs.is_dataset_side(dataset_genes(counts_var(adata, layers[i], name), keys[i])):  # the contract's rule
            log.info("%s: translating its genes through the gene map", name)
            adata = map_genes(adata, pairs, gene_key=keys[i], layer=layers[i], name=name)
            keys[i] = layers[i] = None
        read.append((name, adata))
    return read, keys, layers


def _aligned(datasets, keys, layers, vocab: GeneVocab, batch_key: str | None,
             allow_non_integer: bool) -> tuple[CellCounts, np.ndarray | None]:
    """The datasets' cells with counts in `vocab` (cells without any are dropped, and reported),
    and each kept cell's batch."""
    parts, labels = [], []
    for (name, adata), key, layer in zip(datasets, keys, layers):
        aligned = align(adata, vocab, gene_key=key, layer=layer, name=name, allow_non_integer=allow_non_integer)
        parts.append(prepare_cells(aligned, name))
        report_dropped(name, aligned.n_cells, parts[-1].n_cells)
        if batch_key is not None:  # prepare_cells drops exactly the cells without counts
            labels.append(adata.obs[batch_key].astype(str).to_numpy()[aligned.n_genes_expressed > 0])
    return CellCounts.concat(parts), (np.concatenate(labels) if batch_key is not None else None)


def check_batch_key(datasets, batch_key: str) -> None:
    """Every cell needs a batch: the column must exist in every dataset and have no missing values."""
    for name, adata in datasets:
        if batch_key not in adata.obs.columns:
            raise ExceiverInputError(f"{name}: batch column {batch_key!r} is not in obs; available columns: "
                                     f"{', '.join(map(str, adata.obs.columns)) or 'none'}")
        missing = int(adata.obs[batch_key].isna().sum())
        if missing:
            raise ExceiverInputError(f"{name}: {missing:,} of {adata.n_obs:,} cells have no {batch_key!r} batch; "
                                     "give them one (e.g. 'unknown') or remove them")


def _corpus_on_disk(folder, settings, genes, gene_key: str | None, layer: str | None,
                    allow_non_integer: bool, standardise: bool, progress: bool) -> PretrainingData:
    """The same from a corpus folder (`build_corpus`), streamed from disk: memory does not grow
    with the number of cells."""
    given = [option(name) for name, value in (("genes", genes), ("gene_key", gene_key), ("layer", layer),
                                              ("allow_non_integer", allow_non_integer)) if value]
    if given:
        raise ExceiverInputError(f"{folder} is a corpus folder: its genes and counts were fixed when it was "
                                 f"built; pass {', '.join(given)} to build-corpus instead")
    corpus = CorpusCells(folder)
    validation = validation_cells(corpus.n_cells, settings.val_fraction, settings.seed)
    scaler = fit_scaler(corpus, validation, standardise=standardise, progress=progress)
    n_val = int(validation.sum())
    counts = {"n_cells": corpus.n_cells, "n_train_cells": corpus.n_cells - n_val, "n_val_cells": n_val,
              "datasets": {d["name"]: d["n_cells"] for d in corpus.meta["datasets"]}}
    log.info("pretraining on corpus %s: %s cells (%s training, %s validation), %s genes", folder,
             f"{corpus.n_cells:,}", f"{corpus.n_cells - n_val:,}", f"{n_val:,}", f"{len(corpus.vocab):,}")
    return PretrainingData(corpus, corpus.vocab, scaler, validation, counts, corpus.meta.get("gene_key"),
                           corpus.meta.get("layer"))
