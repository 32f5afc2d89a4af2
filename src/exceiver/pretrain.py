"""`pretrain`: count files (or an on-disk corpus) -> vocabulary -> checked counts -> split ->
scaler fitted on the training cells -> pretraining -> a model folder."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from typing_extensions import Unpack

from exceiver.data.cells import CellCounts, align
from exceiver.data.counts import counts_var
from exceiver.data.corpus import CorpusCells, fit_scaler, is_corpus
from exceiver.data.datamodule import CellDataModule, validation_cells
from exceiver.data.preprocess import GeneScaler, prepare_cells, report_dropped
from exceiver.data.sources import DataInput, read_datasets
from exceiver.data.genemap import read_gene_map, translate_datasets
from exceiver.data.vocab import GeneVocab, build_vocab, gene_keys
from exceiver.errors import ExceiverInputError, option
from exceiver.model import Exceiver
from exceiver.data.variable_genes import highly_variable_genes
from exceiver.data.tokenizer_config import TokenizerConfig
from exceiver.nn.config import PRESETS, ExceiverConfig, ObjectiveConfig, pretraining_configs
from exceiver.nn.network import ExceiverModule
from exceiver.train.config import TrainingConfig
from exceiver.train.plans import PretrainingPlan
from exceiver.train.run import RunOptions, TrainingRun, training_run
from exceiver.warm_start import check_base, continued_network, merged_scaler, model_vocabulary

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
    gene_map: str | Path | None = None,
    init: Exceiver | str | Path | None = None,
    extend_genes: bool = False,
    own_genes: bool = False,
    batch_key: str | None = None,
    allow_non_integer: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **options: Unpack[RunOptions],
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
    gene_map: a two-column table (model gene, dataset gene; e.g. human,mouse orthologs): datasets
        whose genes are its dataset genes are translated, the others are read as they are.
    init: continue training a pretrained model (folder or Exceiver) on this data: its vocabulary
        (the data's other genes are reported; `extend_genes` adds them, at most `n_top_genes` of
        them, with fresh embeddings), normalisation, architecture and objectives; per-gene
        statistics are re-estimated where the data expresses a gene.
    own_genes: with `init`, the vocabulary is the data's own (chosen as a fresh model's is,
        `n_top_genes`; the data read as it is, not through a gene map): genes the model knows, by
        name or through its gene map, start from its weights, the others fresh.
    batch_key: obs column of batches (assay, donor, ...): a learned batch embedding conditions the
        count decoder, so the cell embedding need not carry the batch (`embed` needs no batch).
        With `init`, the model's batches keep their embeddings and new ones are added.
    overwrite: replace `out` if exceiver wrote it (never a folder holding other files), and
        discard an interrupted run of it.
    resume: continue the interrupted run of `out` (same data and settings) from its checkpoint;
        it finishes as the uninterrupted run would.
    checkpoint_minutes, keep_checkpoints: save a resumable checkpoint this often while training
        (SIGTERM and Ctrl+C save one too); keep the last in `out/checkpoints/` when done.
    options: resume, checkpoint_minutes, keep_checkpoints and the fields of `TrainingConfig`
        (max_epochs, max_minutes, batch_size, seed, ...): `RunOptions`; the preset's own defaults
        (docs/presets.md) apply to the training fields not given.
    """
    start = _starting_point(init, preset, model, own_genes=own_genes, extend_genes=extend_genes)
    base, routing = start.base, _gene_map_routing(data, gene_map, start.base, own_genes)
    if batch_key is not None and not start.architecture.count_head:
        raise ExceiverInputError(f"{option('batch_key')} conditions the count decoder, which this model has not "
                                 "(the count objective: count_weight > 0)")
    n_top_genes = PRESETS[preset].n_top_genes if n_top_genes is None else n_top_genes
    with training_run(out, options, defaults=PRESETS[preset].training, overwrite=overwrite,
                      progress=progress) as run:  # refused now, not after the work
        cells = pretraining_data(
            data, run.settings, genes=genes, n_top_genes=n_top_genes, gene_key=gene_key, layer=layer,
            gene_map=routing.reading, base_vocab=None if base is None or own_genes else base.vocab,
            extend_genes=extend_genes, batch_key=batch_key, allow_non_integer=allow_non_integer,
            standardise=base.scaler.standardise if base else start.tokenizer.values == "zscore", progress=progress)
        model = _pretrain_on(cells, start, routing, run, preset=preset, batch_key=batch_key)
    _report_context(model.metrics)
    return model


class Start(NamedTuple):
    """Where a pretraining run starts: a preset's settings (a fresh model), or a pretrained model
    (`base`) whose settings and weights it continues, on its vocabulary or (`own_genes`) the data's."""

    architecture: ExceiverConfig
    tokenizer: TokenizerConfig
    objectives: ObjectiveConfig
    base: Exceiver | None = None
    own_genes: bool = False
    init: str | None = None  # the base as metrics.json names it: its folder, or "in memory"


