"""Datasets and loaders: cell indices in, tokenized `CellBatch`es out (built in loader workers)."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from exceiver.model import ExceiverConfig
from exceiver.preprocess import GeneScaler
from exceiver.tokenize import CellBatch, make_batch
from exceiver.vocab import CellCounts


class CellIndexDataset(Dataset):
    """Items are cell indices; the collate function tokenizes a whole batch at once (vectorised)."""

    def __init__(self, rows: np.ndarray):
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> int:
        return int(self.rows[i])


class CellBatcher:
    """Collate function. With `salt=None` each batch draws fresh masks (training); a fixed salt
    gives every cell the same masks in every epoch (validation)."""

    def __init__(self, cells: CellCounts, scaler: GeneScaler, config: ExceiverConfig, *,
                 masked: bool, salt: int | None = None):
        self.cells, self.scaler, self.salt = cells, scaler, salt
        self.kwargs = dict(
            pad_id=config.n_genes,
            max_tokens=config.max_tokens,
            mask_fraction=config.mask_fraction if masked else 0.0,
            zero_query_ratio=config.zero_query_ratio if masked else 0.0,
        )

    def __call__(self, rows: list[int]) -> CellBatch:
        salt = self.salt if self.salt is not None else int(torch.randint(0, 2**62, ()).item())
        return make_batch(self.cells, np.asarray(rows), self.scaler, salt=salt, **self.kwargs)


def cell_loader(cells: CellCounts, rows: np.ndarray, batcher: CellBatcher, *, batch_size: int,
                shuffle: bool = False, num_workers: int = 0) -> DataLoader:
    return DataLoader(
        CellIndexDataset(rows), batch_size=batch_size, shuffle=shuffle, collate_fn=batcher,
        num_workers=num_workers, persistent_workers=num_workers > 0,
    )


def split_cells(n_cells: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of cell indices into training and validation."""
    if n_cells < 2:
        raise ValueError(f"pretraining needs at least 2 cells, got {n_cells}")
    order = np.random.default_rng(seed).permutation(n_cells)
    n_val = min(max(1, round(val_fraction * n_cells)), n_cells - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class PretrainDataModule(L.LightningDataModule):
    def __init__(self, cells: CellCounts, scaler: GeneScaler, config: ExceiverConfig,
                 train_rows: np.ndarray, val_rows: np.ndarray, *, batch_size: int,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.cells, self.scaler, self.config = cells, scaler, config
        self.train_rows, self.val_rows = train_rows, val_rows
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def transfer_batch_to_device(self, batch: CellBatch, device: torch.device, dataloader_idx: int) -> CellBatch:
        return batch.to(device)

    def train_dataloader(self) -> DataLoader:
        batcher = CellBatcher(self.cells, self.scaler, self.config, masked=True)
        return cell_loader(self.cells, self.train_rows, batcher, batch_size=self.batch_size,
                           shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        batcher = CellBatcher(self.cells, self.scaler, self.config, masked=True, salt=self.seed + 1)
        return cell_loader(self.cells, self.val_rows, batcher, batch_size=self.batch_size,
                           num_workers=self.num_workers)
