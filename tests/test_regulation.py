"""Imputation, in-silico perturbation and gene-gene dependencies on a tiny pretrained model."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from exceiver import Exceiver, ExceiverInputError
from exceiver.tl import gene_dependencies, impute, perturb
from exceiver.cli import main
from exceiver.tl import perturbation as perturb_module
from exceiver.tl.edit import knockout, set_value
from exceiver.data.tokenizer import make_batch

from conftest import TINY, synthetic_counts


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return Exceiver.load(tiny_model_dir)


@pytest.fixture
def adata():
    return synthetic_counts(n_cells=40, seed=11)


def _batch(model, adata):
    cells = model.cells(adata)
    return make_batch(cells, np.arange(cells.n_cells), model.scaler, model.tokenizer)


def _tokens(batch, row):
    """A cell's {gene id: value} from its real tokens."""
    keep = batch.token_mask[row]
    return dict(zip(batch.gene_ids[row][keep].tolist(), batch.values[row][keep].tolist()))


def test_knockout_removes_only_the_gene_token(model, adata):
    batch = _batch(model, adata)
    gene = int(model.vocab.ids(["G0003"])[0])
    expressing = ((batch.gene_ids == gene) & batch.token_mask).any(1)
    assert 0 < expressing.sum() < len(batch)
    edited, hit = knockout(batch, gene, model.module.pad_id)
    assert torch.equal(hit, expressing)
    assert not ((edited.gene_ids == gene) & edited.token_mask).any()
    for row in range(len(batch)):
        before = _tokens(batch, row)
        before.pop(gene, None)
        assert _tokens(edited, row) == before


def test_knockout_keeps_a_cell_whose_only_token_it_is(model):
    counts = np.zeros((2, 200), np.float32)
    counts[0, 5] = 3
    counts[1, [5, 6]] = 2
    cells = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=[f"G{j:04d}" for j in range(200)]))
    batch = _batch(model, cells)
    edited, hit = knockout(batch, 5, model.module.pad_id)
    assert hit.tolist() == [False, True]
    assert edited.token_mask.sum(1).tolist() == [1, 1]


def test_overexpress_changes_only_the_intended_input(model, adata):
    batch = _batch(model, adata)
    gene = int(model.vocab.ids(["G0003"])[0])
    edited = set_value(batch, gene, 4.5, model.module.pad_id)
    for row in range(len(batch)):
        before, after = _tokens(batch, row), _tokens(edited, row)
        assert after.pop(gene) == 4.5
        before.pop(gene, None)
        assert after == before  # cells that lacked the gene gained exactly that one token
    assert not ((edited.gene_ids == gene) & ~edited.token_mask).any()


def test_setting_a_gene_to_its_own_level_changes_nothing(model, adata):
    one = adata[[int(np.flatnonzero(adata[:, "G0003"].X.toarray().ravel())[0])]].copy()
    level = float(np.log1p(one[:, "G0003"].X.toarray()[0, 0] * 1e4 / one.X.sum()))
    effects = perturb(model, one, "G0003", level, progress=False)
    assert effects["mode"].eq("set").all() and effects["n_cells"].eq(1).all()
    np.testing.assert_allclose(effects["mean_shift"], 0.0, atol=1e-4)
    assert effects["fraction_affected"].eq(0).all()


def test_perturb_reports_per_gene_effects_consistent_with_predictions(model, adata):
    effects = perturb(model, adata, ["G0003", "G0010"], "knockout", progress=False)
    assert list(effects.columns) == ["perturbed_gene", "mode", "level", "gene", "n_cells", "baseline_mean",
                                     "perturbed_mean", "mean_shift", "effect_size", "fraction_affected"]
    assert len(effects) == 2 * 200 and set(effects["perturbed_gene"]) == {"G0003", "G0010"}
    for gene, part in effects.groupby("perturbed_gene"):
        assert part["n_cells"].iloc[0] == int((adata[:, gene].X.toarray() > 0).sum())
        expressing = adata[adata[:, gene].X.toarray().ravel() > 0].copy()
        predicted = model.predict_values(expressing, list(part["gene"]), progress=False).mean(0)
        expected = model.scaler.log_expression(model.vocab.ids(list(part["gene"])), predicted)
        np.testing.assert_allclose(part["baseline_mean"], expected, atol=1e-4)
    np.testing.assert_allclose(effects["perturbed_mean"] - effects["baseline_mean"], effects["mean_shift"], atol=1e-5)
    assert effects["fraction_affected"].between(0, 1).all()
    assert effects["mean_shift"].abs().max() > 0
    first = effects[effects["perturbed_gene"] == "G0003"]["effect_size"].abs().to_numpy()
    assert (np.diff(first) <= 0).all()  # largest effect first


