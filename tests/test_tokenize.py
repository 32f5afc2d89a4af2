import numpy as np
import pytest

from exceiver.data.preprocess import GeneScaler
from exceiver.data.tokenizer import TokenizerConfig, make_batch, masked_count
from exceiver.data.cells import CellCounts, align
from exceiver.data.vocab import GeneVocab

from conftest import synthetic_counts


@pytest.fixture
def cells_and_scaler():
    adata = synthetic_counts(n_cells=40, n_genes=120)
    cells = align(adata, GeneVocab(adata.var_names))
    return cells, GeneScaler.fit(cells)


def _row_genes(cells: CellCounts, row: int) -> np.ndarray:
    counts = cells.counts
    return counts.indices[counts.indptr[row]:counts.indptr[row + 1]]


def test_only_expressed_genes_become_tokens(cells_and_scaler):
    cells, scaler = cells_and_scaler
    rows = np.arange(10)
    batch = make_batch(cells, rows, scaler, TokenizerConfig(max_tokens=1000))
    values = scaler.cell_values(cells)
    for i, row in enumerate(rows):
        tokens = batch.gene_ids[i][batch.token_mask[i]].numpy()
        np.testing.assert_array_equal(np.sort(tokens), _row_genes(cells, row))
        start, end = cells.counts.indptr[row], cells.counts.indptr[row + 1]
        np.testing.assert_allclose(batch.values[i][batch.token_mask[i]].numpy(), values[start:end], rtol=1e-6)
        assert (batch.gene_ids[i][~batch.token_mask[i]] == 120).all()  # padding id elsewhere
    assert batch.gene_ids.shape[1] == cells.n_genes_expressed[rows].max()
    assert batch.query_ids.shape[1] == 0


def test_masked_genes_are_queries_and_never_tokens(cells_and_scaler):
    cells, scaler = cells_and_scaler
    rows = np.arange(cells.n_cells)
    batch = make_batch(cells, rows, scaler, TokenizerConfig(max_tokens=1000, mask_fraction=0.15), masked=True, salt=7)
    expected_masked = masked_count(cells.n_genes_expressed[rows], 0.15, 1000)
    np.testing.assert_array_equal(batch.query_mask.sum(1).numpy(), expected_masked)
    values = dict()
    for i, row in enumerate(rows):
        for g, v in zip(_row_genes(cells, row), scaler.cell_values(cells.subset([row]))):
            values[(i, g)] = v
        tokens = set(batch.gene_ids[i][batch.token_mask[i]].tolist())
        queries = batch.query_ids[i][batch.query_mask[i]].tolist()
        assert tokens.isdisjoint(queries)
        assert tokens | set(queries) == set(_row_genes(cells, row).tolist())
        for q, t in zip(queries, batch.targets[i][batch.query_mask[i]].tolist()):
            assert t == pytest.approx(values[(i, q)], rel=1e-6)
    assert not batch.query_is_zero.any()


def _masked_set(batch, i):
    return set(batch.query_ids[i][batch.query_mask[i]].tolist())


def test_mask_depends_on_the_cells_genes_and_salt_not_its_position_or_counts(cells_and_scaler):
    cells, scaler = cells_and_scaler
    kwargs = dict(tokenizer=TokenizerConfig(max_tokens=1000, mask_fraction=0.3), masked=True, salt=3)
    alone = make_batch(cells, [5], scaler, **kwargs)
    batched = make_batch(cells, [9, 5, 2, 5], scaler, **kwargs)
    assert _masked_set(alone, 0) == _masked_set(batched, 1) == _masked_set(batched, 3)
    moved = cells.subset(np.r_[5, np.arange(5)])  # the same cell at another row
    assert _masked_set(make_batch(moved, [0], scaler, **kwargs), 0) == _masked_set(alone, 0)
    scaled = CellCounts(cells.counts * 100, cells.measured, cells.source, cells.obs_names, cells.source_names)
    assert _masked_set(make_batch(scaled, [5], scaler, **kwargs), 0) == _masked_set(alone, 0)
    assert _masked_set(make_batch(cells, [5], scaler, **{**kwargs, "salt": 4}), 0) != _masked_set(alone, 0)


def test_masked_counts_never_reach_the_token_values(cells_and_scaler):
    """Changing only the masked genes' counts leaves every encoder input unchanged (the library
    used for the tokens excludes them), while the targets follow the new counts."""
    cells, scaler = cells_and_scaler
    rows = np.arange(cells.n_cells)
    kwargs = dict(tokenizer=TokenizerConfig(max_tokens=1000, mask_fraction=0.2), masked=True, salt=8)
    batch = make_batch(cells, rows, scaler, **kwargs)
    boosted = cells.counts.copy().tolil()
    for i in rows:
        for g in batch.query_ids[i][batch.query_mask[i]].tolist():
            boosted[i, g] = boosted[i, g] * 50
    changed = CellCounts(boosted.tocsr(), cells.measured, cells.source, cells.obs_names, cells.source_names)
    again = make_batch(changed, rows, scaler, **kwargs)
    for name in ("gene_ids", "values", "token_mask", "query_ids", "query_mask"):
        np.testing.assert_array_equal(getattr(batch, name).numpy(), getattr(again, name).numpy(), err_msg=name)
    assert (again.targets[again.query_mask] > batch.targets[batch.query_mask]).all()


