"""Fine-tuning for cell-level labels: the class-token decoder query of a pretrained Exceiver.

Three modes share one code path:
- "full": every weight trains on cross-entropy plus the masked-expression MSE (the original
  classifier's joint loss; each term's weight is a setting);
- "freeze" (probe): the pretrained encoder (gene embeddings, latents, encoder, processor) is
  frozen, so the cell's latents are exactly the pretrained ones; only the read-out trains: the class
  token's query embedding, the decoder cross-attention it reads the latents with, and the class
  head, on whole (unmasked) cells;
- "scratch": the same architecture from random weights (the control for what pretraining buys).
Class imbalance: the cross-entropy weights each class by n / (K * n_class), so that every class
counts equally (the balanced objective that macro-F1 measures). Validation judges whole, unmasked
cells, as `predict` sees them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchmetrics

from exceiver.api import Exceiver, _output_folder, _stop_reason, read_datasets
from exceiver.data import PretrainDataModule
from exceiver.errors import ExceiverInputError
from exceiver.io import check_output_dir
from exceiver.model import ExceiverModule
from exceiver.tokenize import CellBatch
from exceiver.train import PretrainingPlan, TrainingConfig, fit, masked_mse

log = logging.getLogger(__name__)

MODES = ("full", "freeze", "scratch")
# Small label sets (a few dozen cells) give one step per epoch: their cells are repeated so that an
# epoch has at least this many steps, and early stopping judges real progress.
MIN_STEPS_PER_EPOCH = 20


def encode_labels(adata: ad.AnnData, label_key: str, min_cells_per_class: int) -> tuple[np.ndarray, list[str]]:
    """Integer codes per cell and the sorted class names; refuses labels a classifier cannot learn."""
    if label_key not in adata.obs.columns:
        raise ExceiverInputError(f"label column {label_key!r} is not in obs; available columns: {list(adata.obs.columns)}")
    labels = adata.obs[label_key]
    missing = labels.isna().to_numpy()
    if missing.any():
        raise ExceiverInputError(
            f"{int(missing.sum()):,} of {adata.n_obs:,} cells have no {label_key!r} label; "
            f"remove them first (e.g. adata[adata.obs[{label_key!r}].notna()])"
        )
    labels = labels.astype(str)
    counts = labels.value_counts()
    if min_cells_per_class < 2:
        raise ExceiverInputError("min_cells_per_class must be >= 2 (each class needs a training and a validation cell)")
    if len(counts) < 2:
        raise ExceiverInputError(f"label column {label_key!r} has a single class ({counts.index[0]!r}): nothing to predict")
    small = counts[counts < min_cells_per_class]
    if len(small):
        raise ExceiverInputError(
            f"{len(small)} classes of {label_key!r} have fewer than {min_cells_per_class} cells "
            f"({', '.join(f'{k}: {v}' for k, v in small.items())}); remove or merge them"
        )
    classes = sorted(counts.index)
    return pd.Categorical(labels, categories=classes).codes.astype(np.int64), classes


def split_by_class(codes: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split with each class in both parts: round(val_fraction x its cells), at least one."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(codes):
        rows = rng.permutation(np.flatnonzero(codes == c))
        n_val = min(max(1, round(val_fraction * len(rows))), len(rows) - 1)
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def balanced_class_weights(codes: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    return (len(codes) / (n_classes * np.maximum(counts, 1))).astype(np.float32)


class ClassifierPlan(PretrainingPlan):
    """Cross-entropy on the class token (+ masked-expression MSE unless frozen); keeps the weights
    of the round with the lowest class-balanced validation cross-entropy (on whole cells)."""

    monitor = "val_class_loss"

    def __init__(self, module: ExceiverModule, gene_means: torch.Tensor, training: TrainingConfig,
                 labels: np.ndarray, class_weights: np.ndarray, *, freeze: bool, class_loss_weight: float,
                 expression_loss_weight: float):
        super().__init__(module, gene_means, training)
        self.register_buffer("labels", torch.as_tensor(labels), persistent=False)
        self.register_buffer("class_weights", torch.as_tensor(class_weights), persistent=False)
        self.freeze, self.class_loss_weight, self.expression_loss_weight = freeze, class_loss_weight, expression_loss_weight
        n = module.config.n_classes
        self.val_accuracy = torchmetrics.classification.MulticlassAccuracy(n, average="micro")
        self.val_macro_f1 = torchmetrics.classification.MulticlassF1Score(n, average="macro")
        self.val_class_loss = torchmetrics.MeanMetric()
        for name, param in module.named_parameters():
            if freeze:  # the latents stay the pretrained ones; the read-out learns
                param.requires_grad = name.startswith(("class_head", "decoder")) or name == "gene_emb.weight"
            elif expression_loss_weight == 0 and name.startswith(("value_head", "gene_bias")):
                param.requires_grad = False  # unused without the expression loss (DDP wants no idle weights)

    def on_train_batch_start(self, batch: CellBatch, batch_idx: int) -> None:
        if self.freeze:  # frozen parts run in eval mode (no dropout): their latents are the pretrained ones
            for part in (self.module.encoder, self.module.processor):
                part.eval()

    def _latents(self, batch: CellBatch) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            return self.module.encode(batch.gene_ids, batch.values, batch.token_mask, batch.token_zero)

    def _losses(self, batch: CellBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(logits, per-cell class-weighted cross-entropy, predicted values of queried genes, labels)."""
        latents = self._latents(batch)
        logits = self.module.class_logits(latents)
        labels = self.labels[batch.cells]
        cell_losses = F.cross_entropy(logits.float(), labels, weight=self.class_weights, reduction="none")
        pred = self.module.predict_values(latents, batch.query_ids) if batch.query_ids.shape[1] else None
        return logits, cell_losses, pred, labels

    def training_step(self, batch: CellBatch, batch_idx: int) -> torch.Tensor:
        logits, cell_losses, pred, labels = self._losses(batch)
        class_loss = cell_losses.sum() / self.class_weights[labels].sum()  # the weighted mean
        loss = self.class_loss_weight * class_loss
        if pred is not None and self.expression_loss_weight > 0:
            loss = loss + self.expression_loss_weight * masked_mse(pred, batch.targets, batch.query_mask)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch), sync_dist=True)
        self.log("train_class_loss", class_loss, on_step=False, on_epoch=True, batch_size=len(batch), sync_dist=True)
        self.log("train_accuracy", (logits.argmax(1) == labels).float().mean(), on_step=False, on_epoch=True,
                 batch_size=len(batch), sync_dist=True)
        return loss

    def validation_step(self, batch: CellBatch, batch_idx: int) -> None:
        logits, cell_losses, _, labels = self._losses(batch)
        weights = self.class_weights[labels]  # over the whole validation set: the weighted mean
        self.val_class_loss.update(cell_losses / weights, weight=weights)
        self.val_accuracy.update(logits, labels)
        self.val_macro_f1.update(logits, labels)

    def on_validation_epoch_end(self) -> None:
        metrics = {"val_class_loss": self.val_class_loss.compute(), "val_accuracy": self.val_accuracy.compute(),
                   "val_macro_f1": self.val_macro_f1.compute()}
        for metric in (self.val_class_loss, self.val_accuracy, self.val_macro_f1):
            metric.reset()
        self.log_dict(metrics, prog_bar=True, sync_dist=True)
        self.keep_if_best(metrics)