def test_overexpress_uses_a_high_quantile_of_expression(model, adata):
    effects = perturb(model, adata, "G0003", "overexpress", quantile=0.9, progress=False)
    x = adata[:, "G0003"].X.toarray().ravel()
    expressed = x > 0
    level = np.quantile(np.log1p(x[expressed] * 1e4 / np.asarray(adata.X.sum(1)).ravel()[expressed]), 0.9)
    assert effects["level"].iloc[0] == pytest.approx(level, rel=1e-5)
    assert effects["n_cells"].iloc[0] == adata.n_obs  # every cell is overexpressed


def test_perturb_is_reproducible_across_batch_sizes_and_cell_order(model, adata):
    first = perturb(model, adata, "G0003", "overexpress", batch_size=7, progress=False)
    again = perturb(model, adata[::-1].copy(), "G0003", "overexpress", batch_size=64, progress=False)
    pd.testing.assert_frame_equal(first.set_index("gene").sort_index(), again.set_index("gene").sort_index(),
                                  atol=1e-5, check_exact=False)


def test_perturb_by_group(model, adata):
    effects = perturb(model, adata, "G0003", "overexpress", groupby="cell_type", progress=False)
    counts = adata.obs["cell_type"].value_counts()
    assert sorted(effects["group"].unique()) == sorted(counts.index)
    for group, part in effects.groupby("group"):
        assert part["n_cells"].iloc[0] == counts[group] and len(part) == 200
    one = perturb(model, adata, "G0003", "overexpress", groupby="cell_type", groups=["type1"], progress=False)
    assert set(one["group"]) == {"type1"}


@pytest.mark.slow
def test_memory_is_bounded_by_the_batch_not_the_cells(model, monkeypatch):
    shapes = []
    original = perturb_module.decode_values

    def recording(module, latents, query_ids):
        shapes.append(len(latents))
        return original(module, latents, query_ids)

    monkeypatch.setattr(perturb_module, "decode_values", recording)
    many = synthetic_counts(n_cells=600, seed=12)
    effects = perturb(model, many, "G0003", "overexpress", batch_size=16, progress=False)
    assert max(shapes) <= 16 and sum(shapes) == 2 * 600  # unperturbed + perturbed, batch by batch
    assert effects["n_cells"].iloc[0] == 600


def test_perturb_errors(model, adata):
    with pytest.raises(ExceiverInputError, match="not in the model's vocabulary"):
        perturb(model, adata, "NOTAGENE", progress=False)
    silent = adata.copy()
    x = silent.X.toarray()
    x[:, 3] = 0
    silent.X = sp.csr_matrix(x)
    with pytest.raises(ExceiverInputError, match="G0003 is not expressed in any of the 40 selected cells"):
        perturb(model, silent, "G0003", "knockout", progress=False)
    with pytest.raises(ExceiverInputError, match="pass a log-normalised level"):
        perturb(model, silent, "G0003", "overexpress", progress=False)
    assert perturb(model, silent, "G0003", 2.0, progress=False)["n_cells"].iloc[0] == 40
    with pytest.raises(ExceiverInputError, match="unknown mode"):
        perturb(model, adata, "G0003", "upregulate", progress=False)
    with pytest.raises(ExceiverInputError, match="finite number >= 0"):
        perturb(model, adata, "G0003", -1.0, progress=False)
    with pytest.raises(ExceiverInputError, match="not an obs column"):
        perturb(model, adata, "G0003", groupby="tissue", progress=False)
    with pytest.raises(ExceiverInputError, match="not values of obs"):
        perturb(model, adata, "G0003", groupby="cell_type", groups=["neuron"], progress=False)
    with pytest.raises(ExceiverInputError, match="more than once"):
        perturb(model, adata, ["G0003", "G0003"], progress=False)


def test_untrained_genes_are_refused(tiny_model_dir):
    model = Exceiver.load(tiny_model_dir)
    model.scaler.n_expressed[7] = 0  # as if no training cell had expressed G0007
    with pytest.raises(ExceiverInputError, match="never expressed in the model's training cells"):
        impute(model, synthetic_counts(n_cells=5), ["G0007"], progress=False)


