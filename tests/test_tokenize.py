import numpy as np
import pytest

from exceiver.preprocess import GeneScaler
from exceiver.tokenize import make_batch, masked_count
from exceiver.vocab import CellCounts, GeneVocab, align

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
    batch = make_batch(cells, rows, scaler, pad_id=120, max_tokens=1000)
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
    batch = make_batch(cells, rows, scaler, pad_id=120, max_tokens=1000, mask_fraction=0.15, salt=7)
    expected_masked = masked_count(cells.n_genes_expressed[rows], 0.15, 1000)
    np.testing.assert_array_equal(batch.query_mask.sum(1).numpy(), expected_masked)
    values = dict()
    for i, row in enumerate(rows):
        start = cells.counts.indptr[row]
        for g, v in zip(_row_genes(cells, row), scaler.cell_values(cells.subset([row]))):
            values[(i, g)] = v
        tokens = set(batch.gene_ids[i][batch.token_mask[i]].tolist())
        queries = batch.query_ids[i][batch.query_mask[i]].tolist()
        assert tokens.isdisjoint(queries)
        assert tokens | set(queries) == set(_row_genes(cells, row).tolist())
        for q, t in zip(queries, batch.targets[i][batch.query_mask[i]].tolist()):
            assert t == pytest.approx(values[(i, q)], rel=1e-6)
        assert start >= 0
    assert not batch.query_is_zero.any()


def test_mask_depends_on_cell_gene_and_salt_only(cells_and_scaler):
    cells, scaler = cells_and_scaler
    kwargs = dict(pad_id=120, max_tokens=1000, mask_fraction=0.3, salt=3)
    alone = make_batch(cells, [5], scaler, **kwargs)
    batched = make_batch(cells, [9, 5, 2], scaler, **kwargs)
    assert set(alone.query_ids[0][alone.query_mask[0]].tolist()) == set(batched.query_ids[1][batched.query_mask[1]].tolist())
    # Scaling the counts (values) of the cell does not change which genes are masked.
    scaled = CellCounts(cells.counts * 100, cells.measured, cells.source, cells.obs_names, cells.source_names)
    again = make_batch(scaled, [5], scaler, **kwargs)
    assert set(again.query_ids[0][again.query_mask[0]].tolist()) == set(alone.query_ids[0][alone.query_mask[0]].tolist())
    other_salt = make_batch(cells, [5], scaler, **{**kwargs, "salt": 4})
    assert set(other_salt.query_ids[0][other_salt.query_mask[0]].tolist()) != set(alone.query_ids[0][alone.query_mask[0]].tolist())


def test_masked_count_leaves_a_visible_gene():
    np.testing.assert_array_equal(masked_count(np.array([0, 1, 2, 10, 100, 10000]), 0.15, 1000),
                                  [0, 0, 1, 2, 15, 150])
    np.testing.assert_array_equal(masked_count(np.array([2, 3]), 0.9, 1000), [1, 2])
    np.testing.assert_array_equal(masked_count(np.array([50]), 0.0, 1000), [0])


def test_long_cells_are_subsampled_to_max_tokens_deterministically(cells_and_scaler):
    cells, scaler = cells_and_scaler
    row = int(np.argmax(cells.n_genes_expressed))
    n = int(cells.n_genes_expressed[row])
    first = make_batch(cells, [row], scaler, pad_id=120, max_tokens=n // 2, salt=1)
    second = make_batch(cells, [row, 0], scaler, pad_id=120, max_tokens=n // 2, salt=1)
    assert first.token_mask.sum() == n // 2
    assert set(first.gene_ids[0].tolist()) == set(second.gene_ids[0][second.token_mask[0]].tolist())
    assert set(first.gene_ids[0].tolist()) <= set(_row_genes(cells, row).tolist())


def test_zero_queries_are_measured_unexpressed_distinct_genes():
    adata = synthetic_counts(n_cells=30, n_genes=120)
    vocab = GeneVocab(list(adata.var_names) + ["UNMEASURED1", "UNMEASURED2"])
    cells = align(adata, vocab)
    scaler = GeneScaler.fit(cells)
    batch = make_batch(cells, np.arange(30), scaler, pad_id=len(vocab), max_tokens=1000,
                       mask_fraction=0.2, zero_query_ratio=1.0, salt=11)
    n_masked = masked_count(cells.n_genes_expressed, 0.2, 1000)
    for i in range(30):
        zeros = batch.query_ids[i][batch.query_mask[i] & batch.query_is_zero[i]].numpy()
        assert len(zeros) == n_masked[i]
        assert len(set(zeros)) == len(zeros)
        assert set(zeros).isdisjoint(_row_genes(cells, i))
        assert cells.measured[0, zeros].all()
        np.testing.assert_allclose(batch.targets[i][batch.query_is_zero[i]].numpy(), scaler.zero_values(zeros))
