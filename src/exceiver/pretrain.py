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

from exceiver.data.corpus import is_corpus
from exceiver.data.datamodule import CellDataModule
from exceiver.data.genemap import GeneMapInput, GenePairs
from exceiver.data.sources import DataInput
from exceiver.data.tokenizer_config import TokenizerConfig
from exceiver.data.training_cells import PretrainingData, pretraining_data
from exceiver.data.vocab import GeneVocab
from exceiver.errors import ExceiverInputError, option
from exceiver.model import Exceiver
from exceiver.nn.config import PRESETS, ExceiverConfig, ObjectiveConfig, pretraining_configs
from exceiver.nn.network import ExceiverModule
from exceiver.train.monitor import EmbeddingMonitor, MonitorCells, monitored_cells
from exceiver.train.plans import PretrainingPlan
from exceiver.train.run import RunOptions, TrainingRun, training_run
from exceiver.warm_start import (check_base, continued_network, continued_settings, freeze_all_but_new_batch_rows,
                                 merged_scaler)

log = logging.getLogger(__name__)


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
    freeze_except_batches: bool = False,
    allow_non_integer: bool = False,
    monitor: str = "loss",
    monitor_data: DataInput | None = None,
    monitor_label_key: str = "cell_type",
    monitor_cells: int = 2000,
    overwrite: bool = False,
    progress: bool = True,
    **options: Unpack[RunOptions],
) -> Exceiver:
    """Pretrain an Exceiver by masked-expression prediction on raw counts.

    Parameters
    ----------
    data
        One or several AnnData objects or .h5ad paths (their gene sets may differ), or a corpus
        folder (`exceiver.data.corpus.build_corpus`), streamed from disk.
    out
        Model folder to write (training logs go there too); None keeps the model in memory only.
    preset, model
        The preset ("default" or "paper") and overrides of its fields (architecture,
        tokenizer and objective settings, e.g. {"n_latents": 64, "contrastive_weight": 0}). With
        `init`, only the integration settings may be overridden (`bottleneck_variance`,
        `bottleneck_kl`, `kl_warmup_steps`, `batch_injection`; heads they add start fresh), e.g.
        {"bottleneck_variance": "learned", "bottleneck_kl": 1.0} to integrate batches with scVI's
        objective from a pretrained model.
    genes
        Restrict the vocabulary to this gene list (file, one gene per line) or use a vocabulary.
    n_top_genes
        Keep the most variable genes of the training cells (seurat_v3 on raw counts, per
        dataset); None: the preset's choice (default 2,000; paper: all genes); 0: all genes.
    gene_key
        The var column of gene identifiers, for the datasets that have it (others: var_names).
    layer
        Where the raw counts are: X (None), a layer, or "raw" for adata.raw (with raw.var's genes).
    allow_non_integer
        Accept counts that are mostly not integers (refused otherwise: log-normalised
        data is not counts).
    gene_map
        A two-column table (model gene, dataset gene; e.g. human,mouse orthologs): datasets
        whose genes are its dataset genes are translated, the others are read as they are.
    init
        Continue training a pretrained model (folder or Exceiver) on this data: its vocabulary
        (the data's other genes are reported; `extend_genes` adds them, at most `n_top_genes` of
        them, with fresh embeddings), normalisation, architecture and objectives (but for the
        integration settings in `model`); per-gene statistics are re-estimated where the data
        expresses a gene.
    own_genes
        With `init`, the vocabulary is the data's own (chosen as a fresh model's is,
        `n_top_genes`; the data read as it is, not through a gene map): genes the model knows, by
        name or through its gene map, start from its weights, the others fresh.
    batch_key
        The obs column of batches (assay, donor, ...): a learned batch embedding conditions the
        count decoder, so the cell embedding need not carry the batch (`embed` needs no batch).
        With `init`, the model's batches keep their embeddings and new ones are added.
    freeze_except_batches
        With `init` and `batch_key`: scArches' query step. Every weight stays the model's but the
        batch tables' rows of the data's new batches, which alone learn (the model's own batches
        keep theirs). The batch enters only the count decoder, so every cell's embedding, the
        query's too, is exactly the model's; what the new rows change is decoding in the new
        batches (`tl.impute`, `tl.perturb`).
    monitor
        What early stopping (`patience`) and the kept weights follow: "loss" (the validation count
        loss, or masked-value MSE without the count objective) or "embedding" (the monitor's score,
        higher is better; needs `monitor_data`).
    monitor_data
        A labelled AnnData or .h5ad path of raw counts: at every validation round (`val_every_steps`)
        and at the end, it is embedded by the network being trained (read as `Exceiver.embed` reads
        it) and its cell types scored by kNN macro-F1 (k=15, 5-fold stratified), logged as
        `monitor_knn_macro_f1` (metrics.json: the kept weights' score). None: no monitor.
    monitor_label_key, monitor_cells
        The obs column of cell types (two classes or more, of two cells or more each), and the
        most labelled cells monitored (a sample drawn with the run's seed).
    overwrite
        Replace `out` if exceiver wrote it (never a folder holding other files), and
        discard an interrupted run of it.
    resume
        Continue the interrupted run of `out` (same data and settings) from its checkpoint;
        it finishes as the uninterrupted run would.
    checkpoint_minutes, keep_checkpoints
        Save a resumable checkpoint this often while training
        (SIGTERM and Ctrl+C save one too); keep the last in `out/checkpoints/` when done.
    **options
        resume, checkpoint_minutes, keep_checkpoints and the fields of `TrainingConfig`
        (max_epochs, max_minutes, batch_size, seed, ...): `RunOptions`; the preset's own defaults
        (docs/presets.md) apply to the training fields not given.

    Returns
    -------
    The trained model (also written to `out` unless it is None).
    """
    start = _starting_point(init, preset, model, own_genes=own_genes, extend_genes=extend_genes)
    base, routing = start.base, _gene_map_routing(data, gene_map, start.base, own_genes)
    _check_batch_settings(start, batch_key, freeze=freeze_except_batches, extend_genes=extend_genes)
    n_top_genes = PRESETS[preset].n_top_genes if n_top_genes is None else n_top_genes
    with training_run(out, options, defaults=PRESETS[preset].training, overwrite=overwrite,
                      progress=progress) as run:  # refused now, not after the work
        watched = monitored_cells(monitor_data, monitor_label_key, criterion=monitor, max_cells=monitor_cells,
                                seed=run.settings.seed)
        cells = pretraining_data(
            data, run.settings, genes=genes, n_top_genes=n_top_genes, gene_key=gene_key, layer=layer,
            gene_map=routing.reading, base_vocab=None if base is None or own_genes else base.vocab,
            extend_genes=extend_genes, batch_key=batch_key, allow_non_integer=allow_non_integer,
            standardise=base.scaler.standardise if base else start.tokenizer.values == "zscore", progress=progress,
            contract=None if base is None or own_genes else base.contract)
        model = _pretrain_on(cells, start, routing, run, preset=preset, batch_key=batch_key, watched=watched,
                             freeze=freeze_except_batches)
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
    overrides: dict | None = None  # the integration settings a continued run changed


