"""The user-facing model: AnnData in, AnnData out.

`pretrain` turns count files into a model folder; `Exceiver.load` opens one; `embed` writes cell
embeddings to `obsm`; `gene_embeddings` returns the learned gene vectors; `impute`, `perturb` and
`gene_dependencies` delegate to `exceiver.regulation`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import anndata as ad
import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_only
import numpy as np
import pandas as pd
import torch

from exceiver import __version__, regulation
from exceiver.corpus import CorpusCells, CorpusDataModule, fit_scaler, is_corpus, is_validation
from exceiver.data import PretrainDataModule, split_cells
from exceiver.errors import ExceiverInputError, ModelFileError
from exceiver.infer import decode_values, iterate_latents, resolve_device
from exceiver.h5ad_output import h5ad_copy_with_obsm
from exceiver.io import atomic_dir, check_output_dir, load_model_files, save_model_files
from exceiver.model import POOLINGS, ExceiverConfig, ExceiverModule
from exceiver.preprocess import GeneScaler, check_counts, drop_empty_cells, require_nonempty_cells
from exceiver.stream import H5adCells
from exceiver.train import PretrainingPlan, TrainingConfig, fit
from exceiver.vocab import CellCounts, GeneVocab, align, dataset_genes, read_gene_list

log = logging.getLogger(__name__)

DataInput = str | Path | ad.AnnData


class Exceiver:
    """A pretrained Exceiver: network, gene vocabulary and scaler, applied to AnnData."""

    def __init__(self, module: ExceiverModule, vocab: GeneVocab, scaler: GeneScaler, *,
                 training: dict | None = None, metrics: dict | None = None, classes: Sequence[str] | None = None):
        if not len(vocab) == module.config.n_genes == len(scaler):
            raise ModelFileError(
                f"vocabulary ({len(vocab):,} genes), network ({module.config.n_genes:,}) and "
                f"scaler ({len(scaler):,}) disagree on the number of genes"
            )
        names = [] if classes is None else [str(c) for c in classes]
        n_classes = module.config.n_classes
        if len(names) != n_classes or len(set(names)) != n_classes:
            raise ModelFileError(f"the model has {n_classes} classes but {len(set(names))} unique class names")
        self.module, self.vocab, self.scaler = module, vocab, scaler
        self.classes = names or None
        self.training = training or {}
        self.metrics = metrics or {}

    @property
    def config(self) -> ExceiverConfig:
        return self.module.config

    def __repr__(self) -> str:
        c = self.config
        return (f"Exceiver({c.n_genes:,} genes, gene_dim={c.gene_dim}, {c.n_latents} latents x "
                f"{c.latent_dim}, {c.n_layers} layers, {self.module.n_parameters():,} parameters)")

    @classmethod
    def load(cls, path: str | Path) -> Exceiver:
        config, state_dict, vocab, scaler, metrics = load_model_files(path)
        if not isinstance(config.get("model"), dict):
            raise ModelFileError(f"{Path(path) / 'config.json'} has no 'model' section")
        try:
            model_config = ExceiverConfig.from_dict(config["model"])
            module = ExceiverModule(model_config)
        except (TypeError, ValueError) as err:
            raise ModelFileError(f"{Path(path) / 'config.json'}: invalid model config ({err})") from err
        _check_weights(module, state_dict, Path(path) / "model.safetensors")
        module.load_state_dict(state_dict, strict=True)
        bad = [name for name, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise ModelFileError(f"{Path(path) / 'model.safetensors'} holds non-finite weights in {bad[:3]}")
        module.eval()
        return cls(module, vocab, scaler, training=config.get("training"), metrics=metrics,
                   classes=config.get("classes"))

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        with atomic_dir(path, overwrite=overwrite) as tmp:
            self._write(tmp)
        return Path(path)

    def _write(self, folder: Path) -> None:
        config = {"exceiver_version": __version__, "model": self.config.to_dict(), "training": self.training}
        if self.classes:
            config["classes"] = self.classes
        save_model_files(folder, config=config, state_dict=self.module.state_dict(), vocab=self.vocab,
                         scaler=self.scaler, metrics=self.metrics)

    def cells(self, adata: ad.AnnData, *, gene_key: str | None = None, layer: str | None = None,
              name: str = "dataset") -> CellCounts:
        """Align a dataset to the model's genes and check its counts; every cell must have counts
        in genes the model saw expressed in training (others have untrained embeddings)."""
        return ModelCells(self.scaler.trained_genes, name)(align(adata, self.vocab, gene_key=gene_key, layer=layer,
                                                                 name=name))

    @torch.inference_mode()
    def embed(self, adata: ad.AnnData, *, key: str = "X_exceiver", pooling: str | None = None,
              gene_key: str | None = None, layer: str | None = None, batch_size: int | None = None,
              device: str | None = None, num_workers: int = 0, progress: bool = True) -> np.ndarray:
        """Cell embeddings, written to `adata.obsm[key]` and returned: the model's learned cell query
        over the processed latents if it has one, else their mean (`pooling` chooses: "mean",
        "flatten" for all latents, "cell")."""
        pooling = self.resolve_pooling(pooling)
        width = self.module.embedding_width(pooling)
        embedding = np.empty((adata.n_obs, width), dtype=np.float32)
        for batch, latents in self._latents(adata, gene_key, layer, batch_size, device, progress, "embedding",
                                            num_workers):
            embedding[batch.cells.cpu().numpy()] = self.module.pool(latents, pooling).float().cpu().numpy()
        adata.obsm[key] = embedding
        adata.uns.setdefault("exceiver", {})[key] = {"pooling": pooling, "n_genes": len(self.vocab)}
        return embedding

    @torch.inference_mode()
    def predict_values(self, adata: ad.AnnData, query_genes: Sequence[str] | None = None, *,
                       gene_key: str | None = None, layer: str | None = None, batch_size: int | None = None,
                       device: str | None = None, progress: bool = True) -> np.ndarray:
        """The decoder's predicted value of each query gene in each cell, from the cell's tokens
        (nothing masked; as in `embed`, cells with more than `max_tokens` expressed genes are
        subsampled), in the model's value space (z-score + 1): [cells, query genes].
        query_genes: vocabulary genes to predict (default: all, in vocabulary order)."""
        if query_genes is None:
            ids = np.arange(len(self.vocab))
        else:
            ids = self.vocab.ids(list(query_genes))
            if (ids < 0).any():
                unknown = [g for g, i in zip(query_genes, ids) if i < 0]
                raise ExceiverInputError(f"{len(unknown)} query genes are not in the model's vocabulary, e.g. {unknown[:3]}")
        out = np.empty((adata.n_obs, len(ids)), dtype=np.float32)
        query = torch.from_numpy(ids)
        for batch, latents in self._latents(adata, gene_key, layer, batch_size, device, progress, "predicting"):
            out[batch.cells.cpu().numpy()] = decode_values(self.module, latents, query.to(latents.device)).float().cpu().numpy()
        return out

    @torch.inference_mode()
    def predict_logits(self, adata: ad.AnnData, **kwargs) -> np.ndarray:
        """Class-token logits [cells, classes] (columns: `self.classes`)."""
        if self.module.class_head is None:
            raise ExceiverInputError("this model has no class head: it predicts expression, not classes")
        out = np.empty((adata.n_obs, self.config.n_classes), dtype=np.float32)
        for batch, latents in self._latents(adata, desc="classifying", **kwargs):
            out[batch.cells.cpu().numpy()] = self.module.class_logits(latents).float().cpu().numpy()
        return out

    def predict_proba(self, adata: ad.AnnData, **kwargs) -> np.ndarray:
        """Class probabilities [cells, classes] (softmax of the logits; columns: `self.classes`)."""
        return torch.softmax(torch.from_numpy(self.predict_logits(adata, **kwargs)).double(), dim=1).numpy()

    def predict(self, adata: ad.AnnData, **kwargs) -> pd.Series:
        """Predicted class of each cell, written to `obs["exceiver_prediction"]`, with the class
        probabilities in `obsm["exceiver_probabilities"]` (columns: `uns["exceiver_classes"]`)."""
        proba = self.predict_proba(adata, **kwargs)
        classes = np.asarray(self.classes)
        prediction = pd.Series(pd.Categorical(classes[proba.argmax(1)], categories=classes),
                               index=adata.obs_names, name="exceiver_prediction")
        adata.obs["exceiver_prediction"] = prediction
        adata.obsm["exceiver_probabilities"] = proba.astype(np.float32)
        adata.uns["exceiver_classes"] = classes
        return prediction

    def resolve_pooling(self, pooling: str | None) -> str:
        """The pooling to use (the model's default for None), refused before any work if unknown
        or unavailable."""
        pooling = pooling or self.module.default_pooling
        if pooling not in POOLINGS:
            raise ExceiverInputError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        if pooling == "cell" and not self.config.cell_query:
            raise ExceiverInputError("pooling 'cell' needs a model pretrained with a cell query (cell_query=True); "
                             "use 'mean' or 'flatten'")
        return pooling

    def _latents(self, adata: ad.AnnData, gene_key: str | None = None, layer: str | None = None,
                 batch_size: int | None = None, device: str | None = None, progress: bool = True,
                 desc: str = "cells", num_workers: int = 0):
        """(batch, processed latents) over the cells of `adata`, in batches on the chosen device; a
        backed AnnData (`read_h5ad(path, backed="r")`) is read from disk chunk by chunk."""
        if adata.isbacked:
            cells = H5adCells(adata.filename, self.vocab, gene_key=gene_key, layer=layer, name=Path(adata.filename).stem)
        else:
            cells = self.cells(adata, gene_key=gene_key, layer=layer)
        device = resolve_device(device)
        self.module.to(device)
        return iterate_latents(self.module, cells, self.scaler, batch_size=batch_size, device=device,
                               num_workers=num_workers, progress=progress, desc=desc,
                               prepare=ModelCells(self.scaler.trained_genes, getattr(cells, "name", "dataset")))

    @torch.inference_mode()
    def embed_file(self, path: str | Path, out: str | Path, *, key: str = "X_exceiver", pooling: str | None = None,
                   gene_key: str | None = None, layer: str | None = None, batch_size: int | None = None,
                   device: str | None = None, num_workers: int = 0, overwrite: bool = False,
                   progress: bool = True) -> Path:
        """`embed` from an .h5ad file to a copy of it with `obsm[key]` added, streaming: neither the
        counts nor the embeddings are ever all in memory."""
        pooling = self.resolve_pooling(pooling)
        cells = H5adCells(path, self.vocab, gene_key=gene_key, layer=layer)
        device = resolve_device(device)
        self.module.to(device)
        width = self.module.embedding_width(pooling)
        with h5ad_copy_with_obsm(path, out, key, (cells.n_cells, width), overwrite=overwrite) as write:
            for batch, latents in iterate_latents(
                    self.module, cells, self.scaler, batch_size=batch_size, device=device, num_workers=num_workers,
                    progress=progress, desc="embedding", prepare=ModelCells(self.scaler.trained_genes, cells.name)):
                write(batch.cells.cpu().numpy(), self.module.pool(latents, pooling).float().cpu().numpy())
            write.uns({"pooling": pooling, "n_genes": len(self.vocab)})
        return Path(out)

    def impute(self, adata: ad.AnnData, genes: Sequence[str] | None = None, **kwargs) -> np.ndarray:
        """Predicted log-normalised expression of `genes` (default: all of `adata`'s genes, written
        to `layers["exceiver_imputed"]`); see `exceiver.regulation.impute`."""
        return regulation.impute(self, adata, genes, **kwargs)

    def perturb(self, adata: ad.AnnData, genes: Sequence[str] | str, mode: str | float = "knockout",
                **kwargs) -> pd.DataFrame:
        """Predicted per-gene effects of knocking out / overexpressing each of `genes` in the cells
        of `adata`; see `exceiver.regulation.perturb`."""
        return regulation.perturb(self, adata, genes, mode, **kwargs)

    def gene_dependencies(self, adata: ad.AnnData, genes: Sequence[str], **kwargs):
        """Perturbation-effect and attention matrices between `genes`; see
        `exceiver.regulation.gene_dependencies`."""
        return regulation.gene_dependencies(self, adata, genes, **kwargs)

    def gene_embeddings(self) -> pd.DataFrame:
        """The learned gene embedding of every vocabulary gene (rows indexed by gene)."""
        weights = self.module.gene_emb.weight.detach().cpu().numpy()[: len(self.vocab)]
        columns = [f"dim_{i}" for i in range(weights.shape[1])]
        return pd.DataFrame(weights, index=pd.Index(self.vocab.genes, name="gene"), columns=columns)


class ModelCells:
    """A model's checks of cells it is given (picklable, for loader workers): valid counts, only
    genes it saw expressed in training, and every cell with counts in them (outputs must match
    the user's cells, so an empty cell is an error, not a silent drop)."""

    def __init__(self, trained_genes: np.ndarray, name: str):
        self.trained_genes, self.name = trained_genes, name

    def __call__(self, cells: CellCounts) -> CellCounts:
        check_counts(cells, self.name)
        cells = cells.keep_genes(self.trained_genes)
        require_nonempty_cells(cells, self.name)
        return cells


def _check_weights(module: ExceiverModule, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Name what is missing, extra or misshapen in a weight file, in one readable line."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshapen = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
                 for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = [f"{len(items)} {what} (e.g. {', '.join(items[:3])})"
                for items, what in [(missing, "weights missing"), (unexpected, "unexpected weights"),
                                    (misshapen, "weights of the wrong shape (file vs config)")] if items]
    if problems:
        raise ModelFileError(f"{path} does not match config.json: {'; '.join(problems)}")


def read_datasets(data: DataInput | Sequence[DataInput]) -> list[tuple[str, ad.AnnData]]:
    """Open AnnData objects or .h5ad paths, each with a name for messages."""
    items = [data] if isinstance(data, (str, Path, ad.AnnData)) else list(data)
    if not items:
        raise ExceiverInputError("no datasets given")
    datasets = []
    for i, item in enumerate(items):
        if isinstance(item, ad.AnnData):
            datasets.append((f"adata{i}", item))
            continue
        path = Path(item)
        if not path.is_file():
            raise ExceiverInputError(f"dataset {path} does not exist")
        try:
            datasets.append((path.stem, ad.read_h5ad(path)))
        except Exception as err:  # h5py/anndata raise many types for a non-h5ad file
            raise ExceiverInputError(f"cannot read {path} as an .h5ad file ({err})") from err
    names = [name for name, _ in datasets]
    return [(f"{name}#{i}" if names.count(name) > 1 else name, adata)
            for i, (name, adata) in enumerate(datasets)]


def gene_keys(datasets: list[tuple[str, ad.AnnData]], gene_key: str | None) -> list[str | None]:
    """`gene_key` for each dataset that has that var column, var_names for the others (files of
    one corpus often differ: Ensembl-indexed with a symbol column beside symbol-indexed)."""
    if gene_key is None:
        return [None] * len(datasets)
    keys = [gene_key if gene_key in a.var.columns else None for _, a in datasets]
    if not any(keys):
        raise ExceiverInputError(f"gene_key {gene_key!r} is not a column of var in any dataset")
    for (name, _), key in zip(datasets, keys):
        if key is None:
            log.info("%s has no var column %r: its genes are taken from var_names", name, gene_key)
    return keys


def build_vocab(datasets: list[tuple[str, ad.AnnData]], genes: str | Path | Sequence[str] | GeneVocab | None,
                keys: list[str | None]) -> GeneVocab:
    """The training vocabulary: the union of the datasets' genes, optionally restricted to a list."""
    if isinstance(genes, GeneVocab):
        return genes
    restrict = read_gene_list(genes) if isinstance(genes, (str, Path)) else genes
    return GeneVocab.from_gene_lists([dataset_genes(a, key) for (_, a), key in zip(datasets, keys)], restrict)


class Corpus(NamedTuple):
    cells: CellCounts
    vocab: GeneVocab
    scaler: GeneScaler
    train_rows: np.ndarray
    val_rows: np.ndarray


def prepare_corpus(datasets: list[tuple[str, ad.AnnData]], *, genes, gene_key: str | None,
                   layer: str | None, val_fraction: float, seed: int, ranks: bool = False) -> Corpus:
    """Datasets -> vocabulary -> aligned, checked counts -> seeded split -> scaler fitted on the
    training cells. Genes that no training cell expresses are left out of the tokens (their
    embeddings would stay untrained), as `Exceiver.cells` does at inference."""
    keys = gene_keys(datasets, gene_key)
    vocab = build_vocab(datasets, genes, keys)
    parts = []
    for (name, adata), key in zip(datasets, keys):
        part = align(adata, vocab, gene_key=key, layer=layer, name=name)
        check_counts(part, name)
        parts.append(drop_empty_cells(part, name))
    cells = CellCounts.concat(parts)
    train_rows, val_rows = split_cells(cells.n_cells, val_fraction, seed)
    scaler = GeneScaler.fit(cells.subset(train_rows), ranks=ranks)
    cells = cells.keep_genes(scaler.n_expressed > 0)
    for rows, split in ((train_rows, "training"), (val_rows, "validation")):
        if not (cells.n_genes_expressed[rows] >= 2).any():
            raise ExceiverInputError(
                f"no {split} cell has 2 or more expressed genes (one to mask, one to see): "
                "masked-expression pretraining needs richer cells or more of them"
            )
    val_rows = val_rows[cells.n_genes_expressed[val_rows] > 0]
    log.info("pretraining on %s cells (%s training, %s validation) from %d dataset(s), %s genes",
             f"{cells.n_cells:,}", f"{len(train_rows):,}", f"{len(val_rows):,}", len(parts), f"{len(vocab):,}")
    return Corpus(cells, vocab, scaler, train_rows, val_rows)


def pretrain(
    data: DataInput | Sequence[DataInput],
    out: str | Path | None = None,
    *,
    preset: str = "default",
    model: dict | None = None,
    genes: str | Path | Sequence[str] | GeneVocab | None = None,
    gene_key: str | None = None,
    layer: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **training,
) -> Exceiver:
    """Pretrain an Exceiver by masked-expression prediction on raw counts.

    data: one or several AnnData objects or .h5ad paths (their gene sets may differ), or a corpus
        folder (`exceiver.corpus.build_corpus`), streamed from disk.
    out: model folder to write (training logs and checkpoints go there too); None keeps the
        model in memory only.
    preset, model: architecture preset ("default" or "paper") and overrides of its fields.
    genes: restrict the vocabulary to this gene list (file, one gene per line) or use a vocabulary.
    gene_key: var column of gene identifiers, for the datasets that have it (others: var_names).
    training: fields of `TrainingConfig` (max_epochs, max_minutes, batch_size, seed, ...).
    """
    training_config = TrainingConfig(**training)
    try:
        config = ExceiverConfig.preset(preset, **(model or {}))
    except (TypeError, ValueError) as err:  # unknown preset or field, impossible combination
        raise ExceiverInputError(f"invalid model settings: {err}") from err
    if config.n_classes:
        raise ExceiverInputError("pretraining has no labels: leave n_classes at 0 and use finetune() for a classifier")
    if out is not None:
        check_output_dir(out, overwrite=overwrite)
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    if any(is_corpus(item) for item in items):
        if len(items) > 1:
            raise ExceiverInputError("a corpus folder is pretrained on alone; build one corpus from all the files")
        vocab, scaler, datamodule, counts = _streamed_corpus(items[0], config, training_config, genes, gene_key,
                                                             layer, progress)
    else:
        vocab, scaler, datamodule, counts = _in_memory_corpus(data, config, training_config, genes, gene_key, layer)

    L.seed_everything(training_config.seed, workers=True, verbose=False)
    module = ExceiverModule(config)
    module.init_value_offsets(torch.from_numpy(scaler.expressed_mean), scaler.mean_expressed_value)
    plan = PretrainingPlan(module, torch.from_numpy(scaler.expressed_mean), training_config)
    with _output_folder(out, overwrite) as folder:
        start = time.monotonic()
        trainer = fit(plan, datamodule, training_config, Path(folder), progress=progress)
        module.load_state_dict(plan.best_state)
        module.cpu().eval()
        metrics = {
            **plan.best_metrics,
            **counts, "n_genes": len(vocab), "n_parameters": module.n_parameters(),
            "epochs": trainer.current_epoch, "steps": trainer.global_step,
            "seconds": round(time.monotonic() - start, 1), "stopped_by": _stop_reason(trainer, training_config),
        }
        result = Exceiver(module, vocab, scaler, training=training_config.to_dict(), metrics=metrics)
        if out is not None and trainer.is_global_zero:
            result._write(Path(folder))
    log.info("val masked MSE %.4f vs gene-mean baseline %.4f (ratio %.3f)", metrics["val_masked_mse"],
             metrics["val_gene_mean_mse"], metrics["val_mse_ratio"])
    return result


def _in_memory_corpus(data, config: ExceiverConfig, training: TrainingConfig, genes, gene_key, layer):
    """Vocabulary, scaler, batches and cell counts of datasets read into memory."""
    cells, vocab, scaler, train_rows, val_rows = prepare_corpus(
        read_datasets(data), genes=genes, gene_key=gene_key, layer=layer, val_fraction=training.val_fraction,
        seed=training.seed, ranks=config.value_encoding == "rank")
    config.n_genes = len(vocab)
    datamodule = PretrainDataModule(cells, scaler, config, train_rows, val_rows, batch_size=training.batch_size,
                                    num_workers=training.num_workers, seed=training.seed)
    counts = {"n_cells": int(cells.n_cells), "n_train_cells": len(train_rows), "n_val_cells": len(val_rows),
              "datasets": {name: int(n) for name, n in zip(cells.source_names, np.bincount(cells.source))}}
    return vocab, scaler, datamodule, counts


def _streamed_corpus(folder, config: ExceiverConfig, training: TrainingConfig, genes, gene_key, layer,
                     progress: bool):
    """The same from a corpus folder (`build_corpus`), streamed from disk: memory does not grow
    with the number of cells."""
    given = [name for name, value in (("genes", genes), ("gene_key", gene_key), ("layer", layer)) if value]
    if given:
        raise ExceiverInputError(f"{folder} is a corpus folder: its genes and counts were fixed when it was "
                                 f"built; pass {', '.join(given)} to build-corpus instead")
    corpus = CorpusCells(folder)
    scaler = fit_scaler(corpus, training.val_fraction, training.seed, progress=progress,
                        ranks=config.value_encoding == "rank")
    config.n_genes = len(corpus.vocab)
    datamodule = CorpusDataModule(corpus, scaler, config, batch_size=training.batch_size,
                                  val_fraction=training.val_fraction, num_workers=training.num_workers,
                                  seed=training.seed)
    n_val = int(is_validation(np.arange(corpus.n_cells), training.val_fraction, training.seed).sum())
    counts = {"n_cells": corpus.n_cells, "n_train_cells": corpus.n_cells - n_val, "n_val_cells": n_val,
              "datasets": {d["name"]: d["n_cells"] for d in corpus.meta["datasets"]}}
    log.info("pretraining on corpus %s: %s cells (%s training, %s validation), %s genes", folder,
             f"{corpus.n_cells:,}", f"{corpus.n_cells - n_val:,}", f"{n_val:,}", f"{len(corpus.vocab):,}")
    return corpus.vocab, scaler, datamodule, counts


def _output_folder(out: str | Path | None, overwrite: bool):
    """The model folder is staged by the process of rank 0 only (distributed runs start one
    process per device, each running this function); other processes work in a scratch folder."""
    if out is not None and rank_zero_only.rank == 0:
        return atomic_dir(out, overwrite=overwrite)
    return tempfile.TemporaryDirectory(prefix="exceiver-")


def _stop_reason(trainer: L.Trainer, training: TrainingConfig) -> str:
    stopper = trainer.early_stopping_callback
    reason = getattr(stopper, "stopping_reason", None)  # Lightning >= 2.5
    stopped = reason.name != "NOT_STOPPED" if reason is not None else getattr(stopper, "stopped_epoch", 0) > 0
    if stopped:
        return "early_stopping"
    if trainer.current_epoch >= training.max_epochs:
        return "max_epochs"
    return "max_minutes"
