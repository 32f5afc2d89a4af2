"""Pretraining on the shared real datasets (needs EXCEIVER_SHARED)."""

import csv
import logging

import anndata as ad
import pytest

from exceiver import Exceiver, pretrain
from exceiver.data.vocab import read_gene_list

from conftest import TINY


@pytest.mark.slow
def test_validation_loss_falls_on_real_pbmc_counts(shared_dir, tmp_path):
    data = shared_dir / "data" / "pbmc3k_seurat_2638.h5ad"
    out = tmp_path / "pbmc"
    small = dict(gene_dim=16, n_latents=16, latent_dim=32, n_layers=2, n_heads=4, cross_heads=4, ff_dim=64,
                 zero_query_ratio=0.0, detection_weight=0.0, contrastive_weight=0.0, count_weight=0.0,
                 value_detach=False)  # the masked-value task alone
    model = pretrain(data, out, model=small, max_epochs=4, learning_rate=3e-3, progress=False)
    with open(out / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["val_masked_mse"]]
    losses = [float(r["val_masked_mse"]) for r in rows]
    assert len(losses) == 4
    assert losses[-1] < 0.95 * losses[0], losses
    assert float(rows[-1]["val_mse_ratio"]) < 0.95  # below the gene-mean baseline: context is used
    assert model.metrics["val_masked_mse"] == pytest.approx(min(losses), rel=1e-5)
    assert all(float(r["val_gene_mean_mse"]) == pytest.approx(float(rows[0]["val_gene_mean_mse"])) for r in rows)
    assert Exceiver.load(out).metrics["n_cells"] == 2638


def test_two_real_datasets_with_different_gene_sets(shared_dir, tmp_path, caplog):
    files = [shared_dir / "data" / "pbmc_small_seuratobject_80.h5ad",
             shared_dir / "data" / "scde_mouse_esc_mef_40.h5ad"]
    genes = shared_dir / "genes" / "protein_coding_genes_hgnc.txt"
    with caplog.at_level(logging.WARNING):
        model = pretrain(files, None, model=TINY, genes=genes, n_top_genes=0, max_epochs=1, progress=False)
    assert "scde_mouse_esc_mef_40: only" in caplog.text
    assert model.metrics["datasets"]["pbmc_small_seuratobject_80"] == 80
    # The vocabulary (all genes kept): both files' genes in order of first appearance, restricted to the gene list.
    union = list(dict.fromkeys(g for f in files for g in ad.read_h5ad(f, backed="r").var_names))
    allowed = set(read_gene_list(genes))
    expected = [g for g in union if g in allowed]
    assert list(model.vocab.genes) == expected and 0 < len(expected) < len(union)