def _starting_point(init: Exceiver | str | Path | None, preset: str, model: dict | None, *, own_genes: bool,
                    extend_genes: bool) -> Start:
    """The preset's settings with the `model` overrides, or the `init` model's settings (it takes none)."""
    base = None if init is None else (init if isinstance(init, Exceiver) else Exceiver.load(init))
    if base is not None:
        check_base(base, model)
        architecture, tokenizer, objectives = base.config, base.tokenizer, base.objectives
    else:
        try:
            architecture, tokenizer, objectives = pretraining_configs(preset, **(model or {}))
        except (TypeError, ValueError) as err:  # unknown preset or field, impossible combination
            raise ExceiverInputError(f"invalid model settings: {err}") from err
    if own_genes and (base is None or extend_genes):
        raise ExceiverInputError(f"{option('own_genes', True)} needs {option('init')} and excludes "
                                 f"{option('extend_genes', True)}")
    named = None if base is None else ("in memory" if isinstance(init, Exceiver) else str(init))
    return Start(architecture, tokenizer, objectives, base, own_genes, named)


class GeneMapRouting(NamedTuple):
    """Where a pretraining run's gene map goes."""

    reading: pd.DataFrame | str | Path | None  # the datasets are read through it (`pretraining_data`)
    carried: pd.DataFrame | str | Path | None  # its pairs in the vocabulary stay with the model (`vocabulary_pairs`)
    own_pairs: pd.DataFrame | None = None  # with own genes: the pairs that find the data genes' rows in the base


def _gene_map_routing(data: DataInput | Sequence[DataInput], gene_map: str | Path | None, base: Exceiver | None,
                      own_genes: bool) -> GeneMapRouting:
    """The given gene map, else a continued model's: datasets in memory are read through it and the
    model keeps it; with own genes it only finds the rows of the data's genes in the base."""
    if own_genes:
        # The data's genes are the vocabulary, read as they are; a gene map finds their rows.
        own_pairs = read_gene_map(gene_map) if isinstance(gene_map, (str, Path)) else (
            gene_map if gene_map is not None else base.gene_map)
        return GeneMapRouting(None, None, own_pairs)
    carried = gene_map if gene_map is not None else (base.gene_map if base is not None else None)
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    if gene_map is None and not any(is_corpus(item) for item in items):
        gene_map = carried  # a human+mouse model continued on mouse data translates it as it did
    return GeneMapRouting(gene_map, carried)


def _pretrain_on(cells: PretrainingData, start: Start, routing: GeneMapRouting, run: TrainingRun, *, preset: str,
                 batch_key: str | None) -> Exceiver:
    """Pretraining on the run's cells from its starting point; the model it makes."""
    base = start.base
    scaler = cells.scaler if base is None or start.own_genes else merged_scaler(cells.scaler, base.scaler)
    batches = batch_categories(cells.batch_labels, base.batches if base else None, batch_key)
    run.seed()
    n_batches = len(batches["categories"]) if batches else (base.config.n_batches if base else 0)
    about_init = {}  # metrics.json's "init": what a continued run started from
    if base is None:
        module = ExceiverModule(dataclasses.replace(start.architecture, n_genes=len(cells.vocab), n_batches=n_batches))
        module.init_value_offsets(torch.from_numpy(scaler.expressed_mean), scaler.mean_expressed_value)
    else:
        module, n_added = continued_network(base, cells.vocab, scaler, n_batches, own_genes=start.own_genes,
                                            gene_map=routing.own_pairs)
        about_init = {"init": {"model": start.init, "n_genes": len(base.vocab), "n_genes_added": n_added,
                               **({"own_genes": True} if start.own_genes else {})}}
    codes = None if batches is None else pd.Categorical(cells.batch_labels, batches["categories"]).codes
    plan = PretrainingPlan(module, start.objectives, torch.from_numpy(scaler.expressed_mean), run.settings,
                           zero_queries=start.tokenizer.zero_query_ratio > 0,
                           batch_codes=None if codes is None else codes.astype(np.int64))
    datamodule = CellDataModule(cells.source, scaler, start.tokenizer, cells.validation,
                                batch_size=run.settings.batch_size, num_workers=run.settings.num_workers,
                                seed=run.settings.seed, genes=scaler.n_expressed > 0)
    identity = {"command": "pretrain", "preset": preset, "architecture": start.architecture.to_dict(),
                "tokenizer": start.tokenizer.to_dict(), "objectives": start.objectives.to_dict(),
                "training": run.settings.to_dict(), "n_cells": cells.counts["n_cells"],
                "genes": cells.vocab.fingerprint(), "init": base.fingerprint() if base else None,
                "batches": batches}

    def pretrained(metrics: dict) -> Exceiver:
        metrics = {**metrics, **cells.counts, "n_genes": len(cells.vocab), "n_parameters": module.n_parameters(),
                   **learned_context(metrics), **about_init}
        return Exceiver(module, cells.vocab, scaler, start.tokenizer, objectives=start.objectives,
                        training=run.settings.to_dict(), metrics=metrics, gene_key=cells.gene_key, layer=cells.layer,
                        batches=batches or (base.batches if base else None),
                        gene_map=vocabulary_pairs(routing.carried, cells.vocab))

    return run.fit(plan, datamodule, identity=identity, model=pretrained)