def test_unmasked_tokens_use_the_full_library(cells_and_scaler):
    """Without masking, token values are exactly the scaler's transform of the cell's counts."""
    cells, scaler = cells_and_scaler
    batch = make_batch(cells, [3], scaler, TokenizerConfig(max_tokens=1000))
    np.testing.assert_allclose(np.sort(batch.values[0].numpy()), np.sort(scaler.cell_values(cells.subset([3]))), rtol=1e-6)


def test_masked_count_leaves_a_visible_gene():
    np.testing.assert_array_equal(masked_count(np.array([0, 1, 2, 10, 100, 10000]), 0.15, 1000),
                                  [0, 0, 1, 2, 15, 150])
    np.testing.assert_array_equal(masked_count(np.array([2, 3]), 0.9, 1000), [1, 2])
    np.testing.assert_array_equal(masked_count(np.array([50]), 0.0, 1000), [0])


def test_long_cells_are_subsampled_to_max_tokens_deterministically(cells_and_scaler):
    cells, scaler = cells_and_scaler
    row = int(np.argmax(cells.n_genes_expressed))
    n = int(cells.n_genes_expressed[row])
    first = make_batch(cells, [row], scaler, TokenizerConfig(max_tokens=n // 2), salt=1)
    second = make_batch(cells, [row, 0], scaler, TokenizerConfig(max_tokens=n // 2), salt=1)
    assert first.token_mask.sum() == n // 2
    assert set(first.gene_ids[0].tolist()) == set(second.gene_ids[0][second.token_mask[0]].tolist())
    assert set(first.gene_ids[0].tolist()) <= set(_row_genes(cells, row).tolist())


def test_zero_queries_are_measured_unexpressed_distinct_genes():
    adata = synthetic_counts(n_cells=30, n_genes=120)
    vocab = GeneVocab(list(adata.var_names) + ["UNMEASURED1", "UNMEASURED2"])
    cells = align(adata, vocab)
    scaler = GeneScaler.fit(cells)
    batch = make_batch(cells, np.arange(30), scaler, TokenizerConfig(max_tokens=1000, mask_fraction=0.2, zero_query_ratio=1.0), masked=True, salt=11)
    n_masked = masked_count(cells.n_genes_expressed, 0.2, 1000)
    for i in range(30):
        zeros = batch.query_ids[i][batch.query_mask[i] & batch.query_is_zero[i]].numpy()
        assert len(zeros) == n_masked[i]
        assert len(set(zeros)) == len(zeros)
        assert set(zeros).isdisjoint(_row_genes(cells, i))
        assert cells.measured[0, zeros].all()
        np.testing.assert_allclose(batch.targets[i][batch.query_is_zero[i]].numpy(), scaler.zero_values(zeros))


def test_paper_compatible_batches_hold_every_measured_gene():
    """The original's input: every gene the dataset measured, zero genes flagged, masked genes as
    the padding id with value 1; unmeasured vocabulary genes are not tokens."""
    a, b = synthetic_counts(n_cells=12, n_genes=60, seed=1), synthetic_counts(n_cells=8, n_genes=60, seed=2)
    b = b[:, 20:].copy()  # the second dataset measures 40 of the 60 genes
    vocab = GeneVocab(a.var_names)
    cells = CellCounts.concat([align(a, vocab), align(b, vocab)])
    scaler = GeneScaler.fit(cells)
    rows = np.arange(cells.n_cells)
    batch = make_batch(cells, rows, scaler, TokenizerConfig(max_tokens=4, mask_fraction=0.15, all_genes=True), masked=True, salt=3)
    assert batch.gene_ids.shape == (20, 60)  # max_tokens does not apply: every gene is a token
    np.testing.assert_array_equal(batch.token_mask.sum(1).numpy(), [60] * 12 + [40] * 8)
    values = scaler.cell_values(cells)
    for i, row in enumerate(rows):
        expressed = set(_row_genes(cells, row).tolist())
        masked = _masked_set(batch, i)
        assert masked <= expressed and len(masked) == masked_count(np.array([len(expressed)]), 0.15, 4)[0]
        ids, vals = batch.gene_ids[i].numpy(), batch.values[i].numpy()
        zero = batch.token_zero[i].numpy() & batch.token_mask[i].numpy()
        measured = set(np.flatnonzero(cells.measured[cells.source[row]]).tolist())
        assert set(ids[zero].tolist()) == measured - expressed
        np.testing.assert_allclose(vals[zero], scaler.zero_values(ids[zero]))
        is_pad = (ids == 60) & batch.token_mask[i].numpy()
        assert is_pad.sum() == len(masked) and (vals[is_pad] == 1.0).all() and not zero[is_pad].any()
        seen = ~zero & ~is_pad & batch.token_mask[i].numpy()
        assert set(ids[seen].tolist()) == expressed - masked
        start = cells.counts.indptr[row]
        by_gene = dict(zip(_row_genes(cells, row).tolist(), values[start:start + len(expressed)]))
        np.testing.assert_allclose(vals[seen], [by_gene[g] for g in ids[seen]], rtol=1e-6)