def _starting_point(init: Exceiver | str | Path | None, preset: str, model: dict | None, *, own_genes: bool,
                    extend_genes: bool) -> Start:
    """The preset's settings with the `model` overrides, or the `init` model's settings (with its
    integration settings, `nn.config.INIT_SETTINGS`, overridden)."""
    base = None if init is None else (init if isinstance(init, Exceiver) else Exceiver.load(init))
    if base is not None:
        check_base(base, model)
        (architecture, objectives), tokenizer = continued_settings(base, model), base.tokenizer
    else:
        try:
            architecture, tokenizer, objectives = pretraining_configs(preset, **(model or {}))
        except (TypeError, ValueError) as err:  # unknown preset or field, impossible combination
            raise ExceiverInputError(f"invalid model settings: {err}") from err
    if own_genes and (base is None or extend_genes):
        raise ExceiverInputError(f"{option('own_genes', True)} needs {option('init')} and excludes "
                                 f"{option('extend_genes', True)}")
    named = None if base is None else ("in memory" if isinstance(init, Exceiver) else str(init))
    return Start(architecture, tokenizer, objectives, base, own_genes, named, dict(model) if base and model else None)


def _check_batch_settings(start: Start, batch_key: str | None, *, freeze: bool, extend_genes: bool) -> None:
    """Batch options that this model and run can honour, refused before any work otherwise."""
    if batch_key is not None and not start.architecture.count_head:
        raise ExceiverInputError(f"{option('batch_key')} conditions the count decoder, which this model has not "
                                 "(the count objective: count_weight > 0)")
    changed = start.base is not None and start.architecture.batch_injection != start.base.config.batch_injection
    if changed and batch_key is None:
        raise ExceiverInputError(f"a new batch_injection conditions the count decoder on the data's batches: give "
                                 f"{option('batch_key')}")
    if start.architecture.batch_injection != "input" and batch_key is None and not start.architecture.n_batches:
        raise ExceiverInputError(f"batch_injection {start.architecture.batch_injection!r} conditions the count "
                                 f"decoder on batches: give {option('batch_key')}")
    if freeze and start.base is not None and (start.architecture != start.base.config
                                              or start.objectives != start.base.objectives):
        raise ExceiverInputError(f"{option('freeze_except_batches', True)} keeps the model as it is: drop the "
                                 "model settings (they would change what the frozen network computes)")
    if freeze and (start.base is None or batch_key is None):
        raise ExceiverInputError(f"{option('freeze_except_batches', True)} is scArches' query step on a pretrained "
                                 f"model: it needs {option('init')} and {option('batch_key')}")
    if freeze and (start.own_genes or extend_genes):
        raise ExceiverInputError(f"{option('freeze_except_batches', True)} keeps the model's genes: it excludes "
                                 f"{option('own_genes', True)} and {option('extend_genes', True)} (new genes "
                                 "would stay untrained)")