def _report_context(metrics: dict) -> None:
    """Log the validation error against the gene-mean baseline, and warn when no context was learned."""
    log.info("val masked MSE %.4f vs gene-mean baseline %.4f (ratio %.3f)", metrics["val_masked_mse"],
             metrics["val_gene_mean_mse"], metrics["val_mse_ratio"])
    if not metrics["learned_context"]:
        log.warning("THE MODEL LEARNED NO CONTEXT: its validation error is %.2fx that of predicting each gene's "
                    "mean (%s steps in %.0f s). Train longer (%s, %s) or on more cells before using it.",
                    metrics["val_mse_ratio"], f"{metrics['steps']:,}", metrics["seconds"], option("max_minutes"),
                    option("max_epochs"))


def vocabulary_pairs(gene_map, vocab: GeneVocab) -> pd.DataFrame | None:
    """The pairs of a gene map whose model gene is in the vocabulary: what the model carries, so that
    data of the map's other side (e.g. mouse) is translated without the map file."""
    if gene_map is None:
        return None
    pairs = gene_map if isinstance(gene_map, pd.DataFrame) else read_gene_map(gene_map)
    pairs = pairs.iloc[:, :2].set_axis(["model_gene", "data_gene"], axis=1).astype(str)
    return pairs[pairs.model_gene.isin(set(vocab.genes))].reset_index(drop=True)


def batch_categories(labels: np.ndarray | None, known: dict | None, batch_key: str | None) -> dict | None:
    """{"key", "categories"}: the batches a model knows; a continued model's first, in their
    order (their embeddings keep their rows), then the new ones."""
    if labels is None:
        if known:
            log.info("the model was trained with batches (%s); this run gives none: its batch embeddings are left "
                     "as they are", known["key"])
        return None
    categories = list(known["categories"]) if known else []
    new = sorted(set(labels) - set(categories))
    if known and new:
        log.info("%d new batches of %s (e.g. %s) get fresh embeddings", len(new), batch_key, ", ".join(new[:3]))
    return {"key": batch_key, "categories": categories + new}


def learned_context(best_metrics: dict) -> dict:
    """Whether the model predicts masked values better than each gene's mean value (what a model
    that learned nothing from a cell's other genes does): `learned_context` in metrics.json."""
    ratio = best_metrics.get("val_mse_ratio", float("nan"))
    return {"learned_context": bool(ratio < 1.0)}


def pretraining_data(data: DataInput | Sequence[DataInput], settings: TrainingConfig, *, genes=None,
                     n_top_genes: int = 0, gene_key: str | None = None, layer: str | None = None,
                     gene_map=None, base_vocab: GeneVocab | None = None, extend_genes: bool = False,
                     batch_key: str | None = None, allow_non_integer: bool = False, standardise: bool = True,
                     progress: bool = True) -> PretrainingData:
    """Datasets read into memory, or a corpus folder streamed from disk: one split rule and one
    scaler fit for both, so the same files and seed give the same training and validation cells.
    A corpus keeps the genes it was built with (`n_top_genes` applies to data read into memory).
    With `base_vocab` (a continued model's) the vocabulary is the model's (`model_vocabulary`)."""
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
    return _cells_in_memory(data, settings, genes, n_top_genes, gene_key, layer, allow_non_integer, standardise,
                            gene_map=gene_map, base_vocab=base_vocab, extend_genes=extend_genes, batch_key=batch_key)


def _cells_in_memory(data, settings: TrainingConfig, genes, n_top_genes: int, gene_key: str | None,
                     layer: str | None, allow_non_integer: bool, standardise: bool = True, *, gene_map=None,
                     base_vocab: GeneVocab | None = None, extend_genes: bool = False,
                     batch_key: str | None = None) -> PretrainingData:
    """Datasets read into memory (translated through `gene_map` where their genes are its dataset
    genes), aligned to one vocabulary, checked, split, restricted to the training cells' most
    variable genes (with `n_top_genes`) or to a continued model's genes, and scaled."""
    datasets = read_datasets(data)
    layers = [layer] * len(datasets)
    if gene_map is not None:
        translated = translate_datasets(datasets, gene_map, gene_key, layer)
        datasets = [(name, adata) for name, adata, _ in translated]
        layers = [None if done else layer for _, _, done in translated]
    tables = [(name, counts_var(adata, lay, name)) for (name, adata), lay in zip(datasets, layers)]  # the counts' genes
    keys = gene_keys(tables, gene_key)
    if batch_key is not None:
        check_batch_key(datasets, batch_key)
    vocab = build_vocab(tables, genes, keys)
    cells, labels = _aligned(datasets, keys, layers, vocab, batch_key, allow_non_integer)
    validation = validation_cells(cells.n_cells, settings.val_fraction, settings.seed)
    if n_top_genes and (base_vocab is None or extend_genes):  # cells without counts stay: the split does not move
        chosen = highly_variable_genes(cells.subset(np.flatnonzero(~validation)), n_top_genes)
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
    return PretrainingData(cells, vocab, scaler, validation, counts, gene_key, layer, labels)


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
