"""Which of a cell's expressed genes become tokens when it has more than the cap: the default keeps
today's batches bit for bit; "rank" keeps the highest expression over the gene's median in training;
"variable" samples with the genes' dispersion weights; the median is fitted, saved and loaded."""

import dataclasses
import hashlib

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.numpy import save_file

from exceiver.data.cells import CellCounts, align
from exceiver.data.preprocess import LOG_FRACTION_FLOOR, MEDIAN_BINS, GeneScaler, entry_library_size
from exceiver.data.tokenizer import TokenizerConfig, make_batch
from exceiver.data.vocab import GeneVocab
from exceiver.errors import ExceiverInputError, ModelFileError
from exceiver.io import FORMAT, SCALER, SCALER_ARRAYS, load_model_files, save_model_files
from exceiver.nn.config import pretraining_configs, settable_fields

from conftest import synthetic_counts


def _cells(counts: np.ndarray, measured: np.ndarray | None = None, source: np.ndarray | None = None) -> CellCounts:
    matrix = sp.csr_matrix(np.asarray(counts, dtype=np.float32))
    n_cells, n_genes = matrix.shape
    measured = np.ones((1, n_genes), bool) if measured is None else measured
    source = np.zeros(n_cells, np.int32) if source is None else source
    return CellCounts(matrix, measured, source, np.array([f"c{i}" for i in range(n_cells)]),
                      [f"d{i}" for i in range(len(measured))])


def _scaler(n_genes: int, *, standardise: bool = True, seed: int = 7, **arrays) -> GeneScaler:
    rng = np.random.default_rng(seed)
    fields = dict(mean=rng.random(n_genes).astype(np.float32) * 2, std=(rng.random(n_genes) + 0.2).astype(np.float32),
                  n_cells=np.full(n_genes, 48), expressed_mean=rng.random(n_genes).astype(np.float32),
                  n_expressed=np.full(n_genes, 20))
    return GeneScaler(**{**fields, **arrays}, standardise=standardise)


# --- the default keeps today's batches -----------------------------------------------------------

