"""Which cells train and which validate, and the one LightningDataModule that serves them from any
cell source.

Cells in memory (`CellCounts`) are drawn by index, in length-grouped batches that are the same
global batches whatever the number of processes; a source on disk (an on-disk corpus, a backed
`.h5ad`) is streamed in blocks, since it cannot be read at random. Both split by the same rule
(`validation_cells`, a seeded hash of the row number) and skip validation cells that the model's
genes leave without tokens, so the same files and seed give the same training and validation
cells either way.
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from exceiver.data.cells import CellCounts
from exceiver.data.loaders import CellBatcher, cell_loader, training_loader
from exceiver.data.preprocess import GeneScaler
from exceiver.data.streams import EpochLoader, OrderedBatches, ShuffledBatches
from exceiver.data.tokenizer import CellBatch, TokenizerConfig, mix64
from exceiver.errors import ExceiverInputError


def validation_cells(n_cells: int, val_fraction: float, seed: int) -> np.ndarray:
    """True for validation cells: a seeded hash of the row number puts about `val_fraction` of
    them there (the same rule for a corpus of millions, whose cells are never all in memory), with
    at least one cell on each side."""
    if n_cells < 2:
        raise ExceiverInputError(f"training needs at least 2 cells (training and validation), got {n_cells}")
    keys = mix64(np.arange(n_cells).astype(np.uint64) ^ mix64(np.uint64(seed)))
    uniform = (keys >> np.uint64(11)).astype(np.float64) * 2.0**-53
    validation = uniform < val_fraction
    if not validation.any():
        validation[np.argmin(uniform)] = True
    if validation.all():
        validation[np.argmax(uniform)] = False
    return validation


class _Rows:
    """Picklable (for loader workers): True at the rows of one side of the split."""

    def __init__(self, selected: np.ndarray):
        self.selected = selected

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return self.selected[rows]


class _GenesOf:
    """Picklable: keep only the model's genes (the others have untrained embeddings)."""

    def __init__(self, genes: np.ndarray | None):
        self.genes = genes

    def __call__(self, cells: CellCounts) -> CellCounts:
        return cells if self.genes is None else cells.keep_genes(self.genes)


class CellDataModule(L.LightningDataModule):
    """Training and validation batches of a cell source.

    validation: bool per cell of the source (`validation_cells`, or a stratified split of labels).
    genes: bool mask of the vocabulary genes to keep (the model's trained genes); None keeps all.
    masked: training batches carry the pretraining task's queries; `masked_validation` (default:
        as `masked`) sets it for validation alone (a classifier is judged on whole cells).
    min_train_cells: an epoch repeats the training cells up to this many (small label sets would
        otherwise give one step per epoch, too few for early stopping to judge progress).
    """

    def __init__(self, source, scaler: GeneScaler, tokenizer: TokenizerConfig, validation: np.ndarray, *,
                 batch_size: int, num_workers: int = 0, seed: int = 0, genes: np.ndarray | None = None,
                 masked: bool = True, masked_validation: bool | None = None, min_train_cells: int = 0):
        super().__init__()
        self.scaler, self.tokenizer = scaler, tokenizer
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.masked = masked
        self.masked_validation = masked if masked_validation is None else masked_validation
        self.validation = np.asarray(validation, dtype=bool)
        if len(self.validation) != source.n_cells:
            raise ValueError(f"validation has {len(self.validation)} entries for {source.n_cells} cells")
        self.prepare = _GenesOf(genes)
        self.in_memory = isinstance(source, CellCounts)
        if self.in_memory:
            self.source = self.prepare(source)
            has_tokens = self.source.n_genes_expressed > 0
            self.train_rows = np.flatnonzero(~self.validation & has_tokens)
            self.val_rows = np.flatnonzero(self.validation & has_tokens)
            if min_train_cells > len(self.train_rows):
                self.train_rows = np.resize(self.train_rows, min_train_cells)
            self.n_train_cells = len(self.train_rows)
        else:
            self.source = source
            blocks = source.blocks()
            repeat = max(1, math.ceil(min_train_cells / max(1, int((~self.validation).sum()))))
            self.train_stream = ShuffledBatches(source, scaler, tokenizer, blocks=np.tile(blocks, (repeat, 1)),
                                                keep=_Rows(~self.validation), batch_size=batch_size, seed=seed,
                                                prepare=self.prepare, masked=masked)
            self.n_train_cells = self.train_stream.n_cells

    def transfer_batch_to_device(self, batch: CellBatch, device: torch.device, dataloader_idx: int) -> CellBatch:
        return batch.to(device)

    def train_dataloader(self) -> DataLoader:
        if not self.in_memory:
            return EpochLoader(self.train_stream, num_workers=self.num_workers, consumed=self._consumed)
        batcher = CellBatcher(self.source, self.scaler, self.tokenizer, masked=self.masked)
        return training_loader(self.source, self.train_rows, batcher, batch_size=self.batch_size, seed=self.seed,
                               consumed=self._consumed, num_workers=self.num_workers)

    def _consumed(self) -> int:
        """Training batches of the current epoch that the trainer has taken (for checkpoints,
        which are saved after a step)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self) -> DataLoader:
        salt = self.seed + 1  # fixed masks: every validation round judges the same queries
        if not self.in_memory:
            stream = OrderedBatches(self.source, self.scaler, self.tokenizer, batch_size=self.batch_size,
                                    masked=self.masked_validation, salt=salt, prepare=self.prepare,
                                    keep=_Rows(self.validation))
            return EpochLoader(stream, num_workers=self.num_workers)
        batcher = CellBatcher(self.source, self.scaler, self.tokenizer, masked=self.masked_validation, salt=salt)
        return cell_loader(self.source, self.val_rows, batcher, batch_size=self.batch_size,
                           num_workers=self.num_workers)