def classifier_module(base: Exceiver, n_classes: int, *, from_scratch: bool, seed: int) -> ExceiverModule:
    """The base model's architecture with a new class head of `n_classes` (and without the heads of
    pretraining-only objectives); pretrained weights everywhere else unless `from_scratch`."""
    # Pretraining-only objectives stay behind: the classifier trains cross-entropy + masked MSE.
    config = dataclasses.replace(base.config, n_classes=n_classes, contrastive_weight=0.0, detection_weight=0.0,
                                 zero_query_ratio=0.0, cell_query=False)
    torch.manual_seed(seed)
    module = ExceiverModule(config)
    if from_scratch:
        module.init_value_offsets(torch.from_numpy(base.scaler.expressed_mean), base.scaler.mean_expressed_value)
        return module
    state = {k: v for k, v in base.module.state_dict().items()
             if not k.startswith(("class_head", "projection", "detection_head", "cell_token", "cell_pool"))}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or not all(k.startswith("class_head") for k in missing):
        raise ValueError(f"pretrained weights do not fit the classifier (missing {missing}, unexpected {unexpected})")
    return module


def finetune(
    model: Exceiver | str | Path,
    adata: ad.AnnData | str | Path,
    label_key: str,
    out: str | Path | None = None,
    *,
    mode: str = "full",
    class_loss_weight: float = 1.0,
    expression_loss_weight: float = 1.0,
    min_cells_per_class: int = 3,
    gene_key: str | None = None,
    layer: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **training,
) -> Exceiver:
    """Train a cell classifier from a pretrained model folder (or Exceiver) and labelled cells.

    mode: "full" (fine-tune everything), "freeze" (probe: frozen encoder and latents; the class
        token, the decoder and the class head train, so the classifier's `predict_values` differs
        from the base model's) or "scratch" (random initialisation, same architecture).
    class_loss_weight, expression_loss_weight: weights of cross-entropy and masked-expression MSE
        (the MSE term is not used when frozen).
    training: fields of `TrainingConfig` (max_epochs, max_minutes, batch_size, seed, ...).
    """
    if mode not in MODES:
        raise ExceiverInputError(f"unknown fine-tuning mode {mode!r}; choose one of {MODES}")
    if class_loss_weight <= 0 or expression_loss_weight < 0:
        raise ExceiverInputError("class_loss_weight must be > 0 and expression_loss_weight >= 0")
    training_config = TrainingConfig(**training)
    if out is not None:
        check_output_dir(out, overwrite=overwrite)
    base = model if isinstance(model, Exceiver) else Exceiver.load(model)
    if isinstance(adata, (str, Path)):
        [(_, adata)] = read_datasets(adata)
    codes, classes = encode_labels(adata, label_key, min_cells_per_class)
    cells = base.cells(adata, gene_key=gene_key, layer=layer)
    train_rows, val_rows = split_by_class(codes, training_config.val_fraction, training_config.seed)
    weights = balanced_class_weights(codes[train_rows], len(classes))
    epoch_rows = np.resize(train_rows, max(len(train_rows), MIN_STEPS_PER_EPOCH * training_config.batch_size))

    L.seed_everything(training_config.seed, workers=True, verbose=False)
    module = classifier_module(base, len(classes), from_scratch=mode == "scratch", seed=training_config.seed)
    freeze = mode == "freeze"
    uses_expression = not freeze and expression_loss_weight > 0
    plan = ClassifierPlan(module, torch.from_numpy(base.scaler.expressed_mean), training_config, codes, weights,
                          freeze=freeze, class_loss_weight=class_loss_weight,
                          expression_loss_weight=expression_loss_weight if uses_expression else 0.0)
    datamodule = PretrainDataModule(cells, base.scaler, module.config, epoch_rows, val_rows,
                                    batch_size=training_config.batch_size, num_workers=training_config.num_workers,
                                    seed=training_config.seed, masked=uses_expression, masked_validation=False)
    with _output_folder(out, overwrite) as folder:
        start = time.monotonic()
        trainer = fit(plan, datamodule, training_config, Path(folder), progress=progress)
        module.load_state_dict(plan.best_state)
        for param in module.parameters():
            param.requires_grad = True
        module.cpu().eval()
        train_counts = np.bincount(codes[train_rows], minlength=len(classes))
        metrics = {
            **plan.best_metrics, "mode": mode, "label_key": label_key,
            "n_train_cells": len(train_rows), "n_val_cells": len(val_rows),
            "train_cells_per_class": {c: int(n) for c, n in zip(classes, train_counts)},
            "class_weights": {c: round(float(w), 4) for c, w in zip(classes, weights)},
            "epochs": trainer.current_epoch, "steps": trainer.global_step,
            "seconds": round(time.monotonic() - start, 1), "stopped_by": _stop_reason(trainer, training_config),
        }
        settings = {**training_config.to_dict(), "mode": mode, "class_loss_weight": class_loss_weight,
                    "expression_loss_weight": expression_loss_weight,
                    "base_model": "in memory" if isinstance(model, Exceiver) else str(model)}
        result = Exceiver(module, base.vocab, base.scaler, training=settings, metrics=metrics, classes=classes)
        if out is not None and trainer.is_global_zero:
            result._write(Path(folder))
    log.info("validation accuracy %.3f, macro-F1 %.3f (%s, %d training cells)", metrics["val_accuracy"],
             metrics["val_macro_f1"], mode, len(train_rows))
    return result