def test_impute_values_are_the_value_heads_level_on_the_log_normalised_scale(model, adata):
    extra = ad.AnnData(sp.hstack([adata.X, sp.csr_matrix(np.ones((40, 2), np.float32))], format="csr"),
                       obs=adata.obs, var=pd.DataFrame(index=list(adata.var_names) + ["X1", "X2"]))
    with pytest.warns(UserWarning, match="2 of 202 genes of dataset cannot be imputed"):
        imputed = impute(model, extra, method="values", progress=False)
    assert extra.layers["exceiver_imputed"] is imputed and imputed.shape == (40, 202) and imputed.dtype == np.float32
    assert np.isnan(imputed[:, 200:]).all() and (imputed[:, :200] >= 0).all()
    subset = impute(model, adata, ["G0010", "G0002"], method="values", progress=False)
    assert "exceiver_imputed" not in adata.layers and subset.shape == (40, 2)
    np.testing.assert_allclose(subset, imputed[:, [10, 2]], atol=1e-5)
    values = model.predict_values(adata, ["G0010"], progress=False)[:, 0]
    expected = np.maximum(model.scaler.log_expression(np.array([10]), values), 0)  # the scaler's own inverse
    if model.scaler.standardise:
        np.testing.assert_allclose(expected, np.maximum((values - 1) * model.scaler.std[10] + model.scaler.mean[10], 0),
                                   rtol=1e-6)
    np.testing.assert_allclose(subset[:, 0], expected, atol=1e-5)


def test_gene_dependencies_map(model, adata, tmp_path):
    genes = ["G0001", "G0003", "G0010", "G0020"]
    deps = gene_dependencies(model, adata, genes, mode="overexpress", progress=False)
    assert deps.effects.shape == (4, 4) and list(deps.effects.index) == genes
    assert deps.attention.shape == (4, 4) and np.isfinite(deps.attention.to_numpy()).all()
    assert (deps.attention.to_numpy() > 0).all() and (deps.attention.to_numpy() < 1).all()
    partners = deps.partners(n=2)
    assert len(partners) == 8 and not (partners["gene"] == partners["partner"]).any()
    folder = deps.save(tmp_path / "deps")
    assert {p.name for p in folder.iterdir()} >= {"effects.csv", "attention.csv", "partners.csv", "effects.png",
                                                  "attention.png"}
    with pytest.raises(ExceiverInputError, match="at least 2 genes"):
        gene_dependencies(model, adata, ["G0001"], progress=False)


def test_cli_perturb_and_impute(tiny_model_dir, counts_file, tmp_path, capsys):
    out = tmp_path / "effects.csv"
    assert main(["-q", "perturb", str(tiny_model_dir), str(counts_file), "--gene", "G0003", "--gene", "G0010",
                 "--mode", "overexpress", "--groupby", "cell_type", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert set(table["perturbed_gene"]) == {"G0003", "G0010"} and table["group"].nunique() == 3
    assert main(["-q", "perturb", str(tiny_model_dir), str(counts_file), "--gene", "NOPE", "--out",
                 str(tmp_path / "x.csv")]) == 2
    assert "not in the model's vocabulary" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()
    assert main(["-q", "perturb", str(tiny_model_dir), str(counts_file), "--gene", "G0003", "--out", str(out)]) == 2
    imputed = tmp_path / "imputed.h5ad"
    assert main(["-q", "impute", str(tiny_model_dir), str(counts_file), "--out", str(imputed)]) == 0
    assert ad.read_h5ad(imputed).layers["exceiver_imputed"].shape == (120, 200)


def test_perturb_real_pbmc_genes(shared_dir):
    """On real PBMCs: knockout acts on exactly the cells expressing the gene, per cell type."""
    from exceiver import pretrain

    data = ad.read_h5ad(shared_dir / "data" / "pbmc_small_seuratobject_80.h5ad")
    model = pretrain(data, None, model=TINY, max_epochs=1, progress=False)
    gene = "MS4A1"
    expressing = data[:, gene].X.toarray().ravel() > 0
    effects = perturb(model, data, gene, "knockout", groupby="cell_type", progress=False)
    per_type = pd.Series(expressing).groupby(data.obs["cell_type"].astype(str).to_numpy()).sum()
    observed = effects.groupby("group")["n_cells"].first()
    assert observed.to_dict() == per_type[per_type > 0].to_dict()
    assert np.isfinite(effects["mean_shift"]).all()


def test_perturb_records_its_table_in_uns_as_scanpy_tools_do(tiny_model_dir, counts_adata, tmp_path):
    model = Exceiver.load(tiny_model_dir)
    adata = counts_adata.copy()
    effects = perturb(model, adata, "G0003", "overexpress", progress=False)
    written = adata.uns["exceiver"]["exceiver_perturbation"]
    assert written["genes"] == ["G0003"] and written["mode"] == "overexpress"
    pd.testing.assert_frame_equal(written["effects"], effects)
    adata.write_h5ad(tmp_path / "a.h5ad")  # the table is a plain DataFrame that .h5ad files hold
    again = ad.read_h5ad(tmp_path / "a.h5ad").uns["exceiver"]["exceiver_perturbation"]["effects"]
    np.testing.assert_allclose(again["mean_shift"].to_numpy(), effects["mean_shift"].to_numpy())
    untouched = counts_adata.copy()
    perturb(model, untouched, "G0003", progress=False, inplace=False)
    assert "exceiver" not in untouched.uns