def _fixed_cells(n_cells: int = 48, n_genes: int = 300) -> CellCounts:
    """Two datasets (the second measures 260 genes), 2 to 89 expressed genes a cell, skewed counts."""
    rng = np.random.default_rng(20240601)
    n_expr = rng.integers(2, 90, n_cells)
    indices = [np.sort(rng.choice(n_genes, k, replace=False)) for k in n_expr]
    data = [rng.integers(1, 40, k) ** 2 // 20 + 1 for k in n_expr]
    counts = sp.csr_matrix((np.concatenate(data).astype(np.float32), np.concatenate(indices),
                            np.r_[0, np.cumsum(n_expr)]), shape=(n_cells, n_genes))
    measured = np.ones((2, n_genes), bool)
    measured[1, rng.choice(n_genes, 40, replace=False)] = False
    source = (np.arange(n_cells) % 2).astype(np.int32)
    for c in np.flatnonzero(source == 1):
        row = slice(counts.indptr[c], counts.indptr[c + 1])
        counts.data[row][~measured[1, counts.indices[row]]] = 0
    counts.eliminate_zeros()
    return CellCounts(counts, measured, source, np.array([f"c{i}" for i in range(n_cells)]), ["a", "b"])


def _digest(batch) -> str:
    h = hashlib.sha256()
    for f in dataclasses.fields(batch):
        a = getattr(batch, f.name).numpy()
        h.update(f.name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# sha256 of every CellBatch field, computed with the tokenizer as it was before token selection.
BEFORE_SELECTION = {
    "inference_capped": (dict(max_tokens=20), False, 0, True,
                         "551d957cc94e55cedb198a42811e823c8e2246beff7fc488bb2052c55de3c225"),
    "inference_whole": (dict(), False, 3, True, "bc7fca3a8135ee72c17fee0229872e8c3e0d78ac909769cc3846ea07247de25a"),
    "training_capped": (dict(max_tokens=64, train_tokens=16, zero_query_ratio=1.0, count_targets=True), True, 11, True,
                        "7ad9c01429885d9b14d3af426bec3ebd0c141d91df91e1e75738f657d15a4959"),
    "training_log": (dict(mask_fraction=0.3, values="log"), True, 5, False,
                     "7116f498567ac50823dfe0aba1887ed2ec3ba76c959eb93aea16330ae03bfa96"),
    "paper": (dict(max_tokens=8, all_genes=True), True, 2, True,
              "205a4e75c89f4f781a49ae21e0ae27cb0e330060296284f209d2eb20ad4f390f"),
}


@pytest.mark.parametrize("case", sorted(BEFORE_SELECTION))
def test_default_selection_builds_the_same_batches_as_before(case):
    settings, masked, salt, standardise, expected = BEFORE_SELECTION[case]
    tokenizer = TokenizerConfig(**settings)
    assert tokenizer.token_selection == "random"
    rows = np.r_[np.arange(48), [3, 3, 10]]
    batch = make_batch(_fixed_cells(), rows, _scaler(300, standardise=standardise), tokenizer, masked=masked, salt=salt)
    assert _digest(batch) == expected


# --- rank ----------------------------------------------------------------------------------------

# One cell of six genes: counts, the genes' median expression in training, and count / median.
RANK_COUNTS = np.array([50, 2, 6, 8, 30, 3])
RANK_MEDIANS = np.array([100, 1, 1, 2, 10, 3], dtype=np.float32)  # ratios 0.5, 2, 6, 4, 3, 1


def _rank_example():
    cells = _cells(np.array([RANK_COUNTS, [0, 4, 0, 1, 0, 0]]))  # the second cell fits under every cap here
    return cells, _scaler(6, standardise=False, expressed_median=RANK_MEDIANS)


def _genes(batch, i: int, tokens: bool = True) -> set[int]:
    ids, mask = (batch.gene_ids, batch.token_mask) if tokens else (batch.query_ids, batch.query_mask)
    return set(ids[i][mask[i]].tolist())


def test_rank_keeps_the_genes_highest_over_their_median_at_inference():
    cells, scaler = _rank_example()
    batch = make_batch(cells, [0, 1], scaler, TokenizerConfig(max_tokens=3, token_selection="rank"), salt=4)
    assert _genes(batch, 0) == {2, 3, 4}  # ratios 6, 4, 3; gene 0 has the most counts but ranks last
    assert _genes(batch, 1) == {1, 3}
    token_values = dict(zip(batch.gene_ids[0].tolist(), batch.values[0].tolist()))
    for gene in (2, 3, 4):  # no masks: values from the full library, as without selection
        assert token_values[gene] == pytest.approx(np.log1p(RANK_COUNTS[gene] * 1e4 / RANK_COUNTS.sum()), rel=1e-6)


def test_rank_draws_masks_among_the_top_genes_and_estimates_the_library_without_them():
    cells, scaler = _rank_example()
    tokenizer = TokenizerConfig(max_tokens=100, train_tokens=3, mask_fraction=0.25, token_selection="rank")
    masked_genes = set()
    for salt in range(40):
        batch = make_batch(cells, [0, 1], scaler, tokenizer, masked=True, salt=salt)
        tokens, queries = _genes(batch, 0), _genes(batch, 0, tokens=False)
        assert len(queries) == 1 and len(tokens) == 3  # 0.25 x 3 tokens rounds to one mask
        assert tokens | queries == {1, 2, 3, 4}  # the four highest ranked: three tokens and one mask
        masked_genes |= queries
        # Tokens: the genes outside the ranked four, plus the three visible at 4/3 of their counts.
        (mask,) = queries
        library = RANK_COUNTS[[0, 5]].sum() + (RANK_COUNTS[[1, 2, 3, 4]].sum() - RANK_COUNTS[mask]) * 4 / 3
        token_values = dict(zip(batch.gene_ids[0].tolist(), batch.values[0].tolist()))
        for gene in tokens:
            assert token_values[gene] == pytest.approx(np.log1p(RANK_COUNTS[gene] * 1e4 / library), rel=1e-6)
        target = batch.targets[0][batch.query_mask[0]].item()
        assert target == pytest.approx(np.log1p(RANK_COUNTS[mask] * 1e4 / RANK_COUNTS.sum()), rel=1e-6)
    assert masked_genes == {1, 2, 3, 4}  # masks are drawn among all of them, not by rank


def test_rank_needs_the_median_statistic():
    cells, _ = _rank_example()
    scaler = _scaler(6)  # as loaded from a scaler file saved before the statistic
    with pytest.raises(ExceiverInputError, match="token_selection='rank' needs each gene's median"):
        make_batch(cells, [0], scaler, TokenizerConfig(max_tokens=3, token_selection="rank"))
    under_the_cap = make_batch(cells, [1], scaler, TokenizerConfig(max_tokens=3, token_selection="rank"))
    assert _genes(under_the_cap, 0) == {1, 3}  # nothing to choose: no statistic needed


# --- variable ------------------------------------------------------------------------------------

def _variable_example(n_cells: int = 4000):
    """Cell c expresses genes 4c..4c+3 (one count each): whose dispersion weights are in the ratio
    of the std pattern below, all genes sharing one mean (one dispersion bin)."""
    n_genes = 4 * n_cells
    std = np.tile(np.sqrt([1.0, 2.0, 3.0, 4.0]), n_cells).astype(np.float32)
    scaler = _scaler(n_genes, mean=np.ones(n_genes, np.float32), std=std)
    counts = sp.csr_matrix((np.ones(n_genes, np.float32), np.arange(n_genes), np.arange(0, n_genes + 1, 4)),
                           shape=(n_cells, n_genes))
    return CellCounts(counts, np.ones((1, n_genes), bool), np.zeros(n_cells, np.int32),
                      np.arange(n_cells).astype(str), ["d"]), scaler


def test_dispersion_weights_rank_genes_of_a_similar_mean_by_variance_over_mean():
    _, scaler = _variable_example(10)
    weights = scaler.variability(np.arange(4))
    z = np.log([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(weights, np.exp((z - z.mean()) / z.std()), rtol=1e-5)
    highly_expressed = _scaler(3, mean=np.array([0.5, 5.0, 0.5], np.float32), std=np.array([0.5, 1.6, 0.7], np.float32))
    assert highly_expressed.variability(np.arange(3)).max() <= np.e**3  # clipped: every gene keeps a chance
    untrained = _scaler(3, n_expressed=np.array([5, 0, 5]))
    assert untrained.variability(np.array([1]))[0] == 1.0


def test_variable_sampling_follows_the_weights():
    """One token of four genes: each is drawn with probability weight / total; two tokens: with
    the inclusion probabilities of sampling without replacement."""
    cells, scaler = _variable_example()
    weights = scaler.variability(np.arange(4))
    rows = np.arange(cells.n_cells)
    for n_tokens in (1, 2):
        tokenizer = TokenizerConfig(max_tokens=100, train_tokens=n_tokens, mask_fraction=0.0, token_selection="variable")
        batch = make_batch(cells, rows, scaler, tokenizer, masked=True, salt=9)
        drawn = batch.gene_ids[batch.token_mask].numpy() % 4
        assert len(drawn) == n_tokens * cells.n_cells
        observed = np.bincount(drawn, minlength=4) / cells.n_cells
        p = weights / weights.sum()
        expected = p if n_tokens == 1 else p + np.array([sum(p[j] * p[i] / (1 - p[j]) for j in range(4) if j != i)
                                                          for i in range(4)])
        sd = np.sqrt(expected * (1 - expected) / cells.n_cells)
        assert (np.abs(observed - expected) < 4 * sd).all(), (observed, expected)
        assert observed.min() > 0  # the lightest gene appears too


def test_variable_keeps_the_heaviest_genes_at_inference_and_never_looks_at_counts():
    cells, scaler = _variable_example(50)
    batch = make_batch(cells, np.arange(50), scaler, TokenizerConfig(max_tokens=2, token_selection="variable"))
    assert (batch.gene_ids[batch.token_mask].numpy().reshape(50, 2) % 4 >= 2).all()
    tokenizer = TokenizerConfig(train_tokens=2, mask_fraction=0.3, token_selection="variable")
    first = make_batch(cells, np.arange(50), scaler, tokenizer, masked=True, salt=5)
    scaled = CellCounts(cells.counts * 7, cells.measured, cells.source, cells.obs_names, cells.source_names)
    again = make_batch(scaled, np.arange(50), scaler, tokenizer, masked=True, salt=5)
    for name in ("gene_ids", "token_mask", "query_ids", "query_mask"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name


def test_selection_settings_are_checked_and_settable():
    assert settable_fields()["token_selection"] is str
    assert pretraining_configs("default", 10, token_selection="rank")[1].token_selection == "rank"
    with pytest.raises(ValueError, match="token_selection must be one of"):
        TokenizerConfig(token_selection="highest")
    with pytest.raises(ValueError, match="paper mode"):
        TokenizerConfig(all_genes=True, token_selection="variable")


# --- the median statistic ------------------------------------------------------------------------

def test_fitted_medians_are_within_one_grid_step_of_the_exact_median():
    adata = synthetic_counts(n_cells=300, n_genes=80, seed=3)
    cells = align(adata, GeneVocab(adata.var_names))
    scaler = GeneScaler.fit(cells)
    assert np.array_equal(GeneScaler.fit(cells, chunk_size=37).expressed_median, scaler.expressed_median)
    log_expression = np.log(cells.counts.data * 1e4 / entry_library_size(cells))
    by_gene = sp.csr_matrix((log_expression, cells.counts.indices, cells.counts.indptr), shape=cells.counts.shape).tocsc()
    for gene in np.flatnonzero(scaler.n_expressed):
        values = np.sort(by_gene.data[by_gene.indptr[gene]:by_gene.indptr[gene + 1]])
        middle = values[(len(values) + 1) // 2 - 1]  # the value at which half of them is reached
        assert abs(np.log(scaler.expressed_median[gene]) - middle) <= -LOG_FRACTION_FLOOR / MEDIAN_BINS**2 * 1.001


def test_a_never_expressed_gene_gets_the_median_gene_median():
    cells = _cells(np.array([[2, 0, 4], [6, 0, 4], [1, 0, 0]]))
    medians = GeneScaler.fit(cells).expressed_median
    # The middle value (of two, the lower), on a grid of 0.5%: 1e4 x (2/6, 6/10, 1/1) and (4/6, 4/10).
    np.testing.assert_allclose(medians[[0, 2]], [6000, 4000], rtol=0.0052)
    assert medians[1] == np.median(medians[[0, 2]])


def _model_folder(path, scaler: GeneScaler):
    save_model_files(path, config={}, state_dict={"w": torch.zeros(1)}, vocab=GeneVocab([f"G{i}" for i in range(len(scaler))]),
                     scaler=scaler, metrics={})
    return path


def test_the_median_round_trips_through_a_model_folder(tmp_path):
    adata = synthetic_counts(n_cells=60, n_genes=40)
    scaler = GeneScaler.fit(align(adata, GeneVocab(adata.var_names)))
    loaded = load_model_files(_model_folder(tmp_path, scaler))[3]
    assert loaded.expressed_median.dtype == np.float32
    np.testing.assert_array_equal(loaded.expressed_median, scaler.expressed_median)
    np.testing.assert_array_equal(loaded.std, scaler.std)


def test_an_older_scaler_file_loads_without_the_median(tmp_path):
    scaler = _scaler(6)
    _model_folder(tmp_path, scaler)
    save_file({name: getattr(scaler, name) for name in SCALER_ARRAYS}, str(tmp_path / SCALER),  # as before the median
              metadata={"format": FORMAT, "target_sum": "10000.0", "max_value": "10.0", "standardise": "1"})
    loaded = load_model_files(tmp_path)[3]
    assert loaded.expressed_median is None
    np.testing.assert_array_equal(loaded.mean, scaler.mean)
    cells, _ = _rank_example()
    with pytest.raises(ExceiverInputError, match="scaler lacks"):
        make_batch(cells, [0], loaded, TokenizerConfig(max_tokens=3, token_selection="rank"))
    assert len(_genes(make_batch(cells, [0], loaded, TokenizerConfig(max_tokens=3, token_selection="variable")), 0)) == 3


def test_a_non_positive_median_is_refused_as_corrupt(tmp_path):
    scaler = _scaler(6, expressed_median=np.array([1, 2, 0, 3, 4, 5], np.float32))
    with pytest.raises(ModelFileError, match="non-positive median"):
        load_model_files(_model_folder(tmp_path, scaler))
