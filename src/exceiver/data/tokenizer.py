"""Sparse cells -> padded token batches and decoder queries.

A cell's tokens are its *expressed* genes only: zero-count genes never become tokens, so the cost
of a cell follows its number of expressed genes, not the vocabulary size. For pretraining, a
fraction of each cell's expressed genes is masked: those genes are removed from the encoder's
tokens altogether (their values cannot reach it) and become decoder queries with their values as
targets. Which genes are masked comes from a hash of (salt, the cell's set of expressed genes,
gene): a fixed salt gives a cell the same masks wherever it sits in a dataset or batch, and no
count influences which genes are masked.

A cell with more genes than the token cap keeps some (`token_selection`): a random subset, its highest
ranked (Geneformer's rank: counts choose, so a masked gene outranked the genes left out) or a draw
weighted by variability (inference: the most variable); masks are drawn at random among them.

Masked counts do not reach the encoder even through normalisation: tokens are normalised by the
library of the cell's unmasked genes, the genes the masks were drawn from counted at their
expected share of it, (n - m) / n for m of n genes masked at random (an unbiased estimate of the
full library); targets use the full library, as inference does.

Paper-compatible models (`all_genes=True`) see what the original release saw: every gene that the
cell's dataset measured is a token (zero-count genes flagged in `token_zero`), masked genes stay
in place as the zero padding vector with value 1, and tokens use the full library.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import scipy.sparse as sp
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
    """Tokenize cells `rows` of `cells`, vectorised over all their non-zero entries (no loop over
    cells: this runs for every training step).

    Parameters
    ----------
    cells
        Raw counts in vocabulary space.
    rows
        The cells to tokenize, in batch order.
    scaler
        Turns log-normalised expression into token values.
    tokenizer
        Token cap, mask fraction, zero-gene queries, paper-compatible tokens, count targets.
    masked
        With the pretraining task: masked genes (and sampled zero genes) are queries, else the
        whole cell is tokens and there are no queries.
    salt
        Chooses the masks (a fixed salt gives each cell the same masks wherever it sits).

    Returns
    -------
    CellBatch
        Padded tensors; the padding id is the vocabulary size (the model's fixed zero vector).
    """
    rows = np.asarray(rows, dtype=np.int64)
    pad_id = cells.counts.shape[1]
    entries = _expressed_entries(cells.counts, rows)
    entries, split = _mask_and_subsample(entries, scaler, tokenizer, masked, salt)
    values = _entry_values(entries, split, scaler, tokenizer.all_genes)
    if tokenizer.all_genes:
        tokens = _all_gene_tokens(cells, rows, scaler, entries, split.masked, values, pad_id)
    else:
        tokens = _expressed_tokens(entries, split, values, pad_id)
    zero_query_ratio = tokenizer.zero_query_ratio if masked else 0.0
    queries = _queries(cells, rows, scaler, entries, split, values, zero_query_ratio, pad_id)
    whole = _count_targets(cells, rows, entries, pad_id, wanted=masked and tokenizer.count_targets)
    return CellBatch(*(torch.from_numpy(x) for x in (*tokens, *queries, rows, *whole)))


@dataclass(frozen=True)
class _Entries:
    """The expressed (non-zero) entries of a batch's cells, flat, cell after cell."""

    genes: np.ndarray  # [N] int64 vocabulary id
    counts: np.ndarray  # [N] raw count
    cell: np.ndarray  # [N] int64 batch position of the entry's cell
    rank: np.ndarray  # [N] int64 position of the entry within its cell
    offsets: np.ndarray  # [B] int64 each cell's first entry
    n_expressed: np.ndarray  # [B] int64
    library: np.ndarray  # [B] float64 total counts over the vocabulary genes

    def reordered(self, order: np.ndarray) -> _Entries:
        """The same entries in another order that keeps each cell's entries together."""
        return replace(self, genes=self.genes[order], counts=self.counts[order])


@dataclass(frozen=True)
class _MaskSplit:
    """Which of each cell's expressed genes are masked (decoder queries) and which are tokens."""

    n_masked: np.ndarray  # [B] int64
    n_visible: np.ndarray  # [B] int64 tokens
    masked: np.ndarray  # [N] bool per entry
    visible: np.ndarray  # [N] bool per entry; neither: subsampled out beyond the token cap
    cell_keys: np.ndarray  # [B] uint64: the cell's random key under this salt
    n_drawn: np.ndarray  # [B] int64 genes masks were drawn from: all expressed unless a selection kept fewer
    undrawn_library: np.ndarray  # [B] float64 counts of the cell's genes outside them


def _expressed_entries(counts: sp.csr_matrix, rows: np.ndarray) -> _Entries:
    """The rows' non-zero entries, gathered with one index into the matrix (no row slicing)."""
    starts, ends = counts.indptr[rows], counts.indptr[rows + 1]
    n_expressed = (ends - starts).astype(np.int64)
    offsets = np.cumsum(n_expressed) - n_expressed
    cell = np.repeat(np.arange(len(rows)), n_expressed)
    rank = np.arange(int(n_expressed.sum())) - offsets[cell]
    entry = rank + starts[cell]
    entry_counts = counts.data[entry]
    library = np.bincount(cell, weights=entry_counts, minlength=len(rows))  # this batch's cells only
    return _Entries(counts.indices[entry].astype(np.int64), entry_counts, cell, rank, offsets, n_expressed,
                    library)


def _mask_and_subsample(
    entries: _Entries, scaler: GeneScaler, tokenizer: TokenizerConfig, masked: bool, salt: int
) -> tuple[_Entries, _MaskSplit]:
    """An order within each cell: its first `n_masked` genes are masked, the next `n_visible` are
    tokens, the rest left out; random, after the cell's selected genes (`_selected`) unless the
    selection is "random". Returns the reordered entries and the split."""
    max_tokens = tokenizer.token_cap(masked)
    mask_fraction = tokenizer.mask_fraction if masked else 0.0
    n_expressed = entries.n_expressed
    n_masked = masked_count(n_expressed, mask_fraction, max_tokens)
    n_unmasked = n_expressed - n_masked
    n_visible = n_unmasked if tokenizer.all_genes else np.minimum(n_unmasked, max_tokens)
    cell_keys = mix64(_cell_keys(entries.genes, entries.offsets, n_expressed) ^ mix64(np.uint64(salt % 2**64)))
    n_drawn, undrawn_library = n_expressed, np.zeros(len(n_expressed))
    if mask_fraction > 0 or (n_visible < n_unmasked).any():
        gene_keys = mix64(cell_keys[entries.cell] ^ entries.genes.astype(np.uint64))
        if tokenizer.token_selection == "random" or not (n_visible < n_unmasked).any():
            order = np.lexsort((gene_keys, entries.cell))
        else:
            n_drawn = n_masked + n_visible
            selected = _selected(entries, gene_keys, n_drawn, scaler, tokenizer.token_selection, masked)
            undrawn_library = np.bincount(entries.cell, weights=entries.counts * ~selected,
                                          minlength=len(n_expressed))
            chosen = np.flatnonzero(selected)  # in random order (keys are distinct within a cell), then the rest
            order = np.concatenate([chosen[np.argsort(gene_keys[chosen])], np.flatnonzero(~selected)])
            cells = entries.cell[order].astype(np.uint16 if len(n_expressed) <= 2**16 else np.int64)
            order = order[np.argsort(cells, kind="stable")]  # cell by cell again (a radix sort in 16 bits)
        entries = entries.reordered(order)
    is_masked = entries.rank < n_masked[entries.cell]
    visible = ~is_masked & (entries.rank < (n_masked + n_visible)[entries.cell])
    return entries, _MaskSplit(n_masked, n_visible, is_masked, visible, cell_keys, n_drawn, undrawn_library)


def _selected(entries: _Entries, gene_keys: np.ndarray, n_selected: np.ndarray, scaler: GeneScaler,
              selection: str, masked: bool) -> np.ndarray:
    """[N] bool: each cell's `n_selected` first genes. "rank": the highest counts over the gene's median
    expression in training (the cell's library cancels out). "variable": in training, a draw without
    replacement weighted by the genes' variability (Efraimidis-Spirakis: the smallest Exp(1) / weight);
    at inference, the most variable. Ties go by `gene_keys`, so a salt fixes the choice."""
    if selection == "rank":
        preference, descending = entries.counts / scaler.median_expression(entries.genes), True
    elif masked:
        uniform = ((mix64(gene_keys) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
        preference, descending = -np.log(uniform) / scaler.variability(entries.genes), False
    else:
        preference, descending = scaler.variability(entries.genes), True
    # One sort key: the cell in the high bits, then the positive preference's float bits less the lowest.
    preference = np.ascontiguousarray(preference, dtype=np.float64).view(np.uint64)
    preference = np.uint64(2**63 - 1) - preference if descending else preference
    cell_bits = max(int(len(entries.n_expressed) - 1).bit_length(), 1)
    key = (entries.cell.astype(np.uint64) << np.uint64(63 - cell_bits)) | (preference >> np.uint64(cell_bits))
    order = np.lexsort((gene_keys, key))
    selected = np.empty(len(order), dtype=bool)
    selected[order] = entries.rank < n_selected[entries.cell]  # the order keeps cells in place
    return selected


def _entry_values(entries: _Entries, split: _MaskSplit, scaler: GeneScaler, all_genes: bool) -> np.ndarray:
    """Each token's and each masked gene's value (0 for genes left out). Tokens are normalised by the
    library of the cell's unmasked genes, the n genes m masks were drawn from at their expected share
    (n - m) / n, so that masked counts cannot reach the encoder (paper mode: the full library, as targets)."""
    library = entries.library
    if all_genes:
        token_library = library
    else:
        masked_library = np.bincount(entries.cell[split.masked], weights=entries.counts[split.masked],
                                     minlength=len(library))
        n_drawn, drawn_library = split.n_drawn, library - split.undrawn_library
        token_library = split.undrawn_library + (
            (drawn_library - masked_library) * n_drawn / np.maximum(n_drawn - split.n_masked, 1))
    values = np.zeros(len(entries.genes), dtype=np.float32)
    for chosen, cell_library in ((split.visible, token_library), (split.masked, library)):
        values[chosen] = scaler.values(entries.genes[chosen], log_normalise(
            entries.counts[chosen], cell_library[entries.cell[chosen]], scaler.target_sum))
    return values


def _padded(
    n_cells: int, width: int, cell: np.ndarray, slot: np.ndarray, gene_ids: np.ndarray, values: np.ndarray,
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[n_cells, width] gene ids, float32 values and a mask (True at real entries), with genes
    and values placed at (cell, slot) and the padding id and 0 elsewhere."""
    padded_ids = np.full((n_cells, width), pad_id, dtype=np.int64)
    padded_values = np.zeros((n_cells, width), dtype=np.float32)
    mask = np.zeros((n_cells, width), dtype=bool)
    padded_ids[cell, slot] = gene_ids
    padded_values[cell, slot] = values
    mask[cell, slot] = True
    return padded_ids, padded_values, mask


def _expressed_tokens(
    entries: _Entries, split: _MaskSplit, values: np.ndarray, pad_id: int
) -> tuple[np.ndarray, ...]:
    """Each cell's visible genes as tokens (gene ids, values, mask, and no zero-count tokens)."""
    n_cells = len(split.n_visible)
    width = int(split.n_visible.max()) if n_cells else 0
    visible = split.visible
    slot = (entries.rank - split.n_masked[entries.cell])[visible]
    tokens = _padded(n_cells, width, entries.cell[visible], slot, entries.genes[visible], values[visible], pad_id)
    return *tokens, np.zeros((n_cells, width), dtype=bool)


def _queries(
    cells: CellCounts,
    rows: np.ndarray,
    scaler: GeneScaler,
    entries: _Entries,
    split: _MaskSplit,
    values: np.ndarray,
    zero_query_ratio: float,
    pad_id: int,
) -> tuple[np.ndarray, ...]:
    """Decoder queries: each cell's masked genes (targets: their values), then the zero-count
    genes sampled for it (targets: the value of a zero count, flagged in `query_is_zero`)."""
    n_cells, n_masked, masked = len(rows), split.n_masked, split.masked
    n_zero_wanted = np.rint(zero_query_ratio * n_masked).astype(np.int64)
    zero_cell, zero_genes = _sample_zero_genes(cells, rows, n_zero_wanted, entries.genes, entries.cell,
                                               split.cell_keys)
    n_zero = np.bincount(zero_cell, minlength=n_cells)
    zero_slot = n_masked[zero_cell] + np.arange(len(zero_cell)) - (np.cumsum(n_zero) - n_zero)[zero_cell]
    width = int((n_masked + n_zero).max()) if n_cells else 0
    query_ids, targets, query_mask = _padded(
        n_cells, width, np.concatenate([entries.cell[masked], zero_cell]),
        np.concatenate([entries.rank[masked], zero_slot]), np.concatenate([entries.genes[masked], zero_genes]),
        np.concatenate([values[masked], scaler.zero_values(zero_genes)]), pad_id)
    query_is_zero = np.zeros((n_cells, width), dtype=bool)
    query_is_zero[zero_cell, zero_slot] = True
    return query_ids, targets, query_mask, query_is_zero


def _count_targets(
    cells: CellCounts, rows: np.ndarray, entries: _Entries, pad_id: int, wanted: bool
) -> tuple[np.ndarray, ...]:
    """Every expressed gene of each cell with its raw count, the library and the measured genes:
    what the count objective reconstructs (the whole cell, whichever genes were tokens)."""
    n_cells, library = len(rows), entries.library.astype(np.float32)
    if not wanted:
        return (np.zeros((n_cells, 0), np.int64), np.zeros((n_cells, 0), np.float32), library,
                np.zeros((n_cells, 0), bool))
    width = int(entries.n_expressed.max()) if n_cells else 0
    count_genes, counts, _ = _padded(n_cells, width, entries.cell, entries.rank, entries.genes, entries.counts,
                                     pad_id)
    return count_genes, counts, library, cells.measured[cells.source[rows]]


def _all_gene_tokens(
    cells: CellCounts,
    rows: np.ndarray,
    scaler: GeneScaler,
    entries: _Entries,
    masked: np.ndarray,
    values: np.ndarray,
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
    cell = entries.cell
    slot = np.searchsorted(cells.measured_keys, sources[cell] * n_genes + entries.genes) - start[cell]
    token_values[cell, slot] = np.where(masked, 1.0, values)
    gene_ids[cell[masked], slot[masked]] = pad_id
    token_zero[cell, slot] = False
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
