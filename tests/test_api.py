import json
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from exceiver import Exceiver, ExceiverInputError, ModelFileError, pretrain
from exceiver.train.plans import PretrainingPlan

from conftest import TINY, synthetic_counts


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if any(s in p.name for s in (".partial", ".old", ".lock", ".exceiver-run"))]


def test_model_folder_has_the_documented_files(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "genes.txt", "scaler.safetensors", "metrics.json"} <= names
    metrics = json.loads((tiny_model_dir / "metrics.json").read_text())
    for key in ("val_masked_mse", "val_gene_mean_mse", "n_train_cells", "n_val_cells", "epochs", "seconds"):
        assert key in metrics
    assert metrics["n_train_cells"] + metrics["n_val_cells"] == 120
    assert metrics["epochs"] == 2 and metrics["stopped_by"] == "max_epochs"
    assert (tiny_model_dir / "logs" / "metrics.csv").is_file()
    # One best-weights mechanism (in memory): no Lightning checkpoints, and so no pickles, in the folder.
    assert not any(p.suffix in (".ckpt", ".pt", ".pkl") for p in tiny_model_dir.rglob("*"))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["format_version"] == 2 and {"architecture", "tokenizer", "objectives", "training", "data"} <= set(config)


def test_save_load_gives_identical_outputs(tiny_model_dir, tmp_path):
    model = Exceiver.load(tiny_model_dir)
    adata = synthetic_counts(n_cells=50, seed=3)
    first = model.embed(adata, progress=False).copy()
    model.save(tmp_path / "copy")
    again = Exceiver.load(tmp_path / "copy").embed(adata, progress=False)
    np.testing.assert_array_equal(first, again)
    flat = model.embed(adata, key_added="X_flat", pooling="flatten", progress=False)
    assert flat.shape == (50, TINY["n_latents"] * TINY["latent_dim"])
    # The mean embedding is the mean of the flattened latents.
    mean = model.embed(adata, key_added="X_mean", pooling="mean", progress=False)
    np.testing.assert_allclose(flat.reshape(50, TINY["n_latents"], -1).mean(1), mean, atol=1e-5)
    # The default embedding is the cell bottleneck that the count decoder reads.
    assert adata.obsm["X_exceiver"].shape == (50, model.module.config.bottleneck_dim)
    assert adata.uns["exceiver"]["X_flat"]["pooling"] == "flatten"


def test_embeddings_do_not_depend_on_batch_size_or_cell_order(tiny_model_dir):
    model = Exceiver.load(tiny_model_dir)
    adata = synthetic_counts(n_cells=40, seed=4)
    whole = model.embed(adata, batch_size=64, progress=False).copy()
    small = model.embed(adata, batch_size=3, progress=False)
    np.testing.assert_allclose(whole, small, atol=1e-5)
    order = np.random.default_rng(0).permutation(40)
    shuffled = model.embed(adata[order].copy(), progress=False)
    np.testing.assert_allclose(shuffled, whole[order], atol=1e-5)


def test_gene_embeddings_are_indexed_by_gene(tiny_model_dir):
    model = Exceiver.load(tiny_model_dir)
    genes = model.gene_embeddings()
    assert genes.shape == (200, TINY["gene_dim"])
    assert genes.index[0] == "G0000" and genes.index.name == "gene"
    np.testing.assert_array_equal(genes.to_numpy(), model.module.gene_emb.weight[:200].detach().numpy())


def test_embed_aligns_genes_by_name(tiny_model_dir):
    """A dataset with genes in another order, plus unknown genes, embeds like the original."""
    model = Exceiver.load(tiny_model_dir)
    adata = synthetic_counts(n_cells=20, seed=5)
    reference = model.embed(adata, progress=False).copy()
    order = np.random.default_rng(1).permutation(adata.n_vars)
    extra = sp.csr_matrix(np.ones((20, 3), np.float32))  # counts of genes the model does not know
    combined = ad.AnnData(sp.hstack([adata.X[:, order], extra], format="csr"), obs=adata.obs,
                          var=pd.DataFrame(index=list(adata.var_names[order]) + ["X1", "X2", "X3"]))
    np.testing.assert_allclose(model.embed(combined, progress=False), reference, atol=1e-5)


