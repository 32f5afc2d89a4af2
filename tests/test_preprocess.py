import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.preprocessing import StandardScaler

from exceiver.errors import ExceiverInputError
from exceiver.data.counts import check_counts
from exceiver.data.preprocess import GeneScaler, prepare_cells, report_dropped
from exceiver.data.cells import CellCounts, align
from exceiver.data.vocab import GeneVocab

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
    cells = prepare_cells(cells)
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


def test_check_counts_refuses_non_finite_negative_and_mostly_fractional_values(caplog):
    with pytest.raises(ExceiverInputError, match="1 count entries in X are NaN or infinite"):
        check_counts(sp.csr_matrix([[1, np.nan], [1, 2]]), "toy")
    with pytest.raises(ExceiverInputError, match="1 count entries in X are negative.*raw counts"):
        check_counts(sp.csr_matrix([[1, -2], [1, 2]]), "toy")
    with pytest.raises(ExceiverInputError, match="toy: 50% of the nonzero values in X are not integers"):
        check_counts(sp.csr_matrix([[1, 0.5], [1.7, 2]]), "toy")
    assert check_counts(sp.csr_matrix([[1, 0.5], [1.7, 2]]), "toy", allow_non_integer=True) == 0.5
    few = sp.csr_matrix(np.r_[np.arange(1, 20), 2.5][None, :])  # 1 of 20 values (5%): noise, not normalised data
    with caplog.at_level(logging.WARNING):
        assert check_counts(few, "toy") == pytest.approx(0.05)
    assert "toy: 5% of the nonzero values in X are not integers; they are used as counts" in caplog.text


def test_empty_cells_are_dropped_with_a_count_or_refused(caplog):
    cells = _cells([[1, 0], [0, 0], [0, 3]])
    with caplog.at_level(logging.WARNING):
        kept = prepare_cells(cells, "toy")
        report_dropped("toy", cells.n_cells, kept.n_cells)
    assert kept.n_cells == 2 and "dropped 1 of 3 cells" in caplog.text
    with pytest.raises(ExceiverInputError, match="1 of 3 cells have no counts"):
        prepare_cells(cells, "toy", empty="refuse")
    empty = prepare_cells(_cells([[0, 0], [0, 0]]), "toy")
    with pytest.raises(ExceiverInputError, match="none of its 2 cells has counts"):
        report_dropped("toy", 2, empty.n_cells)


def test_preparing_cells_keeps_only_the_given_genes_and_checks_counts():
    cells = _cells([[1, 2], [0, 3], [4, 0]])
    kept = prepare_cells(cells, "toy", genes=np.array([True, False]))
    assert kept.n_cells == 2 and kept.counts.toarray().tolist() == [[1, 0], [4, 0]]
    assert kept.measured.tolist() == [[True, False]]
    with pytest.raises(ExceiverInputError, match="toy: 1 of 3 cells have no counts"):
        prepare_cells(cells, "toy", genes=np.array([True, False]), empty="refuse")
    with pytest.raises(ExceiverInputError, match="negative"):  # counts are checked where they are read
        _cells([[1, -2]])
