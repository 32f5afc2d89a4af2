"""One reading path: mouse cells through the shipped human+mouse model, with no gene map given,
give every tool the same numbers as the same cells translated into the model's genes by hand
(`map_genes` with the model's own pairs) and read as human data; results name mouse genes."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from exceiver import Exceiver, finetune
from exceiver.data.genemap import GenePairs, map_genes
from exceiver.evaluate import evaluate
from exceiver.tl import annotate, impute, perturb

ATOL = 1e-5
MOUSE_FILE = "gpsfish_zeisel_mouse_cortex_550.h5ad"


@pytest.fixture(scope="module")
def model() -> Exceiver:
    return Exceiver.pretrained("human-mouse-small")


@pytest.fixture(scope="module")
def mouse(shared_dir) -> ad.AnnData:
    return ad.read_h5ad(shared_dir / "data" / MOUSE_FILE)[:200].copy()


@pytest.fixture(scope="module")
def human(model, mouse) -> ad.AnnData:
    """The same cells translated by hand: the gene-map function with the model's own pairs."""
    key = model.gene_key if model.gene_key in mouse.var.columns else None
    return map_genes(mouse, model.gene_map, gene_key=key)


@pytest.fixture(scope="module")
def to_human(model, mouse) -> dict[str, str]:
    """Each mouse gene's model gene (the pairs' first, case-folded as the map reads them)."""
    key = model.gene_key if model.gene_key in mouse.var.columns else None
    genes = mouse.var_names if key is None else mouse.var[key].astype(str)
    translated = GenePairs(model.gene_map).translate(genes)
    return {g: t for g, t in zip(mouse.var_names, translated) if t}


def test_the_mouse_file_is_read_through_the_models_own_pairs(model, mouse, human):
    read = model.read(mouse)
    assert read.translated and read.n_cells == mouse.n_obs
    assert read.measured.sum() == model.read(human).measured.sum() > 2000


def test_embed(model, mouse, human):
    np.testing.assert_allclose(model.embed(mouse, inplace=False, progress=False),
                               model.embed(human, inplace=False, progress=False), atol=ATOL)


def test_impute_fills_every_gene_the_model_knows_through_the_map(model, mouse, human, to_human):
    with pytest.warns(UserWarning, match="cannot be imputed"):  # genes without a model gene: said, not hidden
        imputed = pd.DataFrame(impute(model, mouse.copy(), progress=False), columns=mouse.var_names)
    by_hand = pd.DataFrame(impute(model, human.copy(), progress=False), columns=human.var_names)
    trained = set(np.asarray(model.vocab.genes)[model.scaler.trained_genes])
    known = [g for g, h in to_human.items() if h in trained]
    assert len(known) > 2000
    assert np.isfinite(imputed[known].to_numpy()).all()
    assert imputed.drop(columns=known).isna().all().all()
    np.testing.assert_allclose(imputed[known].to_numpy(), by_hand[[to_human[g] for g in known]].to_numpy(),
                               atol=ATOL)


def test_perturb_by_the_mouse_symbol(model, mouse, human, to_human):
    effects = perturb(model, mouse, ["Gfap"], "overexpress", progress=False)
    by_hand = perturb(model, human, ["GFAP"], "overexpress", progress=False)
    assert set(effects["perturbed_gene"]) == {"Gfap"} and len(effects) == len(by_hand) > 1000
    assert effects["gene"].isin(mouse.var_names).all()  # answered in the user's gene names
    effects = effects.assign(gene=effects["gene"].map(to_human)).set_index("gene")
    by_hand = by_hand.set_index("gene").loc[effects.index]
    for column in ("n_cells", "level", "baseline_mean", "mean_shift", "effect_size", "fraction_affected"):
        np.testing.assert_allclose(effects[column].to_numpy(float), by_hand[column].to_numpy(float), atol=ATOL)


def test_annotate(model, mouse, human):
    results = [annotate(model, data[:120], data[120:].copy(), "cell_type", progress=False, min_confidence=0)
               for data in (mouse, human)]
    assert (results[0]["exceiver_label"] == results[1]["exceiver_label"]).all()
    np.testing.assert_allclose(results[0]["exceiver_label_confidence"], results[1]["exceiver_label_confidence"],
                               atol=ATOL)


def test_evaluate(model, mouse, human, tmp_path):
    metrics = [evaluate(model, data, tmp_path / name, label_keys=["cell_type"], progress=False)
               for name, data in (("mouse", mouse), ("human", human))]
    for m in metrics:
        assert m["n_cells"] == mouse.n_obs and m["n_cells_without_model_genes"] == 0
    assert metrics[0]["n_genes_shared"] == metrics[1]["n_genes_shared"]
    for part in (lambda m: m["reconstruction"]["model"], lambda m: m["cells"]["cell_type"]["representations"]["exceiver"],
                 lambda m: {"depth_r2": m["depth_r2"]["exceiver"]}):
        mouse_part, human_part = part(metrics[0]), part(metrics[1])
        for key, value in human_part.items():
            if isinstance(value, float):
                assert mouse_part[key] == pytest.approx(value, abs=ATOL), key


@pytest.mark.parametrize("mode", ["freeze", pytest.param("full", marks=pytest.mark.slow)])
def test_finetune(model, mouse, human, mode):
    options = dict(mode=mode, progress=False, seed=0, max_epochs=1, batch_size=32)
    classifiers = [finetune(model, data, "cell_type", **options) for data in (mouse, human)]
    for key in ("val_accuracy", "val_macro_f1", "val_class_loss"):
        assert classifiers[0].metrics[key] == pytest.approx(classifiers[1].metrics[key], abs=ATOL), key
    np.testing.assert_allclose(classifiers[0].predict_proba(mouse, progress=False),
                               classifiers[1].predict_proba(human, progress=False), atol=ATOL)


def test_dependencies_name_genes_as_the_dataset_does(model, mouse):
    from exceiver.tl import gene_dependencies

    deps = gene_dependencies(model, mouse, ["GFAP", "Apoe"], mode="overexpress", progress=False)
    assert list(deps.effects.index) == list(deps.attention.index) == ["Gfap", "Apoe"]
    assert np.isfinite(deps.effects.loc["Gfap", "Apoe"]) and np.isfinite(deps.effects.loc["Apoe", "Gfap"])


def test_a_gene_map_translates_only_data_whose_genes_are_its_dataset_side(model, mouse, human):
    assert model.read(mouse, gene_map=model.gene_map).translated
    as_is = model.read(human, gene_map=model.gene_map)  # human genes are the map's model side: read as they are
    assert not as_is.translated and as_is.measured.sum() == model.read(human).measured.sum()


def test_a_slice_of_a_backed_file_is_read_as_its_rows(model, shared_dir):
    backed = ad.read_h5ad(shared_dir / "data" / MOUSE_FILE, backed="r")
    sliced = model.embed(backed[:50], inplace=False, progress=False)
    whole = model.embed(ad.read_h5ad(shared_dir / "data" / MOUSE_FILE)[:50].copy(), inplace=False, progress=False)
    np.testing.assert_allclose(sliced, whole, atol=ATOL)
    backed.file.close()