def test_embed_refuses_bad_input(tiny_model_dir):
    model = Exceiver.load(tiny_model_dir)
    adata = synthetic_counts(n_cells=10, seed=6)
    adata.X = sp.diags((np.arange(10) != 2).astype(np.float32)) @ adata.X  # cell 2 has no counts
    adata.X.eliminate_zeros()
    with pytest.raises(ExceiverInputError, match="1 of 10 cells have no counts"):
        model.embed(adata, progress=False)
    other = synthetic_counts(n_cells=10, prefix="ENSG")
    with pytest.raises(ExceiverInputError, match="none of its 200 genes is in the model's vocabulary"):
        model.embed(other, progress=False)
    with pytest.raises(ValueError, match="unknown pooling"):
        model.embed(synthetic_counts(n_cells=5), pooling="max", progress=False)
    assert "X_exceiver" not in other.obsm


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "genes.txt").unlink(), "lacks genes.txt"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json is corrupt"),
        (lambda d: (d / "config.json").write_text('{"model_type": "bert"}'), "was not written by exceiver"),
        (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:500]),
         "corrupt or truncated"),
        (lambda d: (d / "model.safetensors").write_bytes(pickle.dumps({"weights": [1, 2]})), "corrupt or truncated"),
        (lambda d: (d / "scaler.safetensors").write_bytes(b"\x00" * 40), "corrupt or truncated"),
        (lambda d: (d / "genes.txt").write_text("A\nB\n"), "statistics for 200 genes.*lists 2"),
    ],
)
def test_load_names_the_broken_file(tiny_model_dir, tmp_path, damage, message):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    damage(folder)
    with pytest.raises(ModelFileError, match=message):
        Exceiver.load(folder)


