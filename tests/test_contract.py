"""The data contract on synthetic data: what a call overrides, what a model remembers, and the
refusals, in one place for every tool."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from conftest import TINY, synthetic_counts
from exceiver import Exceiver, ExceiverInputError, finetune, pretrain
from exceiver.evaluate import evaluate
from exceiver.tl import impute


def test_tools_refuse_a_model_folder_in_one_line(tiny_model_dir, counts_adata, tmp_path):
    with pytest.raises(ExceiverInputError, match=r"^expected a trained model, got PosixPath .*Exceiver.load"):
        evaluate(tiny_model_dir, counts_adata, tmp_path / "report", progress=False)
    with pytest.raises(ExceiverInputError, match="expected a trained model, got str"):
        impute(str(tiny_model_dir), counts_adata, progress=False)
    assert not (tmp_path / "report").exists()


def test_impute_fills_the_genes_of_var_when_counts_are_in_raw(tiny_model_dir):
    model = Exceiver.load(tiny_model_dir)
    counts = synthetic_counts(n_cells=30)
    adata = counts[:, :150].copy()  # X holds 150 of the genes, raw all 200 (as after HVG selection)
    adata.raw = counts
    imputed = impute(model, adata, layer="raw", progress=False)
    assert imputed.shape == (30, 150) and adata.layers["exceiver_imputed"].shape == (30, 150)
    np.testing.assert_allclose(imputed, impute(model, counts, progress=False)[:, :150], atol=1e-5)


def test_a_classifier_remembers_how_it_was_told_to_read(tiny_model_dir):
    model = Exceiver.load(tiny_model_dir)
    adata = synthetic_counts(n_cells=90, seed=3)
    adata.var["symbol"] = adata.var_names
    adata.var_names = [f"ID{i}" for i in range(adata.n_vars)]
    clf = finetune(model, adata, "cell_type", mode="freeze", gene_key="symbol", progress=False)
    assert clf.gene_key == "symbol" and model.gene_key is None
    np.testing.assert_allclose(clf.predict_proba(adata, progress=False),  # no gene_key repeated
                               clf.predict_proba(adata, gene_key="symbol", progress=False))


def test_continued_training_takes_a_gene_key_where_a_dataset_has_it(tiny_model_dir):
    base = Exceiver.load(tiny_model_dir)
    keyed = synthetic_counts(n_cells=60, seed=5)
    keyed.var["symbol"] = keyed.var_names
    keyed.var_names = [f"ID{i}" for i in range(keyed.n_vars)]
    plain = synthetic_counts(n_cells=60, seed=6)  # no "symbol" column: read by var_names
    model = pretrain([keyed, plain], None, init=base, gene_key="symbol", max_epochs=1, progress=False)
    assert sum(model.metrics["datasets"].values()) == 120
    assert model.gene_key == "symbol"


def test_a_remembered_key_is_looked_up_in_the_var_that_holds_the_counts(tiny_model_dir):
    """Counts in adata.raw: the gene column is raw.var's (a remembered key missing there is not asked for)."""
    model = Exceiver.load(tiny_model_dir)
    counts = synthetic_counts(n_cells=20)
    adata = ad.AnnData(sp.csr_matrix(np.ones((20, 3), dtype=np.float32)), obs=counts.obs)
    adata.var["symbol"] = ["a", "b", "c"]
    adata.raw = counts
    model.contract = type(model.contract)(gene_key="symbol", layer=None)
    assert model.read(adata, layer="raw").measured.sum() == 200
