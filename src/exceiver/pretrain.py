"""`pretrain`: count files (or an on-disk corpus) -> vocabulary -> checked counts -> split ->
scaler fitted on the training cells -> pretraining -> a model folder."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
from typing_extensions import Unpack

from exceiver.data.cells import CellCounts, align
from exceiver.data.counts import counts_var
from exceiver.data.corpus import CorpusCells, fit_scaler, is_corpus
from exceiver.data.datamodule import CellDataModule, validation_cells
from exceiver.data.preprocess import GeneScaler, prepare_cells, report_dropped
from exceiver.data.sources import DataInput, read_datasets
from exceiver.data.vocab import GeneVocab, build_vocab, gene_keys
from exceiver.errors import ExceiverInputError, option
from exceiver.io import check_output_dir
from exceiver.model import Exceiver
from exceiver.data.variable_genes import highly_variable_genes
from exceiver.nn.config import PRESETS, pretraining_configs
from exceiver.nn.network import ExceiverModule
from exceiver.train.config import TrainingConfig, TrainingOptions, training_config
from exceiver.train.fit import FitResult, fit
from exceiver.train.plans import PretrainingPlan

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


def pretrain(
    data: DataInput | Sequence[DataInput],
    out: str | Path | None = None,
    *,
    preset: str = "default",
    model: dict | None = None,
    genes: str | Path | Sequence[str] | GeneVocab | None = None,
    n_top_genes: int | None = None,
    gene_key: str | None = None,
    layer: str | None = None,
    allow_non_integer: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **training: Unpack[TrainingOptions],
) -> Exceiver:
    """Pretrain an Exceiver by masked-expression prediction on raw counts.

    data: one or several AnnData objects or .h5ad paths (their gene sets may differ), or a corpus
        folder (`exceiver.data.corpus.build_corpus`), streamed from disk.
    out: model folder to write (training logs go there too); None keeps the model in memory only.
    preset, model: the preset ("default" or "paper") and overrides of its fields (architecture,
        tokenizer and objective settings, e.g. {"n_latents": 64, "contrastive_weight": 0}).
    genes: restrict the vocabulary to this gene list (file, one gene per line) or use a vocabulary.
    n_top_genes: keep the most variable genes of the training cells (seurat_v3 on raw counts, per
        dataset); None: the preset's choice (default 2,000; paper: all genes); 0: all genes.
    gene_key: var column of gene identifiers, for the datasets that have it (others: var_names).
    layer: where the raw counts are: X (None), a layer, or "raw" for adata.raw (with raw.var's genes).
    allow_non_integer: accept counts that are mostly not integers (refused otherwise: log-normalised
        data is not counts).
    training: fields of `TrainingConfig` (max_epochs, max_minutes, batch_size, seed, ...); the
        preset's own defaults (docs/presets.md) apply to the fields not given.
    """
    try:
        architecture, tokenizer, objectives = pretraining_configs(preset, **(model or {}))
    except (TypeError, ValueError) as err:  # unknown preset or field, impossible combination
        raise ExceiverInputError(f"invalid model settings: {err}") from err
    settings = training_config({**PRESETS[preset].training, **training})
    if n_top_genes is None:
        n_top_genes = PRESETS[preset].n_top_genes
    if out is not None:
        check_output_dir(out, overwrite=overwrite)  # fail before the work, not after
    cells = pretraining_data(data, settings, genes=genes, n_top_genes=n_top_genes, gene_key=gene_key, layer=layer,
                             allow_non_integer=allow_non_integer, standardise=tokenizer.values == "zscore",
                             progress=progress)

    L.seed_everything(settings.seed, workers=True, verbose=False)
    module = ExceiverModule(dataclasses.replace(architecture, n_genes=len(cells.vocab)))
    gene_means = torch.from_numpy(cells.scaler.expressed_mean)
    module.init_value_offsets(gene_means, cells.scaler.mean_expressed_value)
    plan = PretrainingPlan(module, objectives, gene_means, settings, zero_queries=tokenizer.zero_query_ratio > 0)
    datamodule = CellDataModule(cells.source, cells.scaler, tokenizer, cells.validation,
                                batch_size=settings.batch_size, num_workers=settings.num_workers, seed=settings.seed,
                                genes=cells.scaler.n_expressed > 0)

    def trained(result: FitResult) -> Exceiver:
        metrics = {**result.summary(), **cells.counts, "n_genes": len(cells.vocab),
                   "n_parameters": module.n_parameters()}
        return Exceiver(module, cells.vocab, cells.scaler, tokenizer, objectives=objectives,
                        training=settings.to_dict(), metrics=metrics, gene_key=cells.gene_key, layer=cells.layer)

    model = fit(plan, datamodule, settings, out, build=trained, overwrite=overwrite, progress=progress)
    log.info("val masked MSE %.4f vs gene-mean baseline %.4f (ratio %.3f)", model.metrics["val_masked_mse"],
             model.metrics["val_gene_mean_mse"], model.metrics["val_mse_ratio"])
    return model


def pretraining_data(data: DataInput | Sequence[DataInput], settings: TrainingConfig, *, genes=None,
                     n_top_genes: int = 0, gene_key: str | None = None, layer: str | None = None,
                     allow_non_integer: bool = False, standardise: bool = True,
                     progress: bool = True) -> PretrainingData:
    """Datasets read into memory, or a corpus folder streamed from disk: one split rule and one
    scaler fit for both, so the same files and seed give the same training and validation cells.
    A corpus keeps the genes it was built with (`n_top_genes` applies to data read into memory)."""
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    if any(is_corpus(item) for item in items):
        if len(items) > 1:
            raise ExceiverInputError("a corpus folder is pretrained on alone; build one corpus from all the files")
        return _corpus_on_disk(items[0], settings, genes, gene_key, layer, allow_non_integer, standardise, progress)
    return _cells_in_memory(data, settings, genes, n_top_genes, gene_key, layer, allow_non_integer, standardise)


def _cells_in_memory(data, settings: TrainingConfig, genes, n_top_genes: int, gene_key: str | None,
                     layer: str | None, allow_non_integer: bool, standardise: bool = True) -> PretrainingData:
    """Datasets read into memory, aligned to one vocabulary, checked, split, restricted to the
    training cells' most variable genes (with `n_top_genes`) and scaled."""
    datasets = read_datasets(data)
    tables = [(name, counts_var(adata, layer, name)) for name, adata in datasets]  # the counts' genes
    keys = gene_keys(tables, gene_key)
    vocab = build_vocab(tables, genes, keys)
    parts = []
    for (name, adata), key in zip(datasets, keys):
        aligned = align(adata, vocab, gene_key=key, layer=layer, name=name, allow_non_integer=allow_non_integer)
        parts.append(prepare_cells(aligned, name))
        report_dropped(name, aligned.n_cells, parts[-1].n_cells)
    cells = CellCounts.concat(parts)
    validation = validation_cells(cells.n_cells, settings.val_fraction, settings.seed)
    if n_top_genes:  # cells left without counts stay, unbatched: the split does not move
        chosen = highly_variable_genes(cells.subset(np.flatnonzero(~validation)), n_top_genes)
        vocab, cells = vocab.subset(chosen), cells.select_genes(chosen)
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
             f"{cells.n_cells:,}", f"{counts['n_train_cells']:,}", f"{counts['n_val_cells']:,}", len(parts),
             f"{len(vocab):,}")
    return PretrainingData(cells, vocab, scaler, validation, counts, gene_key, layer)


def _corpus_on_disk(folder, settings: TrainingConfig, genes, gene_key: str | None, layer: str | None,
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