def test_load_refuses_weights_from_another_model(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    save_file({"encoder.layer.0.weight": torch.zeros(3, 3)}, folder / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"does not match config.json: \d+ weights missing \(e.g. latents.*"
                                             r"1 unexpected weights \(e.g. encoder.layer.0.weight\)"):
        Exceiver.load(folder)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["architecture"]["gene_dim"] = 16
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(tiny_model_dir / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"wrong shape.*gene_emb.weight \(202, 8\) vs \(202, 16\)"):
        Exceiver.load(folder)
    with pytest.raises(ModelFileError, match="does not exist"):
        Exceiver.load(tmp_path / "nowhere")


def test_pretrain_leaves_no_partial_folder_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "model"
    bad = synthetic_counts(n_cells=30)
    bad.X.data[0] = -1
    with pytest.raises(ExceiverInputError, match="negative"):
        pretrain(bad, out, model=TINY, max_epochs=1, progress=False)
    assert not out.exists() and not _leftovers(tmp_path)

    def broken_write(self, folder):
        (folder / "half-written").write_text("x")
        raise RuntimeError("training crashed")

    monkeypatch.setattr(Exceiver, "write", broken_write)
    with pytest.raises(RuntimeError, match="training crashed"):
        pretrain(synthetic_counts(n_cells=30), out, model=TINY, max_epochs=1, progress=False)
    assert not out.exists() and not _leftovers(tmp_path)


def test_pretrain_overwrites_only_what_exceiver_wrote(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ExceiverInputError, match="already exists"):
        pretrain(synthetic_counts(n_cells=30), out, model=TINY, max_epochs=1, progress=False)
    with pytest.raises(ExceiverInputError, match=r"model holds files exceiver did not write \(precious.txt\)"):
        pretrain(synthetic_counts(n_cells=30), out, model=TINY, max_epochs=1, progress=False, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    (out / "precious.txt").unlink()
    pretrain(synthetic_counts(n_cells=30), out, model=TINY, max_epochs=1, progress=False)  # an empty folder is fine
    first = (out / "model.safetensors").read_bytes()
    pretrain(synthetic_counts(n_cells=30), out, model=TINY, max_epochs=1, progress=False, overwrite=True, seed=3)
    assert (out / "model.safetensors").read_bytes() != first  # exceiver's own output is replaced
    (out / "logs" / "notes.md").write_text("my analysis")  # ... until the user adds to it
    with pytest.raises(ExceiverInputError, match="logs/notes.md"):
        pretrain(synthetic_counts(n_cells=30), out, model=TINY, max_epochs=1, progress=False, overwrite=True)
    assert (out / "logs" / "notes.md").read_text() == "my analysis"
    assert not _leftovers(tmp_path)


def test_pretrain_on_several_datasets_with_different_genes(tmp_path):
    one = synthetic_counts(n_cells=40, n_genes=150, seed=1)
    two = synthetic_counts(n_cells=30, n_genes=200, seed=2)[:, 50:].copy()  # genes 50..199
    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(f"G{j:04d}" for j in range(0, 200, 2)))  # even genes only
    model = pretrain([one, two], None, model=TINY, genes=genes, n_top_genes=0, max_epochs=1, progress=False)
    assert len(model.vocab) == 100 and all(int(g[1:]) % 2 == 0 for g in model.vocab.genes)
    assert model.metrics["datasets"] == {"adata0": 40, "adata1": 30}
    # Genes 150..199 were measured only in the second dataset (30 cells, of which some train).
    n_cells = model.scaler.n_cells
    assert n_cells[model.vocab.ids(["G0100"])[0]] == model.metrics["n_train_cells"]
    assert n_cells[model.vocab.ids(["G0180"])[0]] < model.metrics["n_train_cells"]
    assert n_cells[model.vocab.ids(["G0000"])[0]] < model.metrics["n_train_cells"]


def test_pretrain_reports_bad_paths(tmp_path):
    with pytest.raises(ExceiverInputError, match="does not exist"):
        pretrain(tmp_path / "missing.h5ad", tmp_path / "m", progress=False)
    junk = tmp_path / "junk.h5ad"
    junk.write_text("not hdf5")
    with pytest.raises(ExceiverInputError, match="cannot read .*junk.h5ad"):
        pretrain(junk, tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()


def test_gene_key_applies_to_the_datasets_that_have_it(caplog):
    import logging

    symbols = synthetic_counts(n_cells=30, seed=1)
    ensembl = synthetic_counts(n_cells=30, seed=2, prefix="ENSG")
    ensembl.var["gene_symbol"] = [f"G{j:04d}" for j in range(200)]
    with caplog.at_level(logging.INFO):
        model = pretrain([symbols, ensembl], None, model=TINY, gene_key="gene_symbol", max_epochs=1, progress=False)
    assert len(model.vocab) == 200 and "adata0 has no var column 'gene_symbol'" in caplog.text
    assert model.metrics["datasets"] == {"adata0": 30, "adata1": 30}
    with pytest.raises(ExceiverInputError, match="gene_key='symbol' names no column of var in any dataset"):
        pretrain([symbols, ensembl], None, model=TINY, gene_key="symbol", max_epochs=1, progress=False)


@pytest.mark.slow
def test_stop_reasons_are_reported(monkeypatch):
    timed = pretrain(synthetic_counts(n_cells=200), None, model=TINY, max_epochs=1000, max_minutes=0.03,
                     batch_size=8, progress=False)
    assert timed.metrics["stopped_by"] == "max_minutes" and timed.metrics["epochs"] < 1000

    original = PretrainingPlan.training_step
    monkeypatch.setattr(PretrainingPlan, "training_step",
                        lambda self, batch, i: 0.0 * original(self, batch, i))  # weights never move
    stuck = pretrain(synthetic_counts(n_cells=60), None, model=TINY, max_epochs=50, patience=2,
                     weight_decay=0.0, progress=False)
    assert stuck.metrics["stopped_by"] == "early_stopping" and stuck.metrics["epochs"] == 3


def test_predict_values_of_chosen_genes(tiny_model_dir, counts_adata):
    model = Exceiver.load(tiny_model_dir)
    every = model.predict_values(counts_adata, progress=False)
    assert every.shape == (counts_adata.n_obs, len(model.vocab)) and np.isfinite(every).all()
    chosen = model.predict_values(counts_adata, ["G0005", "G0001"], progress=False)
    np.testing.assert_allclose(chosen, every[:, [5, 1]], atol=1e-5)
    with pytest.raises(ExceiverInputError, match="not in the model's vocabulary"):
        model.predict_values(counts_adata, ["NOT_A_GENE"], progress=False)
    with pytest.raises(ExceiverInputError, match="no class head"):
        model.predict_proba(counts_adata, progress=False)


def test_paper_compatible_models_pretrain_save_and_load(tmp_path):
    adata = synthetic_counts(n_cells=60, n_genes=80)
    objectives = {"zero_query_ratio": 0.0, "detection_weight": 0.0, "contrastive_weight": 0.0}  # the paper's: MSE
    model = pretrain(adata, tmp_path / "paper", model={**TINY, "paper_compatible": True, **objectives}, max_epochs=2,
                     batch_size=16, progress=False)
    loaded = Exceiver.load(tmp_path / "paper")
    assert loaded.config.paper_compatible
    np.testing.assert_array_equal(model.embed(adata, progress=False), loaded.embed(adata, progress=False))
    assert np.isfinite(model.metrics["val_masked_mse"])


def test_pretraining_refuses_a_class_head_and_paper_mode_refuses_zero_queries(tmp_path):
    with pytest.raises(ExceiverInputError, match="use finetune"):
        pretrain(synthetic_counts(), tmp_path / "m", model={**TINY, "n_classes": 3}, max_epochs=1, progress=False)
    assert not (tmp_path / "m").exists()
    with pytest.raises(ExceiverInputError, match="not available when every measured gene is a token"):
        pretrain(synthetic_counts(), None, model={**TINY, "paper_compatible": True, "zero_query_ratio": 1.0})


def test_a_model_remembers_its_gene_key_and_layer(tmp_path):
    """Data shaped like the training data needs no gene_key / layer again; a call can override."""
    adata = synthetic_counts(n_cells=60, seed=6, prefix="ENSG")
    adata.var["symbol"] = [f"G{j:04d}" for j in range(adata.n_vars)]
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X * 0.5  # X holds something else than counts
    pretrain(adata, tmp_path / "m", model=TINY, gene_key="symbol", layer="counts", max_epochs=1, progress=False)
    model = Exceiver.load(tmp_path / "m")
    assert (model.gene_key, model.layer) == ("symbol", "counts") and model.vocab.genes[0] == "G0000"
    new = synthetic_counts(n_cells=20, seed=7, prefix="ENSG")
    new.var["symbol"] = [f"G{j:04d}" for j in range(new.n_vars)]
    new.layers["counts"] = new.X.copy()
    new.X = new.X.power(2)  # X holds other values: only the remembered layer gives the right embedding
    remembered = model.embed(new, inplace=False, progress=False)
    explicit = model.embed(new, inplace=False, gene_key="symbol", layer="counts", progress=False)
    np.testing.assert_array_equal(remembered, explicit)
    from_x = model.embed(new, inplace=False, layer="X", progress=False)  # the default, asked for by name
    assert np.abs(from_x - remembered).max() > 1e-3
    symbols = synthetic_counts(n_cells=20, seed=7)  # symbols as var_names, counts in X: no column, no layer
    np.testing.assert_allclose(model.embed(symbols, inplace=False, progress=False), remembered, atol=1e-6)
    no_symbols = new.copy()
    del no_symbols.var["symbol"]  # Ensembl ids alone do not match the model's symbols
    with pytest.raises(ExceiverInputError, match="none of its 200 genes is in the model's vocabulary"):
        model.embed(no_symbols, inplace=False, progress=False)


def test_embed_returns_or_writes_under_key_added(tiny_model_dir):
    model = Exceiver.load(tiny_model_dir)
    adata = synthetic_counts(n_cells=10, seed=8)
    returned = model.embed(adata, inplace=False, progress=False)
    assert "X_exceiver" not in adata.obsm and "exceiver" not in adata.uns
    written = model.embed(adata, key_added="X_mine", progress=False)
    np.testing.assert_array_equal(adata.obsm["X_mine"], returned)
    np.testing.assert_array_equal(written, returned)
    assert adata.uns["exceiver"]["X_mine"] == {"pooling": "bottleneck", "n_genes": 200}


def test_broken_model_configs_are_refused_in_one_line(tiny_model_dir, tmp_path, capsys):
    import shutil

    from exceiver.cli import main

    counts = tmp_path / "cells.h5ad"
    synthetic_counts(n_cells=5).write_h5ad(counts)
    for name, edit in [("sizes", lambda c: c["architecture"].update(n_genes=0)),
                       ("objectives", lambda c: c.update(objectives=None)),
                       ("data", lambda c: c.update(data=[1])),
                       ("tokenizer", lambda c: c.pop("tokenizer")),
                       ("mode", lambda c: c["tokenizer"].update(all_genes=True))]:
        folder = tmp_path / name
        shutil.copytree(tiny_model_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ModelFileError, match="config.json"):
            Exceiver.load(folder)
        assert main(["-q", "embed", str(folder), str(counts), "--out", str(tmp_path / "out.h5ad")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("exceiver embed: error:") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.h5ad").exists()
