"""Training plans (LightningModules) that own the optimisation of an `ExceiverModule`.

`TrainingPlan` holds what every run shares: the optimiser and its parameter groups, the warm-up
and cosine schedule, and the one mechanism that keeps the best validated weights. Subclasses say
what a step computes and how validation judges it: `PretrainingPlan` (the pretraining objectives,
judged against the gene-mean baseline) and `ClassifierPlan` (cross-entropy on the class token).
A run with an embedding monitor (train/monitor.py) scores its cell embedding in every validation
round too, and may keep the weights that score best.
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics

from exceiver.data.tokenizer import CellBatch
from exceiver.nn.config import ObjectiveConfig
from exceiver.nn.network import ExceiverModule
from exceiver.nn.objectives import count_nll, kl_weight_at, masked_mse, pretraining_loss
from exceiver.train.config import TrainingConfig
from exceiver.train.monitor import MONITOR_METRIC, EmbeddingMonitor


def lr_factor(step: int, warmup: int, planned: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio` at step `planned`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, planned - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _kind(name: str, param: torch.nn.Parameter) -> str:
    """A parameter's optimiser group: per-gene ("genes"), a matrix ("decay") or a vector ("no_decay")."""
    if name.startswith(("gene_emb", "gene_bias")):
        return "genes"
    return "decay" if param.dim() >= 2 else "no_decay"


