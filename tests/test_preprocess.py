import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.preprocessing import StandardScaler

from exceiver.errors import ExceiverInputError
from exceiver.preprocess import GeneScaler, check_counts, drop_empty_cells, require_nonempty_cells
from exceiver.vocab import CellCounts, GeneVocab, align

from conftest import synthetic_counts


def _cells(counts):
    counts = np.asarray(counts, dtype=np.float32)
    genes = [f"G{j}" for j in range(counts.shape[1])]
    adata = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=genes))
    return align(adata, GeneVocab(genes))


def _dense_log_normalised(cells: CellCounts) -> np.ndarray:
    x = cells.counts.toarray().astype(np.float64)
    return np.log1p(x / x.sum(1, keepdims=True) * 1e4)


def test_streaming_scaler_equals_dense_standard_scaler():
    cells = align(synthetic_counts(n_cells=300, n_genes=150), GeneVocab([f"G{j:04d}" for j in range(150)]))
    cells = drop_empty_cells(cells)
    dense = _dense_log_normalised(cells)
    reference = StandardScaler().fit(dense)
    scaler = GeneScaler.fit(cells, chunk_size=37)  # chunks that do not divide the cells evenly
    np.testing.assert_allclose(scaler.mean, reference.mean_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scaler.std, reference.scale_, rtol=1e-5, atol=1e-6)
    # Transformed values of the non-zero entries match the dense transform, clip and shift.
    expected = np.minimum(reference.transform(dense), 10.0) + 1.0
    rows, cols = cells.counts.nonzero()
    np.testing.assert_allclose(scaler.cell_values(cells), expected[rows, cols], rtol=1e-5, atol=1e-5)


def test_scaler_handles_constant_and_unmeasured_genes():
    vocab = GeneVocab(["A", "B", "C"])
    one = align(ad.AnnData(sp.csr_matrix(np.array([[1, 0], [3, 0]], np.float32)),
                           var=pd.DataFrame(index=["A", "B"])), vocab)
    two = align(ad.AnnData(sp.csr_matrix(np.array([[2, 5]], np.float32)),
                           var=pd.DataFrame(index=["A", "C"])), vocab)
    scaler = GeneScaler.fit(CellCounts.concat([one, two]))
    np.testing.assert_array_equal(scaler.n_cells, [3, 2, 1])
    # B is measured but always zero: centred value 0, scale 1 (no division by zero).
    assert scaler.mean[1] == 0 and scaler.std[1] == 1
    # C is unmeasured in the first dataset: its statistics come from the one cell that measured it.
    expected_c = np.log1p(5 / 7 * 1e4)
    assert scaler.mean[2] == pytest.approx(expected_c, rel=1e-6) and scaler.std[2] == 1
    np.testing.assert_array_equal(scaler.zero_values(np.array([1])), [1.0])


def test_gene_mean_baseline_averages_values_of_expressing_cells():
    cells = _cells([[1, 0, 3], [2, 4, 0], [0, 1, 1]])
    scaler = GeneScaler.fit(cells)
    values = scaler.cell_values(cells)
    genes = cells.counts.indices
    for g in range(3):
        assert scaler.expressed_mean[g] == pytest.approx(values[genes == g].mean(), rel=1e-6)
    np.testing.assert_array_equal(scaler.n_expressed, [2, 2, 2])
    assert scaler.mean_expressed_value == pytest.approx(values.mean(), rel=1e-6)


def test_values_are_clipped_at_ten_plus_one():
    counts = np.zeros((400, 2), np.float32)
    counts[:, 0] = 1
    counts[0, 1] = 50  # a gene expressed in one of 400 cells gets a huge z-score
    cells = _cells(counts)
    values = GeneScaler.fit(cells).cell_values(cells)
    assert values.max() == pytest.approx(11.0)


def test_check_counts_refuses_non_finite_and_negative_values():
    with pytest.raises(ExceiverInputError, match="1 count entries are NaN or infinite"):
        check_counts(_cells([[1, np.nan], [1, 2]]), "toy")
    with pytest.raises(ExceiverInputError, match="1 count entries are negative.*raw counts"):
        check_counts(_cells([[1, -2], [1, 2]]), "toy")
    with pytest.warns(UserWarning, match="2 of 4 non-zero entries are not integers"):
        check_counts(_cells([[1, 0.5], [1.7, 2]]), "toy")


def test_empty_cells_are_dropped_with_a_count_or_refused(caplog):
    cells = _cells([[1, 0], [0, 0], [0, 3]])
    with caplog.at_level(logging.WARNING):
        kept = drop_empty_cells(cells, "toy")
    assert kept.n_cells == 2 and "dropped 1 of 3 cells" in caplog.text
    with pytest.raises(ExceiverInputError, match="1 of 3 cells have no counts"):
        require_nonempty_cells(cells, "toy")
    with pytest.raises(ExceiverInputError, match="none of its 2 cells has counts"):
        drop_empty_cells(_cells([[0, 0], [0, 0]]), "toy")


def test_within_cell_ranks_are_quantiles_of_each_cell_alone():
    from exceiver.preprocess import within_cell_ranks

    values = np.array([3.0, 1.0, 2.0, 5.0, 4.0], dtype=np.float32)
    cells = np.array([0, 0, 0, 1, 1])
    np.testing.assert_allclose(within_cell_ranks(values, cells, 2), [5 / 3, 1 / 3, 1.0, 1.5, 0.5], rtol=1e-6)
    # Scaled per cell by the model's scaler: each cell's ranks average 1, whatever its depth.
    cells = align(synthetic_counts(n_cells=50, n_genes=80), GeneVocab([f"G{j:04d}" for j in range(80)]))
    scaler = GeneScaler.fit(cells, ranks=True)
    ranks = scaler.cell_values(cells, ranks=True)
    owner = np.repeat(np.arange(cells.n_cells), cells.n_genes_expressed)
    np.testing.assert_allclose(np.bincount(owner, ranks) / cells.n_genes_expressed, 1.0, rtol=1e-5)
    assert 0 < ranks.min() and ranks.max() < 2
    # The gene-mean baseline then averages ranks, not z-scores.
    expected = np.bincount(cells.counts.indices, ranks, 80) / np.maximum(np.bincount(cells.counts.indices, minlength=80), 1)
    expressed = scaler.n_expressed > 0
    np.testing.assert_allclose(scaler.expressed_mean[expressed], expected[expressed], rtol=1e-5)
