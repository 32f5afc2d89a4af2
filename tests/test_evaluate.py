"""`exceiver evaluate`: the metrics on cases with known answers, the report, the errors."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pandas as pd
import pytest

from conftest import synthetic_counts
from exceiver import Exceiver, ExceiverInputError
from exceiver.cli import main
from exceiver.evaluate import evaluate
from exceiver.evaluate.cells import (DEPTH_ALPHAS, batch_scores, depth_r2, knn_cross_validated, ridge_loo_predict,
                                     similarity_profile)
from exceiver.evaluate.genes import gene_scores, pair_auroc, read_annotations, sample_pairs
from exceiver.evaluate.reconstruction import baseline_predictions, reconstruction_scores
from exceiver.evaluate.report import Phases
from exceiver.data.genemap import map_genes


def _clusters(n_per: int = 40, seed: int = 0):
    """Three well-separated groups in 5 dimensions."""
    rng = np.random.default_rng(seed)
    centres = np.eye(3, 5) * 10
    labels = np.repeat(["a", "b", "c"], n_per)
    return centres[np.repeat(np.arange(3), n_per)] + rng.normal(size=(3 * n_per, 5)), labels


def test_similarity_profile_is_mean_cosine_between_groups_without_self_pairs():
    x = np.array([[1.0, 0], [2.0, 0], [0, 1.0], [0, 3.0], [1.0, 1.0]])
    profile = similarity_profile(x, np.array(["a", "a", "b", "b", "c"]))
    assert profile.loc["a", "a"] == pytest.approx(1.0) and profile.loc["a", "b"] == pytest.approx(0.0)
    assert profile.loc["a", "c"] == pytest.approx(np.sqrt(0.5))
    assert np.isnan(profile.loc["c", "c"])  # one cell: no pair


def test_knn_scores_separate_clusters_and_fall_to_chance_on_shuffled_labels():
    x, labels = _clusters()
    assert knn_cross_validated(x, labels)["knn_macro_f1"] == 1.0
    shuffled = np.random.default_rng(1).permutation(labels)
    assert knn_cross_validated(x, shuffled)["knn_accuracy"] < 0.6


def test_batch_mixing_is_high_for_mixed_batches_and_low_for_separated_ones():
    x, labels = _clusters()
    mixed = np.tile(["b1", "b2"], len(x) // 2)
    separated = np.where(labels == "a", "b1", "b2")
    good, bad = batch_scores(x, mixed), batch_scores(x, separated)
    assert good["batch_entropy"] > 0.8 > 0.3 > bad["batch_entropy"]
    assert good["batch_asw"] > bad["batch_asw"]


def test_depth_r2_reads_depth_from_an_embedding_that_holds_it():
    rng = np.random.default_rng(0)
    depth = rng.normal(size=200)
    holds = np.c_[depth + 0.1 * rng.normal(size=200), rng.normal(size=(200, 3))]
    assert depth_r2(holds, depth) > 0.95 and depth_r2(rng.normal(size=(200, 4)), depth) < 0.1


@pytest.mark.parametrize("n_cells, n_features, noise", [(150, 20, 1.0), (60, 200, 1.0), (80, 80, 1.0), (200, 10, 0.0)])
def test_ridge_loo_predict_is_sklearns_ridgecv(n_cells, n_features, noise):
    """depth_r2's ridge picks the alpha RidgeCV picks and predicts what it predicts (tall, wide and
    square representations, rank-deficient; without noise the smallest alpha wins)."""
    from sklearn.linear_model import RidgeCV

    rng = np.random.default_rng(n_features)
    x = rng.normal(size=(n_cells, n_features)) @ np.diag(rng.lognormal(0, 2, n_features))
    x[:, -1] = x[:, 0]  # rank-deficient
    y = x[:, :5] @ rng.normal(size=5) + noise * rng.normal(size=n_cells)
    train, test = np.arange(n_cells) < 0.8 * n_cells, np.arange(n_cells) >= 0.8 * n_cells
    reference = RidgeCV(alphas=DEPTH_ALPHAS).fit(x[train], y[train]).predict(x[test])
    scale = np.abs(reference).max()  # RidgeCV's own error is ~1e-7 of it when the smallest alpha wins
    np.testing.assert_allclose(ridge_loo_predict(x[train], y[train], x[test]), reference, atol=1e-6 * scale)


def test_gene_pairs_auroc_is_high_when_sets_share_directions_and_chance_for_random_vectors():
    rng = np.random.default_rng(0)
    genes = pd.Index([f"g{i}" for i in range(300)])
    sets = np.arange(300) // 10  # 30 sets of 10 genes
    table = pd.DataFrame({"gene": genes, "term": [f"set{s}" for s in sets], "source": "toy"})
    pairs, shared = sample_pairs(table, genes, n_pairs=2000)
    assert shared.sum() == 2000 and len(shared) == 4000
    assert (sets[pairs[shared == 1, 0]] == sets[pairs[shared == 1, 1]]).all()
    assert (sets[pairs[shared == 0, 0]] != sets[pairs[shared == 0, 1]]).all()
    structured = rng.normal(size=(30, 16))[sets] + 0.3 * rng.normal(size=(300, 16))
    assert pair_auroc(structured, pairs, shared) > 0.95
    scores = gene_scores({"random": rng.normal(size=(300, 16))}, genes, table)
    assert abs(scores["auroc"]["toy"]["random"] - 0.5) < 0.05


def test_annotations_are_read_from_gmt_and_long_tables_with_clear_errors(tmp_path):
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("SET1\tdescription\tA\tB\tC\nSET2\t-\tC\tD\n")
    table = read_annotations(gmt)
    assert set(table.term) == {"SET1", "SET2"} and set(table.source) == {"sets"} and len(table) == 5
    tsv = tmp_path / "long.tsv"
    pd.DataFrame({"gene_symbol": ["A", "B"], "annotation_id": ["T", "T"], "source": ["GO", "GO"]}).to_csv(
        tsv, sep="\t", index=False)
    assert list(read_annotations(tsv).source) == ["GO", "GO"]
    bad = tmp_path / "bad.tsv"
    bad.write_text("gene\tterm\nA\tT\n")
    with pytest.raises(ExceiverInputError, match="lacks columns"):
        read_annotations(bad)


def test_reconstruction_baselines_use_only_visible_values():
    # cells 0-1 alike, cells 2-3 alike; gene 0 masked in cell 0
    entries = {
        "cell": np.array([0]), "gene": np.array([0]), "target": np.array([5.0]), "model": np.array([4.0]),
        "visible_cell": np.array([1, 2, 3, 0, 1, 2, 3]), "visible_gene": np.array([0, 0, 0, 1, 1, 2, 2]),
        "visible_value": np.array([1.5, 4.0, 4.0, 3.0, 3.0, 2.0, 2.0]),
    }
    base = baseline_predictions(entries, n_cells=4, n_genes=3, k=1, n_comps=2)
    assert base["gene_mean"][0] == pytest.approx(9.5 / 3)  # visible values of gene 0 only
    assert base["knn"][0] == pytest.approx(1.5)  # its one neighbour, cell 1
    scores = reconstruction_scores({**entries, "target": np.array([5.0, 1.0]), "model": np.array([4.0, 1.0]),
                                    "cell": np.array([0, 2]), "gene": np.array([0, 0])},
                                   {"gene_mean": np.array([3.0, 3.0]), "knn": np.array([6.0, 1.0])}, n_bins=2)
    assert scores["model"]["mse"] == pytest.approx(0.5) and scores["gene_mean"]["mse"] == pytest.approx(4.0)
    assert scores["model"]["mse_ratio"] == pytest.approx(0.125)


@pytest.mark.slow
def test_evaluate_writes_a_complete_report(tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="exceiver")
    adata = synthetic_counts(n_cells=90, seed=5)
    adata.obs["batch"] = np.tile(["b1", "b2", "b3"], 30)
    genes = list(adata.var_names)
    annotations = pd.DataFrame({"gene": genes, "term": [f"t{i // 8}" for i in range(len(genes))], "source": "toy"})
    metrics = evaluate(Exceiver.load(tiny_model_dir), adata, tmp_path / "report", label_keys=["cell_type"], batch_key="batch",
                       annotations=annotations, progress=False)
    files = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"metrics.json", "report.md", "umap.png", "similarity_cell_type.png", "reconstruction_deciles.png",
            "gene_auroc.png"} <= files
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    reps = saved["cells"]["cell_type"]["representations"]
    assert set(reps) == {"exceiver", "pca20_hvg2000", "pca50_hvg2000", "pca20_all", "pca50_all", "hvg2000"}
    assert all(0 <= r["knn_macro_f1"] <= 1 and -1 <= r["silhouette"] <= 1 for r in reps.values())
    assert reps["pca20_all"]["knn_macro_f1"] > 0.9  # the synthetic types are easy for PCA
    rec = metrics["reconstruction"]
    assert rec["model"]["n"] > 0 and rec["gene_mean"]["mse_ratio"] == 1.0 and len(rec["deciles"]) == 10
    assert set(metrics["batch"]) == {"key", *reps}
    integration = metrics["integration"]  # scib-metrics: every representation but the HVG matrix
    assert integration["label_key"] == "cell_type" and integration["n_cells"] == 90
    assert set(integration["representations"]) == set(reps) - {"hvg2000"}
    assert all(0 <= s["bio"] <= 1 and 0 <= s["batch"] <= 1 and s["total"] == pytest.approx(0.6 * s["bio"] + 0.4 * s["batch"])
               for s in integration["representations"].values())
    assert set(metrics["depth_r2"]) == set(reps) and all(r2 <= 1 for r2 in metrics["depth_r2"].values())
    assert set(metrics["genes"]["auroc"]["toy"]) == {"exceiver", "pca_loadings", "random"}
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| exceiver |" in report and "kNN macro-F1" in report
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluate:")]
    assert said[:8] == ["evaluate: reconstruction (1/8)...", "evaluate: cell embeddings (2/8)...",
                        "evaluate: depth R^2 (3/8)...", "evaluate: cell embeddings vs 'cell_type' (4/8)...",
                        "evaluate: batch mixing (5/8)...", "evaluate: scib-metrics integration scores (6/8)...",
                        "evaluate: gene embeddings (7/8)...", "evaluate: report and figures (8/8)..."]
    assert "## Integration (scib-metrics" in report
    assert said[8].startswith("evaluate: done in") and "depth R^2" in said[8]


def test_phases_say_which_runs_and_how_long_each_took(caplog):
    caplog.set_level(logging.INFO, logger="exceiver")
    phases = Phases(2)
    phases.start("reconstruction")
    phases.start("cell embeddings vs 'cell_type'")
    phases.finish()
    said = [r.getMessage() for r in caplog.records]
    assert said[:2] == ["evaluate: reconstruction (1/2)...", "evaluate: cell embeddings vs 'cell_type' (2/2)..."]
    assert re.fullmatch(r"evaluate: done in \d+ s \(reconstruction [\d.]+ s, cell embeddings vs 'cell_type' [\d.]+ s\)",
                        said[2])


def test_evaluate_errors_name_the_problem_and_leave_nothing(tiny_model_dir, tmp_path):
    adata = synthetic_counts(n_cells=30, seed=2)
    out = tmp_path / "report"
    with pytest.raises(ExceiverInputError, match="no column 'tissue'.*cell_type"):
        evaluate(Exceiver.load(tiny_model_dir), adata, out, label_keys=["tissue"], progress=False)
    adata.obs["one"] = "x"
    with pytest.raises(ExceiverInputError, match="label column 'one' has a single class"):
        evaluate(Exceiver.load(tiny_model_dir), adata, out, label_keys=["one"], progress=False)
    with pytest.raises(ExceiverInputError, match="none of its 200 genes"):
        evaluate(Exceiver.load(tiny_model_dir), synthetic_counts(n_cells=30, prefix="ENSG"), out, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_gene_map_sums_counts_matches_case_insensitively_and_refuses_no_overlap(tmp_path):
    adata = synthetic_counts(n_cells=10, n_genes=4, prefix="g")  # g0000 .. g0003
    pairs = pd.DataFrame({"model": ["H0", "H0", "H2", "H9"], "data": ["g0000", "G0001", "g0002", "g9999"]})
    mapped = map_genes(adata, pairs)
    assert list(mapped.var_names) == ["H0", "H2"]
    x, y = adata.X.toarray(), mapped.X.toarray()
    assert np.array_equal(y[:, 0], x[:, 0] + x[:, 1]) and np.array_equal(y[:, 1], x[:, 2])
    assert mapped.obs.equals(adata.obs)
    with pytest.raises(ExceiverInputError, match="none of its 4 genes is in the gene map"):
        map_genes(adata, pairs.assign(data=["x", "y", "z", "w"]))


@pytest.mark.slow
def test_evaluate_from_the_command_line_with_a_gene_map(tiny_model_dir, tmp_path, capsys):
    adata = synthetic_counts(n_cells=60, seed=4, prefix="m")  # "mouse" names m0000 ...
    data = tmp_path / "mouse.h5ad"
    adata.write_h5ad(data)
    gene_map = tmp_path / "orthologs.csv"
    gene_map.write_text("".join(f"G{i:04d},m{i:04d}\n" for i in range(200)))
    out = tmp_path / "report"
    code = main(["-q", "evaluate", str(tiny_model_dir), str(data), "--out", str(out), "--label-key", "cell_type",
                 "--gene-map", str(gene_map)])
    assert code == 0 and (out / "report.md").is_file()
    assert "kNN macro-F1" in capsys.readouterr().out
    assert main(["-q", "evaluate", str(tiny_model_dir), str(data), "--out", str(tmp_path / "r2")]) == 2
    assert "none of its 200 genes" in capsys.readouterr().err and not (tmp_path / "r2").exists()


def test_scib_scores_reward_mixed_batches_and_separated_types():
    """scib-metrics on embeddings with known answers: two types far apart, each type's two batches
    either interleaved or pushed apart."""
    from exceiver.evaluate.integration import scib_scores

    rng = np.random.default_rng(0)
    labels = np.repeat(["t1", "t2"], 60)
    batches = np.tile(["a", "b"], 60)
    types = np.where(labels == "t1", 0.0, 20.0)[:, None] * np.eye(1, 4)
    mixed = types + rng.normal(size=(120, 4))
    split = mixed + np.where(batches == "a", 0.0, 8.0)[:, None] * np.eye(1, 4, 1)
    scores = scib_scores({"split": split, "mixed": mixed}, labels, batches, pre_integrated="split")
    assert scores["mixed"]["batch"] > scores["split"]["batch"] + 0.2
    assert scores["mixed"]["bio"] > 0.5 and scores["mixed"]["total"] > scores["split"]["total"]
    with pytest.raises(ValueError, match="2 batches or more"):
        scib_scores({"mixed": mixed}, labels, np.full(120, "a"), pre_integrated="mixed")


def test_evaluate_without_scib_metrics_says_how_to_get_it(tiny_model_dir, tmp_path, caplog, monkeypatch):
    import exceiver.evaluate.report as report

    monkeypatch.setattr(report, "scib_installed", lambda: False)
    adata = synthetic_counts(n_cells=40, seed=3)
    adata.obs["batch"] = np.tile(["b1", "b2"], 20)
    metrics = evaluate(Exceiver.load(tiny_model_dir), adata, tmp_path / "report", label_keys=["cell_type"],
                       batch_key="batch", progress=False)
    assert "integration" not in metrics and "batch" in metrics
    assert any("exceiver[scib]" in r.getMessage() for r in caplog.records)


def test_evaluate_leaves_out_scib_scores_when_the_labelled_cells_are_one_batch(tiny_model_dir, tmp_path, caplog):
    adata = synthetic_counts(n_cells=40, seed=3)
    adata.obs["batch"] = np.tile(["b1", "b2"], 20)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object).where(adata.obs["batch"] == "b1")  # b2 unlabelled
    metrics = evaluate(Exceiver.load(tiny_model_dir), adata, tmp_path / "report", label_keys=["cell_type"],
                       batch_key="batch", progress=False)
    assert "integration" not in metrics and (tmp_path / "report" / "report.md").exists()
    assert any("all in one 'batch' batch" in r.getMessage() for r in caplog.records)
