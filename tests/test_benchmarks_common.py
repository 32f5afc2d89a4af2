"""benchmarks/common.py: its targets are real shared files with the columns they name, and its PCA
recipes compute what their names say."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from exceiver.errors import ExceiverInputError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402

SMALL = "pbmc_small_seuratobject_80"  # 80 cells x 230 genes
FEW_CELLS_MANY_GENES = "scde_mouse_esc_mef_40"  # 40 cells x 14,897 genes: the HVG step chooses


def _obs_and_var(path: Path) -> tuple:
    adata = ad.read_h5ad(path, backed="r")
    try:
        return adata.obs.copy(), adata.var.copy()
    finally:
        adata.file.close()


def _read(shared_dir: Path, name: str) -> ad.AnnData:
    return ad.read_h5ad(shared_dir / "data" / f"{name}.h5ad")


@pytest.mark.parametrize("name", sorted(common.TARGETS))
def test_every_target_is_a_shared_file_with_the_columns_it_names(shared_dir, name):
    target = common.TARGETS[name]
    path = target.path(shared_dir / "data")
    assert path.is_file(), path
    obs, var = _obs_and_var(path)
    assert target.label_key in obs.columns
    assert obs[target.label_key].dropna().nunique() >= 2  # something to separate
    if target.batch_key:
        assert target.batch_key in obs.columns
        assert obs[target.batch_key].nunique() >= 2  # something to mix
    if target.gene_key:
        assert target.gene_key in var.columns
        assert var[target.gene_key].astype(str).str.len().gt(0).mean() > 0.5
    assert set(obs["species"].astype(str)) == {target.species}


def test_label_tasks_are_targets_and_their_references_are_what_the_docs_say(shared_dir):
    assert all(t in common.TARGETS.values() for t in common.LABEL_TASKS.values())
    cellbench = common.LABEL_TASKS["cellbench_cell_line"]
    adata = cellbench.read(shared_dir / "data")
    ref = common.reference_cells("cellbench_cell_line", adata, seed=3)
    np.testing.assert_array_equal(ref, (adata.obs["assay"] == "CEL-seq2").to_numpy())
    assert 0 < ref.sum() < adata.n_obs
    assert set(adata.obs["assay"][~ref]) == {"Drop-seq"}
    pbmc3k = ad.read_h5ad(common.LABEL_TASKS["pbmc3k_cell_type"].path(shared_dir / "data"), backed="r")
    first, again, other = (common.reference_cells("pbmc3k_cell_type", pbmc3k, seed) for seed in (0, 0, 1))
    pbmc3k.file.close()
    assert first.shape == (2638,) and first.sum() == 264  # a random 10%, fixed by the seed
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()


def test_corpora_are_shared_files_of_their_species_and_hold_no_target(shared_dir):
    targets = {t.file for t in common.TARGETS.values()}
    for files, species in ((common.HUMAN_CORPUS, "human"), (common.MOUSE_CORPUS, "mouse")):
        for file in files:
            assert file not in targets
            obs, _ = _obs_and_var(shared_dir / "data" / f"{file}.h5ad")
            assert set(obs["species"].astype(str)) == {species}, file
    assert "pbmc_small_seuratobject_80" not in common.HUMAN_CORPUS  # a subset of pbmc3k


def test_a_missing_target_file_is_one_clear_error(tmp_path):
    with pytest.raises(ExceiverInputError, match="EXCEIVER_SHARED"):
        common.TARGETS["pbmc3k"].read(tmp_path)


@pytest.mark.parametrize("key", sorted(common.PCA_RECIPES))
def test_each_pca_recipe_returns_50_ordered_centred_components_per_cell(shared_dir, key):
    adata = _read(shared_dir, SMALL)
    x = common.PCA_RECIPES[key](adata)
    assert x.shape == (80, 50) and x.dtype == np.float32
    assert np.isfinite(x).all()
    variance = x.var(axis=0)
    assert np.abs(x.mean(axis=0)).max() < 1e-3 * np.sqrt(variance[0])
    assert (np.diff(variance) <= 1e-4 * variance[0]).all()  # components by explained variance


@pytest.mark.parametrize("key", sorted(common.PCA_RECIPES))
def test_each_pca_recipe_gives_at_most_cells_minus_one_components(shared_dir, key):
    adata = _read(shared_dir, FEW_CELLS_MANY_GENES)
    assert common.PCA_RECIPES[key](adata).shape == (40, 39)


def _scanpy_tutorial(adata: ad.AnnData, scale: bool, n_comps: int) -> np.ndarray:
    """The recipes as scanpy's own calls spell them (the benchmarks' former PCA code)."""
    logn = ad.AnnData(adata.X.astype(np.float32))
    sc.pp.normalize_total(logn, target_sum=1e4)
    sc.pp.log1p(logn)
    sc.pp.highly_variable_genes(logn, n_top_genes=2000, subset=True)
    if scale:
        sc.pp.scale(logn, max_value=10)
    sc.pp.pca(logn, n_comps=n_comps, random_state=0)
    return logn.obsm["X_pca"]


def test_the_recipes_are_scanpys_calls_on_2000_hvgs_scaled_or_not(shared_dir):
    adata = _read(shared_dir, FEW_CELLS_MANY_GENES)
    scaled, unscaled = common.pca_hvg2000_seurat_scaled_50(adata), common.pca_hvg2000_seurat_50(adata)
    np.testing.assert_allclose(scaled, _scanpy_tutorial(adata, scale=True, n_comps=39), atol=1e-4)
    expected = _scanpy_tutorial(adata, scale=False, n_comps=39)
    np.testing.assert_allclose(np.abs(unscaled), np.abs(expected), atol=1e-3 * np.abs(expected).max())  # up to sign
    assert np.abs(np.abs(scaled) - np.abs(unscaled)).max() > 1.0  # scaling is a different recipe


def test_held_out_cells_do_not_shape_the_unscaled_recipe(shared_dir):
    adata = _read(shared_dir, SMALL)
    fit = np.arange(60)
    x = common.pca_hvg2000_seurat_50(adata, fit_cells=fit)
    assert x.shape == (80, 50)
    changed = adata.copy()
    changed.X = sp.vstack([adata.X[:60], adata.X[60:][:, ::-1]]).tocsr()  # other held-out cells: genes shuffled
    y = common.pca_hvg2000_seurat_50(changed, fit_cells=fit)
    np.testing.assert_allclose(x[:60], y[:60], atol=1e-5)
    assert np.abs(x[60:] - y[60:]).max() > 0.1  # the held-out cells are projected, as they are
    full = common.pca_hvg2000_seurat_50(adata)
    assert np.abs(np.abs(full[:, 0]) - np.abs(x[:, 0])).max() > 1e-3  # fitting on all cells differs


def test_every_recipe_key_a_table_prints_has_a_label_that_says_the_recipe():
    for key in common.PCA_RECIPES:
        label = common.pca_recipe_label(key)
        assert label.startswith("PCA (50 comps, 2,000 HVG seurat, ")
        assert label.endswith("scaled, clipped at 10)" if "scaled" in key else "unscaled)")
    assert common.pca_recipe_label("pca20_all") == "PCA (20 comps, all expressed genes, unscaled)"
    assert common.pca_recipe_label("pca50_hvg2000") == "PCA (50 comps, 2,000 HVG seurat of expressed genes, unscaled)"
    legend = common.pca_legend(["pca_hvg2000_seurat_50", "pca20_all"]).splitlines()
    assert legend[0].startswith("pca_hvg2000_seurat_50: PCA (50 comps") and len(legend) == 2
    with pytest.raises(ExceiverInputError, match="no PCA recipe"):
        common.pca_recipe_label("pca")


def test_results_are_written_whole_and_never_over_another_file(tmp_path):
    path = tmp_path / "result.json"
    common.write_result({"a": 1}, path)
    common.write_result({"a": 2, "b": [1, 2]}, path)
    assert json.loads(path.read_text()) == {"a": 2, "b": [1, 2]}
    assert common.read_result(path, {}) == {"a": 2, "b": [1, 2]}
    assert common.read_result(tmp_path / "none.json", []) == []
    notes = tmp_path / "notes.json"
    notes.write_text("my notes, not JSON")
    with pytest.raises(ExceiverInputError):
        common.write_result({"a": 3}, notes)
    assert notes.read_text() == "my notes, not JSON"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json", "result.json"]  # nothing staged left


def test_threads_pins_torch_and_what_pretrain_reads(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    try:
        common.threads(None)
        assert os.environ["OMP_NUM_THREADS"] == "7" and torch.get_num_threads() == before
        common.threads(1)
        assert os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
