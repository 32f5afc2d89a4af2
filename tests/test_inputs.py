"""Input formats and bad input through the public API and CLI: clear errors, no partial outputs."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import exceiver
from exceiver import Exceiver, ExceiverInputError, pretrain
from exceiver.cli import main
from exceiver.errors import TrainingError
from exceiver.nn.network import ExceiverModule

from conftest import TINY, synthetic_counts


def _nothing_left(folder, *keep):
    return sorted(p.name for p in folder.iterdir()) == sorted(keep)


@pytest.mark.parametrize("convert", [
    lambda x: x.toarray(),                                 # dense
    lambda x: sp.csc_matrix(x),                            # CSC
    lambda x: sp.csr_matrix(x, dtype=np.int64),            # integer counts
    lambda x: sp.csr_matrix(x, dtype=np.float64),          # float64
], ids=["dense", "csc", "int64", "float64"])
def test_matrix_formats_embed_identically(tiny_model_dir, convert):
    model = Exceiver.load(tiny_model_dir)
    reference = synthetic_counts(n_cells=20, seed=7)
    expected = model.embed(reference.copy(), progress=False)
    other = reference.copy()
    other.X = convert(other.X)
    np.testing.assert_allclose(model.embed(other, progress=False), expected, atol=1e-6)


def test_backed_h5ad_and_counts_layer_and_categorical_gene_key(tiny_model_dir, tmp_path):
    model = Exceiver.load(tiny_model_dir)
    reference = synthetic_counts(n_cells=20, seed=8)
    expected = model.embed(reference.copy(), progress=False)
    reference.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    np.testing.assert_allclose(model.embed(backed, progress=False), expected, atol=1e-6)

    layered = reference.copy()
    layered.layers["counts"] = layered.X.copy()
    layered.X = layered.X * 0.5  # not counts: must be ignored when layer="counts"
    np.testing.assert_allclose(model.embed(layered, layer="counts", progress=False), expected, atol=1e-6)

    keyed = reference.copy()
    keyed.var["symbol"] = pd.Categorical(keyed.var_names)
    keyed.var_names = [f"ENSG{i}" for i in range(keyed.n_vars)]
    np.testing.assert_allclose(model.embed(keyed, gene_key="symbol", progress=False), expected, atol=1e-6)


def test_cli_reads_a_counts_layer(tiny_model_dir, tmp_path):
    adata = synthetic_counts(n_cells=15, seed=9)
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    adata.write_h5ad(tmp_path / "in.h5ad")
    assert main(["-q", "embed", str(tiny_model_dir), str(tmp_path / "in.h5ad"), "--out",
                 str(tmp_path / "out.h5ad"), "--layer", "counts"]) == 0
    expected = Exceiver.load(tiny_model_dir).embed(synthetic_counts(n_cells=15, seed=9), progress=False)
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "out.h5ad").obsm["X_exceiver"], expected, atol=1e-6)


def test_long_cells_embed_the_same_wherever_they_sit(tmp_path):
    """Cells with more expressed genes than max_tokens are subsampled by their own content."""
    adata = synthetic_counts(n_cells=30, n_genes=200, seed=10)
    model = pretrain(adata, None, model={**TINY, "max_tokens": 12}, max_epochs=1, progress=False)
    assert adata.X.getnnz(axis=1).min() > 12
    expected = model.embed(adata.copy(), progress=False)
    order = np.random.default_rng(2).permutation(30)
    np.testing.assert_allclose(model.embed(adata[order].copy(), progress=False), expected[order], atol=1e-6)
    np.testing.assert_allclose(model.embed(adata[:7].copy(), batch_size=2, progress=False), expected[:7], atol=1e-6)


def test_pretraining_handles_single_gene_cells_and_tiny_datasets(tmp_path):
    adata = synthetic_counts(n_cells=60, seed=11)
    x = adata.X.tolil()
    for i in range(0, 60, 3):  # every third cell expresses a single gene
        row = x.rows[i][:1], x.data[i][:1]
        x.rows[i], x.data[i] = row
    adata.X = x.tocsr()
    model = pretrain(adata, None, model=TINY, max_epochs=1, progress=False)
    assert np.isfinite(model.metrics["val_masked_mse"])
    with pytest.raises(ExceiverInputError, match="at least 2 cells"):
        pretrain(synthetic_counts(n_cells=1), None, model=TINY, max_epochs=1, progress=False)
    single = synthetic_counts(n_cells=6)
    single.X = sp.csr_matrix((np.ones(6, np.float32), np.arange(6), np.arange(7)), shape=(6, 200))
    with pytest.raises(ExceiverInputError, match="no training cell has 2 or more expressed genes"):
        pretrain(single, tmp_path / "m", model=TINY, max_epochs=1, progress=False)
    assert _nothing_left(tmp_path)


def test_invalid_training_settings_are_named():
    with pytest.raises(ExceiverInputError, match="batch_size must be >= 1.*val_fraction must be between"):
        exceiver.TrainingConfig(batch_size=0, val_fraction=1.5)
    with pytest.raises(ExceiverInputError, match="strategy='ddp_spawn' is not supported: use strategy='ddp'"):
        exceiver.TrainingConfig(strategy="ddp_spawn")
    with pytest.raises(ExceiverInputError, match="num_nodes must be >= 1"):
        exceiver.TrainingConfig(num_nodes=0)
    with pytest.raises(ValueError, match="model sizes must be positive"):
        exceiver.ExceiverConfig(n_heads=0)


def test_diverged_training_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    encode = ExceiverModule.encode

    def nan_latents(self, *args, **kwargs):  # every objective decodes from the latents
        return encode(self, *args, **kwargs) * float("nan")

    monkeypatch.setattr(ExceiverModule, "encode", nan_latents)
    with pytest.raises(TrainingError, match="no finite validation loss"):
        pretrain(synthetic_counts(n_cells=40), tmp_path / "new" / "deep" / "model", model=TINY,
                 max_epochs=1, progress=False)
    assert _nothing_left(tmp_path)  # no model folder, no parents created for it


def test_zero_gene_queries_are_trained_and_reported():
    model = pretrain(synthetic_counts(n_cells=60), None, model={**TINY, "zero_query_ratio": 1.0,
                                                                 "detection_weight": 0.0}, max_epochs=2, progress=False)
    assert np.isfinite(model.metrics["val_zero_mse"])
    assert model.tokenizer.zero_query_ratio == 1.0


def test_validation_every_n_steps(tmp_path):
    import csv

    pretrain(synthetic_counts(n_cells=200), tmp_path / "m", model=TINY, max_epochs=1, batch_size=16,
             val_every_steps=4, progress=False)
    with open(tmp_path / "m" / "logs" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["val_masked_mse"]]
    assert steps[:3] == [3, 7, 11]


def test_outputs_never_clobber_files_or_folders(tmp_path, tiny_model_dir, counts_file, capsys):
    a_file = tmp_path / "model.txt"
    a_file.write_text("not a folder")
    with pytest.raises(ExceiverInputError, match="is a file; the output must be a folder"):
        pretrain(synthetic_counts(n_cells=30), a_file, model=TINY, max_epochs=1, progress=False, overwrite=True)
    assert a_file.read_text() == "not a folder"

    existing = tmp_path / "existing.h5ad"
    existing.write_text("keep")
    assert main(["-q", "embed", str(tiny_model_dir), str(counts_file), "--out", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err and existing.read_text() == "keep"
    # --overwrite replaces only what exceiver wrote: not the user's file, but an earlier embedding
    assert main(["-q", "embed", str(tiny_model_dir), str(counts_file), "--out", str(existing), "--overwrite"]) == 2
    assert "was not written by exceiver" in capsys.readouterr().err and existing.read_text() == "keep"
    existing.unlink()
    for _ in range(2):
        assert main(["-q", "embed", str(tiny_model_dir), str(counts_file), "--out", str(existing), "--overwrite"]) == 0
    assert ad.read_h5ad(existing).obsm["X_exceiver"].shape[0] == 120


def test_cli_pretrain_refuses_bad_counts_and_leaves_nothing(tmp_path, capsys):
    adata = synthetic_counts(n_cells=30)
    adata.X.data[3] = np.nan
    adata.write_h5ad(tmp_path / "nan.h5ad")
    assert main(["-q", "pretrain", str(tmp_path / "nan.h5ad"), "--out", str(tmp_path / "m")]) == 2
    assert "NaN or infinite" in capsys.readouterr().err
    assert main(["-q", "pretrain", str(tmp_path / "nan.h5ad"), "--out", str(tmp_path / "m"), "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    assert _nothing_left(tmp_path, "nan.h5ad")


def test_demo_refuses_a_folder_that_is_not_an_earlier_demo(tmp_path):
    from exceiver.demo import run_demo

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ExceiverInputError, match="already exists"):
        run_demo(tmp_path, max_minutes=0.01, progress=False)
    with pytest.raises(ExceiverInputError, match=r"holds files exceiver did not write \(notes.txt\)"):
        run_demo(tmp_path, max_minutes=0.01, progress=False, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_demo_writes_its_report_model_embedding_and_umap(tmp_path):
    from exceiver.demo import pbmc68k_counts, run_demo

    counts = pbmc68k_counts()
    assert counts.shape == (700, 765) and counts.obs["cell_type"].nunique() == 10
    np.testing.assert_array_equal(counts.X.data, np.round(counts.X.data))
    report = run_demo(tmp_path / "demo", max_minutes=0.1, progress=False)
    names = {p.name for p in (tmp_path / "demo").iterdir()}
    assert {"continued_model", "scratch_model", "pbmc68k_exceiver.h5ad", "umap.png", "report.md",
            "demo_metrics.json"} <= names
    assert "kNN (k=15)" in report and "gene-mean MSE" in report and "Label transfer" in report
    embedded = ad.read_h5ad(tmp_path / "demo" / "pbmc68k_exceiver.h5ad")
    continued = Exceiver.load(tmp_path / "demo" / "continued_model")
    assert continued.metrics["init"]["model"] == "in memory" and len(continued.vocab) > len(Exceiver.pretrained("human-mouse-small").vocab)
    width = continued.module.config.bottleneck_dim
    for key in ("X_shipped", "X_continued", "X_scratch"):
        assert embedded.obsm[key].shape == (700, width) and np.isfinite(embedded.obsm[key]).all()
    metrics = json.loads((tmp_path / "demo" / "demo_metrics.json").read_text())
    assert set(metrics["knn_k15_held_out"]) == {"X_shipped", "X_continued", "X_scratch", "X_pca"}
    held_out = embedded.obs["held_out"].astype(bool).to_numpy()
    assert held_out.sum() == 140 and embedded.obs["exceiver_label"][held_out].notna().all()
    assert embedded.obs["exceiver_label"][~held_out].isna().all()
    run_demo(tmp_path / "demo", max_minutes=0.05, progress=False)  # an earlier demo is replaced
