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
from pathlib import Path

import anndata as ad
import lightning as L
import numpy as np
import torch
from typing_extensions import Unpack

from exceiver.data.datamodule import CellDataModule
from exceiver.data.labels import cell_labels
from exceiver.data.sources import read_datasets
from exceiver.errors import ExceiverInputError, option
from exceiver.model import Exceiver
from exceiver.nn.config import ObjectiveConfig
from exceiver.nn.network import ExceiverModule
from exceiver.train.config import TrainingOptions, training_config
from exceiver.train.checkpoints import Checkpointing, training_output
from exceiver.train.fit import FitResult, fit
from exceiver.train.plans import ClassifierPlan

log = logging.getLogger(__name__)

MODES = ("full", "freeze", "scratch")
# Small label sets (a few dozen cells) give one step per epoch: their cells are repeated so that an
# epoch has at least this many steps, and early stopping judges real progress.
MIN_STEPS_PER_EPOCH = 20


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


def classifier_module(base: Exceiver, n_classes: int, *, from_scratch: bool, seed: int) -> ExceiverModule:
    """The base model's architecture with a new class head of `n_classes` and without the heads of
    pretraining-only objectives (the classifier trains cross-entropy + masked MSE); pretrained
    weights everywhere else unless `from_scratch`."""
    config = dataclasses.replace(base.config, n_classes=n_classes, detection_head=False, projection_head=False)
    torch.manual_seed(seed)
    module = ExceiverModule(config)
    if from_scratch:
        module.init_value_offsets(torch.from_numpy(base.scaler.expressed_mean), base.scaler.mean_expressed_value)
        return module
    # A base that is itself a classifier brings a head for other classes: the new one starts afresh.
    wanted = {k for k in module.state_dict() if not k.startswith("class_head")}
    missing, _ = module.load_state_dict({k: v for k, v in base.module.state_dict().items() if k in wanted},
                                        strict=False)
    if not all(k.startswith("class_head") for k in missing):
        raise ValueError(f"pretrained weights do not fit the classifier (missing {missing})")
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
    allow_non_integer: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    checkpoint_minutes: float = 10.0,
    keep_checkpoints: bool = False,
    progress: bool = True,
    **training: Unpack[TrainingOptions],
) -> Exceiver:
    """Train a cell classifier from a pretrained model folder (or Exceiver) and labelled cells.

    mode: "full" (fine-tune everything), "freeze" (probe: frozen encoder and latents; the class
        token, the decoder and the class head train, so the classifier's `predict_values` differs
        from the base model's) or "scratch" (random initialisation, same architecture).
    class_loss_weight, expression_loss_weight: weights of cross-entropy and masked-expression MSE
        (the MSE term is not used when frozen).
    label_key, min_cells_per_class: the obs column of labels; cells without a label are left out
        (a logged warning counts them), and every class needs `min_cells_per_class` labelled cells
        (`exceiver.data.labels.cell_labels`, as in `evaluate`).
    gene_key, layer, allow_non_integer: where the counts and gene identifiers are, as in `pretrain`.
    overwrite, resume, checkpoint_minutes, keep_checkpoints: as for `pretrain` (replace an
        output exceiver wrote; continue an interrupted run; checkpoint this often).
    training: fields of `TrainingConfig` (max_epochs, max_minutes, batch_size, seed, ...).
    """
    if mode not in MODES:
        raise ExceiverInputError(f"unknown fine-tuning mode {mode!r}; choose one of {MODES}")
    if class_loss_weight <= 0 or expression_loss_weight < 0:
        raise ExceiverInputError(f"{option('class_loss_weight')} must be > 0 and "
                                 f"{option('expression_loss_weight')} >= 0")
    settings = training_config(training)
    if min_cells_per_class < 2:
        raise ExceiverInputError("min_cells_per_class must be >= 2 (each class needs a training and a validation cell)")
    checkpointing = Checkpointing(resume=resume, every_minutes=checkpoint_minutes, keep=keep_checkpoints)
    with training_output(out, overwrite=overwrite, resume=resume) as run:  # refused now, not after the work
        base = model if isinstance(model, Exceiver) else Exceiver.load(model)
        [(name, adata)] = read_datasets(adata)
        labels = cell_labels(adata.obs, label_key, min_cells=min_cells_per_class, name=name)
        codes, classes = labels.codes, labels.classes
        if not labels.labelled.all():
            adata = adata[labels.labelled]
        cells = base.cells(adata, gene_key=gene_key, layer=layer, name=name, allow_non_integer=allow_non_integer)
        train_rows, val_rows = split_by_class(codes, settings.val_fraction, settings.seed)
        weights = balanced_class_weights(codes[train_rows], len(classes))
        validation = np.zeros(len(codes), dtype=bool)
        validation[val_rows] = True

        L.seed_everything(settings.seed, workers=True, verbose=False)
        module = classifier_module(base, len(classes), from_scratch=mode == "scratch", seed=settings.seed)
        freeze = mode == "freeze"
        uses_expression = not freeze and expression_loss_weight > 0
        plan = ClassifierPlan(module, settings, codes, weights, freeze=freeze, class_loss_weight=class_loss_weight,
                              expression_loss_weight=expression_loss_weight if uses_expression else 0.0)
        # The classifier's masked-value term queries masked genes only: no zero genes, no detection.
        tokenizer = dataclasses.replace(base.tokenizer, zero_query_ratio=0.0)
        datamodule = CellDataModule(cells, base.scaler, tokenizer, validation, batch_size=settings.batch_size,
                                    num_workers=settings.num_workers, seed=settings.seed, masked=uses_expression,
                                    masked_validation=False, min_train_cells=MIN_STEPS_PER_EPOCH * settings.batch_size)
        train_counts = np.bincount(codes[train_rows], minlength=len(classes))

        def trained(result: FitResult) -> Exceiver:
            for param in module.parameters():
                param.requires_grad = True
            metrics = {
                **result.summary(), "mode": mode, "label_key": label_key,
                "n_train_cells": len(train_rows), "n_val_cells": len(val_rows),
                "n_unlabelled_cells": int((~labels.labelled).sum()),
                "train_cells_per_class": {c: int(n) for c, n in zip(classes, train_counts)},
                "class_weights": {c: round(float(w), 4) for c, w in zip(classes, weights)},
            }
            used = {**settings.to_dict(), "mode": mode, "class_loss_weight": class_loss_weight,
                    "expression_loss_weight": expression_loss_weight,
                    "base_model": "in memory" if isinstance(model, Exceiver) else str(model)}
            return Exceiver(module, base.vocab, base.scaler, tokenizer, objectives=ObjectiveConfig(), training=used,
                            metrics=metrics, classes=classes, gene_key=base.gene_key, layer=base.layer,
                            batches=base.batches)

        identity = {"command": "finetune", "mode": mode, "label_key": label_key, "classes": classes,
                    "class_loss_weight": class_loss_weight, "expression_loss_weight": expression_loss_weight,
                    "training": settings.to_dict(), "n_cells": int(len(codes)), "genes": base.vocab.fingerprint(),
                    "base_weights": base.fingerprint()}
        result = fit(plan, datamodule, settings, run, identity=identity, build=trained, overwrite=overwrite,
                     checkpointing=checkpointing, progress=progress)
    log.info("validation accuracy %.3f, macro-F1 %.3f (%s, %d training cells)", result.metrics["val_accuracy"],
             result.metrics["val_macro_f1"], mode, len(train_rows))
    return result
