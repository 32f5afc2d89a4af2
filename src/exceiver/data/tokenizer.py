"""Sparse cells -> padded token batches and decoder queries.

A cell's tokens are its *expressed* genes only: zero-count genes never become tokens, so the cost
of a cell follows its number of expressed genes, not the vocabulary size. For pretraining, a
fraction of each cell's expressed genes is masked: those genes are removed from the encoder's
tokens altogether (their values cannot reach it) and become decoder queries with their values as
targets. Which genes are masked comes from a hash of (salt, the cell's set of expressed genes,
gene): a fixed salt gives a cell the same masks wherever it sits in a dataset or batch, and no
count influences which genes are masked.

Masked counts do not reach the encoder even through normalisation: tokens are normalised by the
library of the cell's unmasked genes divided by their expected share of it, (n - m) / n for m of n
genes masked at random (an unbiased estimate of the full library); targets use the full library,
as inference does.

Paper-compatible models (`all_genes=True`) see what the original release saw: every gene that the
cell's dataset measured is a token (zero-count genes flagged in `token_zero`), masked genes stay
in place as the zero padding vector with value 1, and tokens use the full library.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from exceiver.data.cells import CellCounts
from exceiver.data.preprocess import GeneScaler, log_normalise
from exceiver.data.tokenizer_config import TokenizerConfig

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: uniform 64-bit keys from integers (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64) + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


@dataclass
class CellBatch:
    """Tensors for one batch of cells; `*_mask` tensors are True at real entries."""

    gene_ids: torch.Tensor  # [B, L] int64 encoder tokens (padding id where masked out)
    values: torch.Tensor  # [B, L] float32 token values
    token_mask: torch.Tensor  # [B, L] bool
    token_zero: torch.Tensor  # [B, L] bool: a zero-count gene token (paper-compatible batches only)
    query_ids: torch.Tensor  # [B, Q] int64 decoder query genes
    targets: torch.Tensor  # [B, Q] float32 values to predict
    query_mask: torch.Tensor  # [B, Q] bool
    query_is_zero: torch.Tensor  # [B, Q] bool: a sampled zero-count gene, not a masked one
    cells: torch.Tensor  # [B] int64 index of each cell in its CellCounts
    # The whole cell's raw counts, for the count objective (empty unless `count_targets`):
    count_genes: torch.Tensor  # [B, E] int64: every expressed vocabulary gene (padding id elsewhere)
    counts: torch.Tensor  # [B, E] float32: their raw counts (0 at padding)
    library: torch.Tensor  # [B] float32: total counts over the vocabulary genes
    measured: torch.Tensor  # [B, G] bool: the genes the cell's dataset measured

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CellBatch:
        return CellBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                            for f in fields(self)})

    def __len__(self) -> int:
        return self.gene_ids.shape[0]


def masked_count(n_expressed: np.ndarray, mask_fraction: float, max_tokens: int) -> np.ndarray:
    """Genes to mask per cell: the fraction of its expressed genes, at least one, always leaving
    one gene visible; capped like the token count so that huge cells do not dominate a batch."""
    if mask_fraction <= 0:
        return np.zeros_like(n_expressed)
    cap = max(1, round(mask_fraction * max_tokens))
    m = np.clip(np.rint(mask_fraction * n_expressed), 1, cap).astype(np.int64)
    return np.where(n_expressed >= 2, np.minimum(m, n_expressed - 1), 0)


def make_batch(
    cells: CellCounts,
    rows: np.ndarray,
    scaler: GeneScaler,
    tokenizer: TokenizerConfig,
    *,
    masked: bool = False,
    salt: int = 0,
) -> CellBatch:
    """Tokenize cells `rows` of `cells` (vectorised over all their non-zero entries); `masked`:
    with the pretraining task's masked genes (and sampled zero genes) as queries, else whole cells.
    The padding id is the vocabulary size (the model's fixed zero vector)."""
    max_tokens, all_genes = tokenizer.token_cap(masked), tokenizer.all_genes
    want_counts = masked and tokenizer.count_targets
    mask_fraction = tokenizer.mask_fraction if masked else 0.0
    zero_query_ratio = tokenizer.zero_query_ratio if masked else 0.0
    pad_id = cells.counts.shape[1]
    rows = np.asarray(rows, dtype=np.int64)
    counts = cells.counts
    starts, ends = counts.indptr[rows], counts.indptr[rows + 1]
    n_expr = (ends - starts).astype(np.int64)
    n_cells, total = len(rows), int(n_expr.sum())
    offsets = np.cumsum(n_expr) - n_expr
    entry_cell = np.repeat(np.arange(n_cells), n_expr)
    entry = np.arange(total) - offsets[entry_cell] + starts[entry_cell]
    genes = counts.indices[entry].astype(np.int64)
    entry_counts = counts.data[entry]
    library = np.bincount(entry_cell, weights=entry_counts, minlength=n_cells)  # this batch's cells only

    n_masked = masked_count(n_expr, mask_fraction, max_tokens)
    n_visible = n_expr - n_masked if all_genes else np.minimum(n_expr - n_masked, max_tokens)
    cell_keys = mix64(_cell_keys(genes, offsets, n_expr) ^ mix64(np.uint64(salt % 2**64)))
    if mask_fraction > 0 or (n_visible < n_expr - n_masked).any():
        # A random order per cell: the first genes are masked, the next ones are tokens.
        order = np.lexsort((mix64(cell_keys[entry_cell] ^ genes.astype(np.uint64)), entry_cell))
        genes, entry_counts = genes[order], entry_counts[order]
    rank = np.arange(total) - offsets[entry_cell]
    masked = rank < n_masked[entry_cell]
    visible = ~masked & (rank < (n_masked + n_visible)[entry_cell])
    masked_library = np.bincount(entry_cell[masked], weights=entry_counts[masked], minlength=n_cells)
    token_library = library if all_genes else (library - masked_library) * n_expr / np.maximum(n_expr - n_masked, 1)
    values = np.zeros(total, dtype=np.float32)
    for entries, cell_library in ((visible, token_library), (masked, library)):
        values[entries] = scaler.values(genes[entries], log_normalise(
            entry_counts[entries], cell_library[entry_cell[entries]], scaler.target_sum))

    if all_genes:
        gene_ids, token_values, token_mask, token_zero = _all_gene_tokens(
            cells, rows, scaler, genes, values, entry_cell, masked, pad_id)
    else:
        width = int(n_visible.max()) if n_cells else 0
        gene_ids = np.full((n_cells, width), pad_id, dtype=np.int64)
        token_values = np.zeros((n_cells, width), dtype=np.float32)
        token_mask = np.zeros((n_cells, width), dtype=bool)
        token_zero = np.zeros((n_cells, width), dtype=bool)
        cell_v, slot_v = entry_cell[visible], (rank - n_masked[entry_cell])[visible]
        gene_ids[cell_v, slot_v] = genes[visible]
        token_values[cell_v, slot_v] = values[visible]
        token_mask[cell_v, slot_v] = True

    zero_cell, zero_genes = _sample_zero_genes(
        cells, rows, np.rint(zero_query_ratio * n_masked).astype(np.int64), genes, entry_cell,
        cell_keys,
    )
    n_zero = np.bincount(zero_cell, minlength=n_cells)
    n_queries = n_masked + n_zero
    q_width = int(n_queries.max()) if n_cells else 0
    query_ids = np.full((n_cells, q_width), pad_id, dtype=np.int64)
    targets = np.zeros((n_cells, q_width), dtype=np.float32)
    query_mask = np.zeros((n_cells, q_width), dtype=bool)
    query_is_zero = np.zeros((n_cells, q_width), dtype=bool)
    cell_q, slot_q = entry_cell[masked], rank[masked]
    query_ids[cell_q, slot_q] = genes[masked]
    targets[cell_q, slot_q] = values[masked]
    query_mask[cell_q, slot_q] = True
    if len(zero_cell):
        zero_offsets = np.cumsum(n_zero) - n_zero
        slot_z = n_masked[zero_cell] + np.arange(len(zero_cell)) - zero_offsets[zero_cell]
        query_ids[zero_cell, slot_z] = zero_genes
        targets[zero_cell, slot_z] = scaler.zero_values(zero_genes)
        query_mask[zero_cell, slot_z] = True
        query_is_zero[zero_cell, slot_z] = True

    whole = _count_targets(cells, rows, genes, entry_counts, entry_cell, rank, n_expr, library, pad_id,
                           want_counts)
    return CellBatch(
        torch.from_numpy(gene_ids), torch.from_numpy(token_values), torch.from_numpy(token_mask),
        torch.from_numpy(token_zero), torch.from_numpy(query_ids), torch.from_numpy(targets), torch.from_numpy(query_mask),
        torch.from_numpy(query_is_zero), torch.from_numpy(rows), *(torch.from_numpy(x) for x in whole),
    )


def _count_targets(cells: CellCounts, rows: np.ndarray, genes: np.ndarray, entry_counts: np.ndarray,
                   entry_cell: np.ndarray, rank: np.ndarray, n_expr: np.ndarray, library: np.ndarray, pad_id: int,
                   wanted: bool) -> tuple[np.ndarray, ...]:
    """Every expressed gene of each cell with its raw count, the library and the measured genes:
    what the count objective reconstructs (the whole cell, whichever genes were tokens)."""
    n_cells = len(rows)
    if not wanted:
        return (np.zeros((n_cells, 0), np.int64), np.zeros((n_cells, 0), np.float32),
                library.astype(np.float32), np.zeros((n_cells, 0), bool))
    width = int(n_expr.max()) if n_cells else 0
    count_genes = np.full((n_cells, width), pad_id, dtype=np.int64)
    counts = np.zeros((n_cells, width), dtype=np.float32)
    count_genes[entry_cell, rank] = genes
    counts[entry_cell, rank] = entry_counts
    return count_genes, counts, library.astype(np.float32), cells.measured[cells.source[rows]]


def _all_gene_tokens(
    cells: CellCounts,
    rows: np.ndarray,
    scaler: GeneScaler,
    genes: np.ndarray,
    values: np.ndarray,
    entry_cell: np.ndarray,
    masked: np.ndarray,
    pad_id: int,
) -> tuple[np.ndarray, ...]:
    """Tokens of every measured gene of each cell (the original's input), in gene order: zero-count
    genes carry the value of a zero count; masked genes become the padding id with value 1."""
    pool, offsets = cells.measured_pool
    n_genes = cells.counts.shape[1]
    sources = cells.source[rows].astype(np.int64)
    start, size = offsets[sources], offsets[sources + 1] - offsets[sources]
    width = int(size.max()) if len(rows) else 0
    slots = np.arange(width)
    real = slots[None, :] < size[:, None]
    gene_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    gene_ids[real] = pool[(start[:, None] + slots[None, :])[real]]
    token_values = np.zeros((len(rows), width), dtype=np.float32)
    token_values[real] = scaler.zero_values(gene_ids[real])
    token_zero = real.copy()
    # Each expressed gene's slot: its position in its dataset's sorted measured genes.
    slot = np.searchsorted(cells.measured_keys, sources[entry_cell] * n_genes + genes) - start[entry_cell]
    token_values[entry_cell, slot] = np.where(masked, 1.0, values)
    gene_ids[entry_cell[masked], slot[masked]] = pad_id
    token_zero[entry_cell, slot] = False
    return gene_ids, token_values, real, token_zero


def _cell_keys(genes: np.ndarray, offsets: np.ndarray, n_expr: np.ndarray) -> np.ndarray:
    """One 64-bit key per cell from its set of expressed genes, whatever its position."""
    keys = np.zeros(len(n_expr), dtype=np.uint64)
    nonempty = n_expr > 0
    if len(genes):
        keys[nonempty] = np.add.reduceat(mix64(genes), offsets[nonempty])  # wraps modulo 2**64
    return keys


def _sample_zero_genes(
    cells: CellCounts,
    rows: np.ndarray,
    n_zero: np.ndarray,
    expressed_genes: np.ndarray,
    entry_cell: np.ndarray,
    cell_keys: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Per cell, `n_zero` distinct genes that its dataset measured but the cell did not express."""
    if not n_zero.any():
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    n_genes = cells.counts.shape[1]
    pool, measured_offsets = cells.measured_pool
    sources = cells.source[rows]
    n_draws = np.where(n_zero > 0, 2 * n_zero + 16, 0)
    draw_cell = np.repeat(np.arange(len(rows)), n_draws)
    draw_index = np.arange(len(draw_cell)) - np.repeat(np.cumsum(n_draws) - n_draws, n_draws)
    pool_size = (measured_offsets[sources + 1] - measured_offsets[sources])[draw_cell]
    pick = mix64(cell_keys[draw_cell] ^ mix64(draw_index.astype(np.uint64) + np.uint64(1)))
    genes = pool[measured_offsets[sources][draw_cell] + (pick % pool_size.astype(np.uint64)).astype(np.int64)]
    keys = draw_cell * n_genes + genes
    expressed_keys = entry_cell * n_genes + expressed_genes
    expressed_keys.sort()
    pos = np.searchsorted(expressed_keys, keys).clip(max=max(len(expressed_keys) - 1, 0))
    is_zero = expressed_keys[pos] != keys if len(expressed_keys) else np.ones(len(keys), bool)
    _, first = np.unique(keys, return_index=True)
    unique = np.zeros(len(keys), dtype=bool)
    unique[first] = True
    keep = np.flatnonzero(is_zero & unique)
    kept_cell = draw_cell[keep]
    rank = np.arange(len(keep)) - np.searchsorted(kept_cell, kept_cell)
    take = keep[rank < n_zero[kept_cell]]
    return draw_cell[take], genes[take]
