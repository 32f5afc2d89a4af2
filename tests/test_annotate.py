"""Label transfer: labels and confidences written to the query, the threshold, refusals."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from exceiver import Exceiver, ExceiverInputError
from exceiver.cli import main
from exceiver.tl import annotate
from exceiver.tl.annotation import UNKNOWN, linear_probe

from conftest import synthetic_counts

QUIET = dict(progress=False)


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> Exceiver:
    return Exceiver.load(tiny_model_dir)


@pytest.fixture
def reference() -> ad.AnnData:
    return synthetic_counts()[:60].copy()


@pytest.fixture
def query() -> ad.AnnData:
    return synthetic_counts()[60:].copy()


@pytest.mark.parametrize("method", ["knn", "linear"])
def test_labels_and_confidences_are_written_to_the_query(model, reference, query, method):
    result = annotate(model, reference, query, "cell_type", method=method, min_confidence=0.0, **QUIET)
    assert list(result.columns) == ["exceiver_label", "exceiver_label_confidence"]
    assert (result.index == query.obs_names).all()
    labels, confidence = query.obs["exceiver_label"], query.obs["exceiver_label_confidence"].to_numpy()
    assert list(labels.cat.categories) == ["type0", "type1", "type2", UNKNOWN]
    assert ((confidence >= 0) & (confidence <= 1)).all() and (labels != UNKNOWN).all()
    settings = query.uns["exceiver"]["exceiver_label"]
    assert settings["method"] == method and settings["label_key"] == "cell_type" and settings["n_reference_cells"] == 60
    # A threshold turns exactly the less confident cells into "unknown".
    threshold = float(np.median(confidence))
    again = model.annotate(reference, query.copy(), "cell_type", method=method, min_confidence=threshold,
                           inplace=False, **QUIET)
    unknown = again["exceiver_label"].to_numpy() == UNKNOWN
    assert (unknown == (confidence < threshold)).all() and 0 < unknown.sum() < len(unknown)
    kept = ~unknown
    assert (again["exceiver_label"].to_numpy()[kept] == labels.to_numpy()[kept]).all()


def test_inplace_false_leaves_the_query_alone(model, reference, query):
    result = model.annotate(reference, query, "cell_type", inplace=False, key_added="coarse", **QUIET)
    assert "coarse" in result.columns and "coarse_confidence" in result.columns
    assert "coarse" not in query.obs and not query.uns
    model.annotate(reference, query, "cell_type", key_added="coarse", **QUIET)
    assert "coarse_confidence" in query.obs and "coarse" in query.uns["exceiver"]


def test_the_linear_probe_is_logistic_regression_on_standardised_embeddings():
    rng = np.random.default_rng(0)
    for n_classes in (2, 4):
        x = rng.normal(size=(80, 5)) * [1, 10, 0.1, 3, 1] + [0, 5, 1, 0, 2]
        codes = np.arange(80) % n_classes
        x[:, 0] += codes
        weight, bias = linear_probe(x, codes, n_classes)
        logits = x @ weight.T + bias
        proba = np.exp(logits - logits.max(1, keepdims=True))
        proba /= proba.sum(1, keepdims=True)
        expected = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
        np.testing.assert_allclose(proba, expected.fit(x, codes).predict_proba(x), atol=1e-5)


def test_unlabelled_and_single_cell_classes_of_the_reference(model, reference, query, caplog):
    reference.obs["cell_type"] = reference.obs["cell_type"].astype(object)
    reference.obs.iloc[:5, 0] = np.nan
    reference.obs.iloc[5, 0] = "lonely"
    with caplog.at_level(logging.INFO, logger="exceiver.tl.annotation"):
        result = annotate(model, reference, query, "cell_type", min_confidence=0.0, **QUIET)
    assert "5 of 60 reference cells have no 'cell_type' label and are ignored" in caplog.text
    assert "labels with a single reference cell: lonely" in caplog.text
    assert query.uns["exceiver"]["exceiver_label"]["n_reference_cells"] == 55
    assert "lonely" in result["exceiver_label"].cat.categories


@pytest.mark.parametrize("case, message", [
    ("no column", r"label column 'celltype' is not in the reference's obs; available columns: \['cell_type'\]"),
    ("one label", "has a single label"),
    ("no labels", "no cell of the reference"),
    ("empty query", "the query has no cells"),
    ("empty reference", "the reference has no cells"),
    ("few genes", r"share 10 trained model genes \(5.0% of the 200 that the reference measures; the other measures 10\)"),
    ("method", "unknown label-transfer method"),
])
def test_unusable_inputs_are_refused(model, reference, query, case, message):
    key, options = "cell_type", {}
    if case == "no column":
        key = "celltype"
    elif case == "one label":
        reference.obs["cell_type"] = "same"
    elif case == "no labels":
        reference.obs["cell_type"] = pd.Series(np.nan, index=reference.obs_names, dtype=object)
    elif case == "empty query":
        query = query[:0]
    elif case == "empty reference":
        reference = reference[:0]
    elif case == "few genes":  # the query's genes renamed, all but 10
        query.var_names = [g if i < 10 else f"X{i}" for i, g in enumerate(query.var_names)]
    else:
        options["method"] = "svm"
    with pytest.raises(ExceiverInputError, match=message):
        annotate(model, reference, query, key, **options, **QUIET)
    assert "exceiver_label" not in query.obs


def test_a_panel_both_datasets_measure_is_enough_however_large_the_vocabulary(model, reference, query):
    panel = reference.var_names[:15]  # 7.5% of the model's 200 genes, all of what either dataset measures
    reference, query = reference[:, panel].copy(), query[:, panel].copy()
    keep = lambda a: a[np.asarray(a.X.sum(1)).ravel() > 0].copy()  # noqa: E731 (cells with counts on the panel)
    result = annotate(model, keep(reference), keep(query), "cell_type", min_confidence=0.0, inplace=False, **QUIET)
    assert result["exceiver_label"].notna().all()


def test_datasets_are_compared_on_the_genes_both_measured(model, reference, query, caplog):
    """A query that lacks some genes: the reference is embedded without them too."""
    query = query[:, 40:].copy()
    with caplog.at_level(logging.INFO, logger="exceiver.tl.annotation"):
        annotate(model, reference, query, "cell_type", **QUIET)
    assert query.uns["exceiver"]["exceiver_label"]["n_shared_genes"] == 160
    assert "reference: embedded on the 160 trained model genes that both datasets measured" in caplog.text


def test_annotate_through_the_command_line(tiny_model_dir, reference, query, tmp_path, capsys):
    reference.write_h5ad(tmp_path / "reference.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    out = tmp_path / "labelled.h5ad"
    command = ["-q", "annotate", str(tiny_model_dir), str(tmp_path / "reference.h5ad"), str(tmp_path / "query.h5ad"),
               "--label-key", "cell_type", "--out", str(out)]
    assert main(command + ["--method", "knn", "--min-confidence", "0.9"]) == 0
    assert f"wrote {out}: 60 cells labelled (knn)" in capsys.readouterr().out
    written = ad.read_h5ad(out)
    confidence = written.obs["exceiver_label_confidence"].to_numpy()
    assert ((written.obs["exceiver_label"] == UNKNOWN).to_numpy() == (confidence < 0.9)).all()
    assert written.uns["exceiver"]["exceiver_label"]["min_confidence"] == 0.9
    assert main(command) == 2  # exists: replaced only with --overwrite
    capsys.readouterr()
    assert main(command + ["--overwrite"]) == 0
    assert ad.read_h5ad(out).uns["exceiver"]["exceiver_label"]["method"] == "linear"
    bad = tmp_path / "bad.h5ad"
    assert main(command[:-4] + ["--label-key", "celltype", "--out", str(bad)]) == 2
    assert "available columns: ['cell_type']" in capsys.readouterr().err and not bad.exists()


def test_tl_annotate_stays_the_function_once_its_module_is_imported():
    import importlib
    import types

    import exceiver.tl

    importlib.import_module("exceiver.tl.annotation")  # finetune imports it for the linear probe
    assert isinstance(exceiver.tl.annotate, types.FunctionType)