class GeneMapRouting(NamedTuple):
    """Where a pretraining run's gene pairs go."""

    reading: GenePairs | None  # the datasets are read through them (`pretraining_data`)
    carried: GenePairs | None  # those in the vocabulary stay with the model
    own_pairs: GenePairs | None = None  # with own genes: the pairs that find the data genes' rows in the base


def _gene_map_routing(data: DataInput | Sequence[DataInput], gene_map: GeneMapInput | None, base: Exceiver | None,
                      own_genes: bool) -> GeneMapRouting:
    """The given gene map before a continued model's own pairs (as `Exceiver.read` takes them):
    datasets in memory are read through them and the model keeps them; with own genes they only
    find the rows of the data's genes in the base."""
    pairs = GenePairs.of(gene_map)
    carried = pairs.before(base.contract.gene_map) if pairs is not None and base is not None else (
        pairs if base is None else base.contract.gene_map)
    if own_genes:  # the data's genes are the vocabulary, read as they are
        return GeneMapRouting(None, None, carried)
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    if pairs is None and any(is_corpus(item) for item in items):
        return GeneMapRouting(None, carried)  # a corpus was translated when it was built
    return GeneMapRouting(carried, carried)


def _pretrain_on(cells: PretrainingData, start: Start, routing: GeneMapRouting, run: TrainingRun, *, preset: str,
                 batch_key: str | None, watched: MonitorCells | None, freeze: bool = False) -> Exceiver:
    """Pretraining on the run's cells from its starting point (with an embedding monitor of the
    `watched` cells, read by the model being trained; `freeze`: only new batches' rows learn);
    the model it makes."""
    base = start.base
    batches = batch_categories(cells.batch_labels, base.batches if base else None, batch_key)
    if freeze and len(batches["categories"]) == base.config.n_batches:
        raise ExceiverInputError(f"{option('freeze_except_batches', True)} trains the data's new batches, and "
                                 f"every {batch_key} of the data is one of the model's: nothing would learn")
    # Mapping query cells reads them as the model reads its reference: its own normalisation.
    scaler = (cells.scaler if base is None or start.own_genes else base.scaler if freeze
              else merged_scaler(cells.scaler, base.scaler))
    run.seed()
    n_batches = len(batches["categories"]) if batches else (base.config.n_batches if base else 0)
    about_init = {}  # metrics.json's "init": what a continued run started from
    if base is None:
        module = ExceiverModule(dataclasses.replace(start.architecture, n_genes=len(cells.vocab), n_batches=n_batches))
        module.init_value_offsets(torch.from_numpy(scaler.expressed_mean), scaler.mean_expressed_value)
    else:
        module, n_added = continued_network(base, cells.vocab, scaler, n_batches, own_genes=start.own_genes,
                                            gene_map=routing.own_pairs, config=start.architecture)
        about_init = {"init": {"model": start.init, "n_genes": len(base.vocab), "n_genes_added": n_added,
                               **({"own_genes": True} if start.own_genes else {}),
                               **({"settings": start.overrides} if start.overrides else {}),
                               **({"freeze_except_batches": True} if freeze else {})}}
    frozen_rows = freeze_all_but_new_batch_rows(module, base.config.n_batches) if freeze else None
    codes = None if batches is None else pd.Categorical(cells.batch_labels, batches["categories"]).codes

    def as_model(metrics: dict) -> Exceiver:
        return Exceiver(module, cells.vocab, scaler, start.tokenizer, objectives=start.objectives,
                        training=run.settings.to_dict(), metrics=metrics, gene_key=cells.gene_key, layer=cells.layer,
                        batches=batches or (base.batches if base else None),
                        gene_map=None if routing.carried is None else routing.carried.within(cells.vocab.genes).table)

    monitor = None if watched is None else EmbeddingMonitor(watched, as_model({}), seed=run.settings.seed)
    plan = PretrainingPlan(module, start.objectives, torch.from_numpy(scaler.expressed_mean), run.settings,
                           zero_queries=start.tokenizer.zero_query_ratio > 0,
                           batch_codes=None if codes is None else codes.astype(np.int64), embedding_monitor=monitor,
                           frozen_rows=frozen_rows)
    datamodule = CellDataModule(cells.source, scaler, start.tokenizer, cells.validation,
                                batch_size=run.settings.batch_size, num_workers=run.settings.num_workers,
                                seed=run.settings.seed, genes=scaler.n_expressed > 0)
    identity = {"command": "pretrain", "preset": preset, "architecture": start.architecture.to_dict(),
                "tokenizer": start.tokenizer.to_dict(), "objectives": start.objectives.to_dict(),
                "training": run.settings.to_dict(), "n_cells": cells.counts["n_cells"],
                "genes": cells.vocab.fingerprint(), "init": base.fingerprint() if base else None,
                "batches": batches, "monitor": None if watched is None else watched.identity(),
                **({"freeze_except_batches": True} if freeze else {})}

    def pretrained(metrics: dict) -> Exceiver:
        return as_model({**metrics, **cells.counts, "n_genes": len(cells.vocab), "n_parameters": module.n_parameters(),
                         **learned_context(metrics), **about_init})

    model = run.fit(plan, datamodule, identity=identity, model=pretrained)
    module.requires_grad_(True)  # the network handed back trains as any other (query mapping froze it)
    return model


def _report_context(metrics: dict) -> None:
    """Log the validation error against the gene-mean baseline, and warn when no context was learned."""
    log.info("val masked MSE %.4f vs gene-mean baseline %.4f (ratio %.3f)", metrics["val_masked_mse"],
             metrics["val_gene_mean_mse"], metrics["val_mse_ratio"])
    if not metrics["learned_context"]:
        log.warning("THE MODEL LEARNED NO CONTEXT: its validation error is %.2fx that of predicting each gene's "
                    "mean (%s steps in %.0f s). Train longer (%s, %s) or on more cells before using it.",
                    metrics["val_mse_ratio"], f"{metrics['steps']:,}", metrics["seconds"], option("max_minutes"),
                    option("max_epochs"))


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
