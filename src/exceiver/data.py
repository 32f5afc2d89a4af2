"""Datasets and loaders: cell indices in, tokenized `CellBatch`es out (built in loader workers)."""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from exceiver.errors import ExceiverInputError
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
    gives every cell the same masks in every epoch (validation).

    Fresh salts come from (seed, loader worker, batch number), not from the global RNG: Lightning
    reseeds that when a distributed run starts, and then each process's half of a global batch
    would be masked unlike the same cells in a one-process run."""

    def __init__(self, cells: CellCounts, scaler: GeneScaler, config: ExceiverConfig, *,
                 masked: bool, salt: int | None = None, seed: int = 0):
        self.cells, self.scaler, self.salt = cells, scaler, salt
        self.seed, self.n_batches = seed, 0
        self.kwargs = dict(
            pad_id=config.n_genes,
            max_tokens=config.max_tokens,
            mask_fraction=config.mask_fraction if masked else 0.0,
            zero_query_ratio=config.zero_query_ratio if masked else 0.0,
            all_genes=config.paper_compatible, depth_tokens=config.depth_tokens,
            ranks=config.value_encoding == "rank",
        )

    def __call__(self, rows: list[int]) -> CellBatch:
        salt = self.salt
        if salt is None:
            worker = get_worker_info()
            salt = int(np.random.default_rng([self.seed, worker.id if worker else 0, self.n_batches]).integers(2**62))
            self.n_batches += 1
        return make_batch(self.cells, np.asarray(rows), self.scaler, salt=salt, **self.kwargs)


class LengthGroupedSampler(Sampler[int]):
    """Cell order in which consecutive `batch_size` cells have similar numbers of expressed genes,
    so that batches carry little padding (on a mixed 9.9k-cell corpus, padding fell from 69% to 12%
    of tokens and training ran 2x faster).

    shuffle=True (training): each epoch, shuffled cells are cut into chunks, each chunk is sorted
    by length, and this process's batches are shuffled; every cell is seen once per epoch.
    shuffle=False (validation, inference): longest cells first. Under distributed training the
    sorted cells are dealt round-robin, so each process's share is also sorted; for training the
    order is padded with repeated cells so that every process runs the same number of steps.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0, chunk: int = 64,
                 distributed: bool = True):
        self.lengths, self.batch_size, self.shuffle = np.asarray(lengths), batch_size, shuffle
        self.seed, self.chunk, self.epoch, self.distributed = seed, chunk, 0, distributed

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[np.ndarray]:
        """This process's batches of positions; only the last one may be short (so that the
        DataLoader, which cuts the order again, finds the same batches)."""
        n, size = len(self.lengths), self.batch_size
        rank, world = _rank_and_world_size() if self.distributed else (0, 1)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = rng.permutation(n)
            order = np.concatenate([order, order[: (-n) % world]])  # as many cells per process
            span = size * self.chunk * world
            for start in range(0, len(order), span):
                part = order[start:start + span]
                order[start:start + span] = part[np.argsort(self.lengths[part], kind="stable")]
        else:
            order = np.argsort(-self.lengths, kind="stable")
        mine = order[rank::world]
        batches = [mine[i:i + size] for i in range(0, len(mine), size)]
        if self.shuffle:
            n_full = len(mine) // size
            batches = [batches[i] for i in rng.permutation(n_full)] + batches[n_full:]
        return batches

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch.tolist()

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches())


def _rank_and_world_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def cell_loader(cells: CellCounts, rows: np.ndarray, batcher: CellBatcher, *, batch_size: int,
                shuffle: bool = False, seed: int = 0, num_workers: int = 0, distributed: bool = True) -> DataLoader:
    """Batches of `rows` of `cells`, grouped by length (see `LengthGroupedSampler`); with
    `distributed=False` this process sees every cell, even inside a distributed run."""
    sampler = LengthGroupedSampler(cells.n_genes_expressed[rows], batch_size, shuffle=shuffle, seed=seed,
                                   distributed=distributed)
    return DataLoader(
        CellIndexDataset(rows), batch_size=batch_size, sampler=sampler, collate_fn=batcher,
        num_workers=num_workers, persistent_workers=num_workers > 0,
    )


def split_cells(n_cells: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of cell indices into training and validation."""
    if n_cells < 2:
        raise ExceiverInputError(f"pretraining needs at least 2 cells (training and validation), got {n_cells}")
    order = np.random.default_rng(seed).permutation(n_cells)
    n_val = min(max(1, round(val_fraction * n_cells)), n_cells - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class PretrainDataModule(L.LightningDataModule):
    """Training and validation batches of cells; `masked=False` gives whole cells (no queries),
    for objectives that need no masked genes; `masked_validation` (default: as `masked`) sets it for
    validation alone (a classifier is judged on whole cells, as it will be used)."""

    def __init__(self, cells: CellCounts, scaler: GeneScaler, config: ExceiverConfig,
                 train_rows: np.ndarray, val_rows: np.ndarray, *, batch_size: int,
                 num_workers: int = 0, seed: int = 0, masked: bool = True, masked_validation: bool | None = None):
        super().__init__()
        self.cells, self.scaler, self.config = cells, scaler, config
        self.train_rows, self.val_rows = train_rows, val_rows
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.masked = masked
        self.masked_validation = masked if masked_validation is None else masked_validation

    def transfer_batch_to_device(self, batch: CellBatch, device: torch.device, dataloader_idx: int) -> CellBatch:
        return batch.to(device)

    def train_dataloader(self) -> DataLoader:
        batcher = CellBatcher(self.cells, self.scaler, self.config, masked=self.masked, seed=self.seed)
        return cell_loader(self.cells, self.train_rows, batcher, batch_size=self.batch_size,
                           shuffle=True, seed=self.seed, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        batcher = CellBatcher(self.cells, self.scaler, self.config, masked=self.masked_validation, salt=self.seed + 1)
        return cell_loader(self.cells, self.val_rows, batcher, batch_size=self.batch_size,
                           num_workers=self.num_workers)
