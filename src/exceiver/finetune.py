"""Fine-tuning for cell-level labels, from a pretrained Exceiver.

Three modes:
- "full": a class-token decoder query and class head are added and every weight trains on
  cross-entropy plus the masked-expression MSE (the original classifier's joint loss; each term's
  weight is a setting); pretrained weights learn at `pretrained_lr_mult` times the head's rate;
- "freeze": a linear probe: logistic regression (balanced class weights) on the frozen cell
  embedding that `embed` returns, fitted in closed form on its standardised dimensions and written
  into a linear class head that reads the embedding (`class_input`); nothing else changes;
- "scratch": the architecture of "full" from random weights (the control for what pretraining buys).
Class imbalance: the cross-entropy weights each class by n / (K * n_class), so that every class
counts equally (the balanced objective that macro-F1 measures). Validation judges whole, unmasked
cells, as `predict` sees them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from typing_extensions import Unpack

from exceiver.data.datamodule import CellDataModule
from exceiver.data.genemap import GenePairs
from exceiver.data.labels import CellLabels, cell_labels
from exceiver.data.sources import read_datasets
from exceiver.errors import ExceiverInputError, option
from exceiver.model import Exceiver
from exceiver.nn.config import ObjectiveConfig
from exceiver.nn.network import ExceiverModule
from exceiver.train.config import TrainingConfig
from exceiver.train.plans import ClassifierPlan
from exceiver.train.probe import linear_probe
from exceiver.train.run import CHECKPOINT_OPTIONS, RunOptions, TrainingRun, derived_model, training_run
from exceiver.warm_start import transfer_weights

log = logging.getLogger(__name__)

MODES = ("full", "freeze", "scratch")
# Small label sets (a few dozen cells) give one step per epoch: their cells are repeated so that an
# epoch has at least this many steps, and early stopping judges real progress.
MIN_STEPS_PER_EPOCH = 20
# Full fine-tuning: pretrained weights learn at this fraction of the new class head's rate, the
# usual guard against overwriting them while the head is random. Measured (benchmarks/finetune_lr.py,
# 3 tasks x 2 models, 45 s runs) it is level with 1.0 within noise (mean query macro-F1 0.883 vs 0.889).
PRETRAINED_LR_MULT = 0.1


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


def classifier_module(base: Exceiver, n_classes: int, *, from_scratch: bool, seed: int,
                      class_input: str = "token") -> ExceiverModule:
    """The base model's architecture with a new class head of `n_classes` reading `class_input`
    and without the heads of pretraining-only objectives (the classifier trains cross-entropy +
    masked MSE); pretrained weights everywhere else unless `from_scratch`."""
    config = dataclasses.replace(base.config, n_classes=n_classes, class_input=class_input, detection_head=False,
                                 projection_head=False)
    torch.manual_seed(seed)
    module = ExceiverModule(config)
    if from_scratch:
        module.init_value_offsets(torch.from_numpy(base.scaler.expressed_mean), base.scaler.mean_expressed_value)
        return module
    # A base that is itself a classifier brings a head for other classes: the new one starts afresh.
    transfer_weights(base.module, module, fresh=("class_head",))
    return module


class LabelSplit(NamedTuple):
    """The labelled cells' classes, their split into training and validation cells, the class
    weights, and what metrics.json says of them (`about`)."""

    codes: np.ndarray
    classes: list[str]
    train_rows: np.ndarray
    val_rows: np.ndarray
    weights: np.ndarray
    about: dict


def finetune(
    model: Exceiver | str | Path,
    adata: ad.AnnData | str | Path,
    label_key: str,
    out: str | Path | None = None,
    *,
    mode: str = "full",
    class_loss_weight: float = 1.0,
    expression_loss_weight: float = 1.0,
    pretrained_lr_mult: float = PRETRAINED_LR_MULT,
    min_cells_per_class: int = 3,
    overwrite: bool = False,
    progress: bool = True,
    gene_key: str | None = None,
    layer: str | None = None,
    gene_map: str | Path | pd.DataFrame | None = None,
    allow_non_integer: bool = False,
    **options: Unpack[RunOptions],
) -> Exceiver:
    """Train a cell classifier from a pretrained model folder (or Exceiver) and labelled cells.

    Parameters
    ----------
    model
        The pretrained model (a folder, a shipped model's name or an `Exceiver`).
    adata
        Raw counts with labels (AnnData or an .h5ad path).
    out
        The classifier's folder; None keeps it in memory only.
    mode
        "full" (fine-tune everything), "freeze" (a linear probe of the frozen cell embedding,
        fitted in closed form: of the training options only seed and val_fraction apply) or
        "scratch" (random initialisation, the architecture of "full").
    class_loss_weight, expression_loss_weight
        Weights of cross-entropy and masked-expression MSE.
    pretrained_lr_mult
        In "full", the learning rate of the pretrained weights as a fraction of
        the new class head's.
    label_key, min_cells_per_class
        The obs column of labels; cells without a label are left out
        (a logged warning counts them), and every class needs `min_cells_per_class` labelled cells
        (`exceiver.data.labels.cell_labels`, as in `evaluate`).
    gene_key, layer, gene_map, allow_non_integer
        How the cells are read (`Exceiver.read`; each
        left out keeps what the model remembers: mouse cells through a human+mouse model's own
        gene map need no `gene_map`).
    overwrite, resume, checkpoint_minutes, keep_checkpoints
        As for `pretrain` (replace an
        output exceiver wrote; continue an interrupted run; checkpoint this often).
    **options
        resume, checkpoint_minutes, keep_checkpoints and the fields of `TrainingConfig`
        (max_epochs, max_minutes, batch_size, seed, ...): `RunOptions`.

    Returns
    -------
    The classifier (also written to `out` unless it is None).
    """
    _check_finetuning(mode, class_loss_weight, expression_loss_weight, pretrained_lr_mult, min_cells_per_class,
                      resume=options.get("resume", False))
    with training_run(out, options, overwrite=overwrite, progress=progress) as run:  # refused now, not after the work
        base = model if isinstance(model, Exceiver) else Exceiver.load(model)
        [(name, adata)] = read_datasets(adata)
        labels = cell_labels(adata.obs, label_key, min_cells=min_cells_per_class, name=name)
        if not labels.labelled.all():
            adata = adata[labels.labelled]
        reading = {"gene_key": gene_key, "layer": layer, "gene_map": gene_map, "allow_non_integer": allow_non_integer,
                   "name": name}
        split = _label_split(labels, mode, run.settings)
        base_model = "in memory" if isinstance(model, Exceiver) else str(model)
        if mode == "freeze":
            unused = sorted(set(options) - set(CHECKPOINT_OPTIONS) - {"seed", "val_fraction"})
            if unused:
                log.info("the linear probe is fitted in closed form: %s do not apply", ", ".join(unused))
            result = _probe_classifier(base, adata, split, run, base_model=base_model, reading=reading)
            if out is not None:
                result.save(out, overwrite=overwrite)
        else:
            losses = {"class_loss_weight": class_loss_weight, "expression_loss_weight": expression_loss_weight,
                      **({} if mode == "scratch" else {"pretrained_lr_mult": pretrained_lr_mult})}
            result = _train_classifier(base, adata, split, run, mode=mode, losses=losses, base_model=base_model,
                                       reading=reading)
    log.info("validation accuracy %.3f, macro-F1 %.3f (%s, %d training cells)", result.metrics["val_accuracy"],
             result.metrics["val_macro_f1"], mode, len(split.train_rows))
    return result


def _check_finetuning(mode: str, class_loss_weight: float, expression_loss_weight: float, pretrained_lr_mult: float,
                      min_cells_per_class: int, *, resume: bool) -> None:
    """Settings refused before any work."""
    if mode not in MODES:
        raise ExceiverInputError(f"unknown fine-tuning mode {mode!r}; choose one of {MODES}")
    if class_loss_weight <= 0 or expression_loss_weight < 0 or pretrained_lr_mult <= 0:
        raise ExceiverInputError(f"{option('class_loss_weight')} and {option('pretrained_lr_mult')} must be > 0 and "
                                 f"{option('expression_loss_weight')} >= 0")
    if min_cells_per_class < 2:
        raise ExceiverInputError(f"{option('min_cells_per_class')} must be >= 2 (each class needs a training and a "
                                 "validation cell)")
    if mode == "freeze" and resume:
        raise ExceiverInputError(f"a linear probe ({option('mode', 'freeze')}) is fitted in one pass: there is nothing "
                                 f"to resume; run it without {option('resume', True)}")


def _label_split(labels: CellLabels, mode: str, settings: TrainingConfig) -> LabelSplit:
    """The labelled cells split by class (seeded), with balanced weights of the training cells' classes."""
    codes, classes = labels.codes, labels.classes
    train_rows, val_rows = split_by_class(codes, settings.val_fraction, settings.seed)
    weights = balanced_class_weights(codes[train_rows], len(classes))
    train_counts = np.bincount(codes[train_rows], minlength=len(classes))
    about = {"mode": mode, "label_key": labels.key, "n_train_cells": len(train_rows), "n_val_cells": len(val_rows),
             "n_unlabelled_cells": int((~labels.labelled).sum()),
             "train_cells_per_class": {c: int(n) for c, n in zip(classes, train_counts)},
             "class_weights": {c: round(float(w), 4) for c, w in zip(classes, weights)}}
    return LabelSplit(codes, classes, train_rows, val_rows, weights, about)


def _probe_classifier(base: Exceiver, adata: ad.AnnData, split: LabelSplit, run: TrainingRun, *, base_model: str,
                      reading: dict) -> Exceiver:
    """"freeze": the base with a linear class head on its cell embedding, fitted on the training
    cells; its metrics are the validation metrics that `ClassifierPlan` reports."""
    start = time.monotonic()
    n_classes = len(split.classes)
    embedding = base.embed(adata, inplace=False, progress=run.progress, **reading)
    weight, bias = linear_probe(embedding[split.train_rows], split.codes[split.train_rows], n_classes)
    module = classifier_module(base, n_classes, from_scratch=False, seed=0, class_input=base.module.default_pooling)
    with torch.no_grad():
        module.class_head.weight.copy_(torch.from_numpy(weight))
        module.class_head.bias.copy_(torch.from_numpy(bias))
        logits = module.class_head(torch.from_numpy(embedding[split.val_rows])).double()
    module.eval()
    truth = split.codes[split.val_rows]
    cell_losses = F.cross_entropy(logits, torch.from_numpy(truth), reduction="none").numpy()
    cell_weights = split.weights[truth]
    predicted = logits.argmax(1).numpy()
    metrics = {"val_class_loss": float((cell_losses * cell_weights).sum() / cell_weights.sum()),
               "val_accuracy": float((predicted == truth).mean()),
               "val_macro_f1": float(f1_score(truth, predicted, labels=np.arange(n_classes), average="macro",
                                              zero_division=0)),
               "seconds": round(time.monotonic() - start, 1)}
    used = {"mode": "freeze", "seed": run.settings.seed, "val_fraction": run.settings.val_fraction,
            "probe": "logistic regression, balanced class weights, standardised cell embedding",
            "base_model": base_model}
    return derived_model(base, module=module, objectives=ObjectiveConfig(), training=used,
                         metrics={**metrics, **split.about}, classes=split.classes, **remembered(base, reading))


def _train_classifier(base: Exceiver, adata: ad.AnnData, split: LabelSplit, run: TrainingRun, *, mode: str,
                      losses: dict, base_model: str, reading: dict) -> Exceiver:
    """A class-token classifier trained by `ClassifierPlan` ("full" or "scratch"); `losses`: the
    loss weights and, in "full", `pretrained_lr_mult`."""
    cells = base.read(adata, **reading).in_memory()
    validation = np.zeros(len(split.codes), dtype=bool)
    validation[split.val_rows] = True
    settings = run.settings
    run.seed()
    module = classifier_module(base, len(split.classes), from_scratch=mode == "scratch", seed=settings.seed)
    plan = ClassifierPlan(module, settings, split.codes, split.weights, class_loss_weight=losses["class_loss_weight"],
                          expression_loss_weight=losses["expression_loss_weight"],
                          pretrained_lr_mult=losses.get("pretrained_lr_mult"))
    # The classifier's masked-value term queries masked genes only: no zero genes, no detection.
    tokenizer = dataclasses.replace(base.tokenizer, zero_query_ratio=0.0)
    datamodule = CellDataModule(cells, base.scaler, tokenizer, validation, batch_size=settings.batch_size,
                                num_workers=settings.num_workers, seed=settings.seed,
                                masked=losses["expression_loss_weight"] > 0, masked_validation=False,
                                min_train_cells=MIN_STEPS_PER_EPOCH * settings.batch_size)
    identity = {"command": "finetune", "mode": mode, "label_key": split.about["label_key"], "classes": split.classes,
                **losses, "training": settings.to_dict(), "n_cells": int(len(split.codes)),
                "genes": base.vocab.fingerprint(), "base_weights": base.fingerprint()}
    used = {**settings.to_dict(), "mode": mode, **losses, "base_model": base_model}
    return run.fit(plan, datamodule, identity=identity, model=lambda metrics: derived_model(
        base, module=module, tokenizer=tokenizer, objectives=ObjectiveConfig(), training=used,
        metrics={**metrics, **split.about}, classes=split.classes, **remembered(base, reading)))


def remembered(base: Exceiver, reading: dict) -> dict:
    """How the classifier reads data: the base's contract with the reading options this run was
    given (a gene map's pairs before the base's own), so that `predict` reads new cells as
    fine-tuning read these."""
    pairs = GenePairs.of(reading.get("gene_map"))
    return {"gene_key": reading.get("gene_key") or base.gene_key, "layer": reading.get("layer") or base.layer,
            "allow_non_integer": bool(reading.get("allow_non_integer")) or base.allow_non_integer,
            "gene_map": base.gene_map if pairs is None else pairs.before(base.contract.gene_map).table}