class TrainingPlan(L.LightningModule):
    """Optimisation shared by every run; subclasses set `monitor` (their validation loss, lower is
    better) and end each validation round with `end_round`."""

    monitor: str

    def __init__(self, module: ExceiverModule, training: TrainingConfig, *,
                 pretrained_weights: frozenset[str] = frozenset(), pretrained_lr_mult: float = 1.0,
                 embedding_monitor: EmbeddingMonitor | None = None, frozen_rows: dict[str, int] | None = None):
        super().__init__()
        self.module, self.training_config, self.embedding_monitor = module, training, embedding_monitor
        # Parameters of which only the rows after the first N learn ({name: N}; query mapping:
        # new batches' rows): their gradients are zeroed on the first N rows after each backward
        # pass, and they take no weight decay (AdamW's would move the rows that get no gradient).
        self.frozen_rows = frozen_rows or {}
        # Weights that arrive trained (a classifier's encoder) learn at a fraction of the rate of
        # new ones (its class head), so that fine-tuning adapts what pretraining learned rather
        # than overwriting it while the head is still random.
        self.pretrained_weights, self.pretrained_lr_mult = pretrained_weights, pretrained_lr_mult
        self.planned_steps: int | None = None  # the schedule's horizon (a time budget re-plans it)
        self.warmup_steps = 0
        self.best_metrics: dict[str, float] = {}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.last_round_step: int | None = None  # the step of the last validation round

    @property
    def criterion(self) -> tuple[str, str]:
        """What early stopping and the kept weights follow: the metric, and "min" or "max" (whether
        lower or higher is better)."""
        if self.embedding_monitor is not None and self.embedding_monitor.selects:
            return MONITOR_METRIC, "max"
        return self.monitor, "min"

    def log_losses(self, total: torch.Tensor, parts: dict[str, torch.Tensor], batch_size: int, *,
                   parts_on_step: bool = True) -> None:
        for name, value in parts.items():
            self.log(f"train_{name}", value, on_step=parts_on_step, on_epoch=True, batch_size=batch_size,
                     sync_dist=True)
        self.log("train_loss", total, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size,
                 sync_dist=True)

    def end_round(self, metrics: dict[str, torch.Tensor]) -> None:
        """Log a validation round's metrics, with the embedding monitor's score where the run has
        a monitor, and keep the weights if they are the best so far."""
        if self.embedding_monitor is not None:
            metrics[MONITOR_METRIC] = torch.tensor(self.embedding_monitor.score(self.trainer), device=self.device)
        self.log_dict(metrics, prog_bar=True, sync_dist=True)
        self.last_round_step = self.global_step
        self.keep_if_best(metrics)

    def keep_if_best(self, metrics: dict[str, torch.Tensor]) -> None:
        """Keep the weights of the best validation round so far (by `criterion`) in memory.
        torchmetrics already reduced the metrics over processes, and the monitor's score is rank
        0's, so every process agrees."""
        name, mode = self.criterion
        value = float(metrics[name])
        best = self.best_metrics.get(name, math.inf if mode == "min" else -math.inf)
        improved = value < best if mode == "min" else value > best  # NaN never counts as best
        if not self.trainer.sanity_checking and improved:
            self.best_metrics = {k: float(v) for k, v in metrics.items()}
            self.best_metrics |= {"best_epoch": self.current_epoch, "best_step": self.global_step}
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """What a resumed run needs beyond the weights and optimiser: the schedule's horizon
        (a time budget re-plans it), the best validated weights so far and the last round's step."""
        checkpoint["exceiver_plan"] = {"planned_steps": self.planned_steps, "warmup_steps": self.warmup_steps,
                                       "best_metrics": self.best_metrics, "best_state": self.best_state,
                                       "last_round_step": self.last_round_step}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["exceiver_plan"]
        self.planned_steps, self.warmup_steps = state["planned_steps"], state["warmup_steps"]
        self.best_metrics, self.best_state = state["best_metrics"], state["best_state"]
        self.last_round_step = state.get("last_round_step")  # absent from checkpoints of earlier versions

    def on_after_backward(self) -> None:
        """Rows that do not learn get no gradient (before clipping measures the gradients)."""
        for name, n_rows in self.frozen_rows.items():
            grad = self.module.get_parameter(name).grad
            if grad is not None:
                grad[:n_rows] = 0

    def configure_optimizers(self):
        """AdamW with weight decay on matrices only, a larger rate for per-gene parameters, and
        `pretrained_lr_mult` times the rate for pretrained weights; one parameter group per
        (kind, pretrained), named so."""
        cfg = self.training_config
        if self.planned_steps is None:  # a fresh run (a resumed one has its own)
            self.planned_steps = int(self.trainer.estimated_stepping_batches)
            self.warmup_steps = min(cfg.warmup_steps, max(1, self.planned_steps // 10))
        kinds = {"decay": (cfg.weight_decay, 1.0), "no_decay": (0.0, 1.0), "genes": (0.0, cfg.gene_lr_mult)}
        trainable = [(name, param) for name, param in self.module.named_parameters() if param.requires_grad]
        groups = []
        for pretrained in (False, True):
            for kind, (weight_decay, lr_mult) in kinds.items():
                params = [param for name, param in trainable if (name in self.pretrained_weights) == pretrained
                          and ("no_decay" if name in self.frozen_rows else _kind(name, param)) == kind]
                if params:
                    lr = cfg.learning_rate * lr_mult * (self.pretrained_lr_mult if pretrained else 1.0)
                    groups.append({"name": ("pretrained " if pretrained else "") + kind, "params": params,
                                   "weight_decay": weight_decay, "lr": lr})
        optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, self.warmup_steps, self.planned_steps, cfg.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class PretrainingPlan(TrainingPlan):
    """The pretraining objectives; validation compares masked-value predictions with the gene-mean
    baseline (each masked gene predicted by its mean value over the training cells that express
    it) on exactly the same masked genes. With the count objective the kept weights are those of
    the lowest validation count loss (the bottleneck is the cell embedding users get), unless an
    embedding monitor selects them (`TrainingPlan.criterion`)."""

    def __init__(self, module: ExceiverModule, objectives: ObjectiveConfig, gene_means: torch.Tensor,
                 training: TrainingConfig, *, zero_queries: bool = False, batch_codes: np.ndarray | None = None,
                 embedding_monitor: EmbeddingMonitor | None = None, frozen_rows: dict[str, int] | None = None):
        super().__init__(module, training, embedding_monitor=embedding_monitor, frozen_rows=frozen_rows)
        # Each source row's batch (for a model with batches); the loaders' `batch.cells` index it.
        self.register_buffer("batch_codes", None if batch_codes is None else torch.as_tensor(batch_codes),
                             persistent=False)
        self.objectives = objectives
        self.monitor = "val_counts" if objectives.count_weight else "val_masked_mse"
        # Without a detection head the value head predicts zero genes too: judge that apart.
        self.judge_zeros = zero_queries and not objectives.detection_weight
        self.register_buffer("gene_means", torch.as_tensor(gene_means, dtype=torch.float32), persistent=False)
        self.val_mse = torchmetrics.MeanSquaredError()
        self.val_baseline_mse = torchmetrics.MeanSquaredError()
        self.val_pearson = torchmetrics.PearsonCorrCoef()
        self.val_explained_variance = torchmetrics.ExplainedVariance()
        self.val_zero_mse = torchmetrics.MeanSquaredError()
        self.val_counts = torchmetrics.MeanMetric()

    def training_step(self, batch: CellBatch, batch_idx: int) -> torch.Tensor:
        salt = (self.training_config.seed << 32) + self.global_step  # fresh contrastive views every step and seed
        kl_weight = kl_weight_at(self.objectives, self.global_step)
        record = pretraining_loss(self.module, batch, self.objectives, salt=salt, gather=self._gather_cells,
                                  batches=self._batches(batch), kl_weight=kl_weight)
        self.log_losses(record.total, {k: v for k, v in record.parts.items() if k != "masked_values"}, len(batch))
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        if self.objectives.bottleneck_kl:
            self.log("kl_weight", kl_weight, on_step=True, on_epoch=False)
        return record.total

    def _batches(self, batch: CellBatch) -> torch.Tensor | None:
        return None if self.batch_codes is None else self.batch_codes[batch.cells]

    def _gather_cells(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Rows of `x` from every process, in rank order, with gradients flowing back to each
        process's own rows; and the offset of this process's rows. Processes may hold different
        numbers of cells (a short last batch): rows are padded for the gather and dropped after."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return x, 0
        sizes = self.all_gather(torch.tensor(len(x), device=x.device)).reshape(-1).tolist()
        padded = F.pad(x, (0, 0, 0, max(sizes) - len(x)))
        gathered = self.all_gather(padded, sync_grads=True)  # [world, max rows, dim]
        rows = torch.cat([gathered[rank, :size] for rank, size in enumerate(sizes)])
        return rows, sum(sizes[:self.global_rank])

    def validation_step(self, batch: CellBatch, batch_idx: int) -> None:
        latents = self.module.encode(batch)
        if self.objectives.count_weight:
            self.val_counts.update(count_nll(self.module, latents, batch, self._batches(batch)))
        pred = self.module.predict_values(latents, batch.query_ids).float()
        masked = batch.query_mask & ~batch.query_is_zero
        y, y_hat = batch.targets[masked], pred[masked]
        self.val_mse.update(y_hat, y)
        self.val_baseline_mse.update(self.gene_means[batch.query_ids[masked]], y)
        if y.numel():  # PearsonCorrCoef refuses empty updates
            self.val_pearson.update(y_hat, y)
        self.val_explained_variance.update(y_hat, y)
        zeros = batch.query_mask & batch.query_is_zero
        self.val_zero_mse.update(pred[zeros], batch.targets[zeros])

    def on_validation_epoch_end(self) -> None:
        mse, baseline = self.val_mse.compute(), self.val_baseline_mse.compute()
        metrics = {"val_masked_mse": mse, "val_gene_mean_mse": baseline, "val_mse_ratio": mse / baseline,
                   "val_pearson": self.val_pearson.compute(),
                   "val_explained_variance": self.val_explained_variance.compute()}
        if self.judge_zeros:
            metrics["val_zero_mse"] = self.val_zero_mse.compute()
        if self.objectives.count_weight:
            metrics["val_counts"] = self.val_counts.compute()
        for metric in (self.val_mse, self.val_baseline_mse, self.val_pearson, self.val_explained_variance,
                       self.val_zero_mse, self.val_counts):
            metric.reset()
        self.end_round(metrics)


class ClassifierPlan(TrainingPlan):
    """Class-weighted cross-entropy on the class token (+ masked-value MSE); keeps the weights of
    the round with the lowest class-balanced validation cross-entropy, judged on whole cells as
    `predict` sees them. pretrained_lr_mult: the rate of every weight but the new class head, as a
    fraction of the head's (None: no weight is pretrained, the control from scratch)."""

    monitor = "val_class_loss"

    def __init__(self, module: ExceiverModule, training: TrainingConfig, labels: np.ndarray,
                 class_weights: np.ndarray, *, class_loss_weight: float, expression_loss_weight: float,
                 pretrained_lr_mult: float | None):
        pretrained = frozenset() if pretrained_lr_mult is None else frozenset(
            name for name, _ in module.named_parameters() if not name.startswith("class_head"))
        super().__init__(module, training, pretrained_weights=pretrained, pretrained_lr_mult=pretrained_lr_mult or 1.0)
        self.register_buffer("labels", torch.as_tensor(labels), persistent=False)
        self.register_buffer("class_weights", torch.as_tensor(class_weights), persistent=False)
        self.class_loss_weight, self.expression_loss_weight = class_loss_weight, expression_loss_weight
        n = module.config.n_classes
        self.val_accuracy = torchmetrics.classification.MulticlassAccuracy(n, average="micro")
        self.val_macro_f1 = torchmetrics.classification.MulticlassF1Score(n, average="macro")
        self.val_class_loss = torchmetrics.MeanMetric()
        if expression_loss_weight == 0:
            for name, param in module.named_parameters():
                if name.startswith(("value_head", "gene_bias")):
                    param.requires_grad = False  # unused without the expression loss (DDP wants no idle weights)

    def _losses(self, batch: CellBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(logits, per-cell class-weighted cross-entropy, predicted values of queried genes, labels)."""
        latents = self.module.encode(batch)
        logits = self.module.class_logits(latents)
        labels = self.labels[batch.cells]
        cell_losses = F.cross_entropy(logits.float(), labels, weight=self.class_weights, reduction="none")
        pred = self.module.predict_values(latents, batch.query_ids) if batch.query_ids.shape[1] else None
        return logits, cell_losses, pred, labels

    def training_step(self, batch: CellBatch, batch_idx: int) -> torch.Tensor:
        logits, cell_losses, pred, labels = self._losses(batch)
        parts = {"class_loss": cell_losses.sum() / self.class_weights[labels].sum()}  # the weighted mean
        loss = self.class_loss_weight * parts["class_loss"]
        if pred is not None and self.expression_loss_weight > 0:
            parts["masked_values"] = masked_mse(pred, batch.targets, batch.query_mask)
            loss = loss + self.expression_loss_weight * parts["masked_values"]
        self.log_losses(loss, parts, len(batch), parts_on_step=False)
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
        self.end_round(metrics)
