"""Fine-tuning a classifier: modes (the class token, the linear probe), learning rates, label checks,
prediction outputs."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from exceiver import Exceiver, ExceiverInputError, pretrain
from exceiver.cli import main
from exceiver.finetune import balanced_class_weights, classifier_module, finetune, split_by_class
from exceiver.train.config import TrainingConfig
from exceiver.train.plans import ClassifierPlan

from conftest import TINY

FAST = dict(max_epochs=3, batch_size=32, progress=False)


def test_split_keeps_every_class_on_both_sides_and_weights_balance_classes():
    codes = np.array([0] * 50 + [1] * 5 + [2] * 3)
    train, val = split_by_class(codes, 0.1, seed=1)
    assert set(codes[train]) == set(codes[val]) == {0, 1, 2}
    assert np.intersect1d(train, val).size == 0 and len(train) + len(val) == len(codes)
    assert (np.bincount(codes[val]) == [5, 1, 1]).all()
    weights = balanced_class_weights(codes, 3)
    np.testing.assert_allclose(weights, [58 / 150, 58 / 15, 58 / 9], rtol=1e-6)
    np.testing.assert_allclose((weights * np.bincount(codes)).sum(), len(codes), rtol=1e-6)  # every class counts equally


def _labels(adata: ad.AnnData, case: str) -> None:
    if case == "absent":
        del adata.obs["cell_type"]
    elif case == "unlabelled":
        adata.obs["cell_type"] = pd.Series(np.nan, index=adata.obs_names, dtype=object)
    elif case == "single":
        adata.obs["cell_type"] = "same"
    else:
        adata.obs["cell_type"] = ["rare"] * 2 + ["common"] * (adata.n_obs - 2)


@pytest.mark.parametrize("case, message", [
    ("absent", "adata0: obs has no column 'cell_type'; its columns: \\[\\]"),
    ("unlabelled", "none of its 120 cells has a 'cell_type' label"),
    ("single", "a single class \\('same'\\)"), ("rare", "1 class of 'cell_type' has fewer than 3 cells \\(rare: 2\\)"),
])
def test_unusable_labels_are_refused_and_leave_nothing(tiny_model_dir, counts_adata, tmp_path, case, message):
    _labels(counts_adata, case)
    with pytest.raises(ExceiverInputError, match=message):
        finetune(tiny_model_dir, counts_adata, "cell_type", tmp_path / "clf", **FAST)
    assert not (tmp_path / "clf").exists()
    with pytest.raises(ExceiverInputError, match="unknown fine-tuning mode"):
        finetune(tiny_model_dir, counts_adata, "cell_type", mode="linear")


def test_freeze_is_a_linear_probe_of_the_cell_embedding(tiny_model_dir, counts_adata, counts_file, tmp_path):
    """mode="freeze": logistic regression on the standardised embedding of the training cells,
    written into a linear head that reads the embedding; every other weight is the base's, and
    the folder predicts through `predict` and the command line like any classifier."""
    base = Exceiver.load(tiny_model_dir)
    clf = finetune(base, counts_adata, "cell_type", tmp_path / "probe", mode="freeze", **FAST)
    assert clf.config.class_input == "bottleneck" and clf.metrics["mode"] == "freeze"
    assert isinstance(clf.module.class_head, torch.nn.Linear) and clf.module.class_head.weight.shape == (3, 16)
    before, after = base.module.state_dict(), clf.module.state_dict()
    for name, weight in after.items():
        if not name.startswith("class_head"):
            torch.testing.assert_close(weight, before[name], rtol=0, atol=0)
    embedding = base.embed(counts_adata, inplace=False, progress=False)
    codes = counts_adata.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)
    train, _ = split_by_class(codes, 0.1, seed=0)
    reference = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
    expected = reference.fit(embedding[train], codes[train]).predict_proba(embedding)
    np.testing.assert_allclose(clf.predict_proba(counts_adata, progress=False), expected, atol=1e-4)
    loaded = Exceiver.load(tmp_path / "probe")
    np.testing.assert_allclose(loaded.predict_proba(counts_adata, progress=False), expected, atol=1e-4)
    assert 0 <= loaded.metrics["val_macro_f1"] <= 1 and loaded.training["mode"] == "freeze"
    out = tmp_path / "predicted.h5ad"
    assert main(["-q", "predict", str(tmp_path / "probe"), str(counts_file), "--out", str(out)]) == 0
    written = ad.read_h5ad(out)
    assert (written.obs["exceiver_prediction"].astype(str).to_numpy() == np.asarray(clf.classes)[expected.argmax(1)]).all()
    with pytest.raises(ExceiverInputError, match="nothing to resume"):
        finetune(base, counts_adata, "cell_type", tmp_path / "probe", mode="freeze", resume=True)


def test_full_finetuning_gives_pretrained_weights_a_fraction_of_the_heads_rate(tiny_model_dir, counts_adata):
    base = Exceiver.load(tiny_model_dir)
    codes = counts_adata.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)
    weights = balanced_class_weights(codes, 3)
    settings = TrainingConfig(learning_rate=1e-3, gene_lr_mult=10.0)

    def rates(pretrained_lr_mult):
        module = classifier_module(base, 3, from_scratch=pretrained_lr_mult is None, seed=0)
        plan = ClassifierPlan(module, settings, codes, weights, class_loss_weight=1.0, expression_loss_weight=1.0,
                              pretrained_lr_mult=pretrained_lr_mult)
        plan.planned_steps = 100
        optimizer = plan.configure_optimizers()["optimizer"]
        names = {id(p): n for n, p in module.named_parameters()}
        return {g["name"]: (g["initial_lr"], {names[id(p)].split(".")[0] for p in g["params"]})
                for g in optimizer.param_groups}

    groups = rates(0.1)
    assert {name: lr for name, (lr, _) in groups.items()} == pytest.approx(
        {"decay": 1e-3, "no_decay": 1e-3, "pretrained decay": 1e-4, "pretrained no_decay": 1e-4,
         "pretrained genes": 1e-3})
    assert groups["decay"][1] == groups["no_decay"][1] == {"class_head"}
    assert {"encoder", "processor", "decoder", "latents"} <= groups["pretrained decay"][1] | groups["pretrained no_decay"][1]
    assert set(rates(None)) == {"decay", "no_decay", "genes"}  # from scratch nothing is pretrained
    clf = finetune(base, counts_adata, "cell_type", max_epochs=1, batch_size=32, progress=False)
    assert clf.training["pretrained_lr_mult"] == 0.1


def test_classifiers_start_from_the_pretrained_weights_or_from_scratch(tiny_model_dir, counts_adata):
    base = Exceiver.load(tiny_model_dir)
    before = base.module.state_dict()
    pretrained = classifier_module(base, 4, from_scratch=False, seed=0).state_dict()
    scratch = classifier_module(base, 4, from_scratch=True, seed=0).state_dict()
    assert pretrained["class_head.3.weight"].shape == (4, 64)  # hidden width: the preset's class_hidden
    pretraining_only = ("projection", "detection_head")  # heads of pretraining objectives stay behind
    assert not any(name.startswith(pretraining_only) for name in pretrained)
    for name, weight in before.items():
        if name.startswith(pretraining_only):
            continue
        assert torch.equal(pretrained[name], weight), name
        if name != "gene_bias" and weight.numel() > 1 and weight.float().std() > 0:  # random, not pretrained
            assert not torch.equal(scratch[name], weight), name
    clf = finetune(base, counts_adata, "cell_type", mode="scratch", max_epochs=1, batch_size=32, progress=False)
    assert clf.metrics["mode"] == "scratch" and clf.classes == ["type0", "type1", "type2"]


def test_a_classifier_can_be_finetuned_for_other_classes(tiny_model_dir, counts_adata):
    """A classifier as the base: its encoder carries over, its class head (other classes) does not."""
    base = finetune(tiny_model_dir, counts_adata, "cell_type", max_epochs=1, batch_size=32, progress=False)
    for n_classes in (3, 5):
        module = classifier_module(base, n_classes, from_scratch=False, seed=1).state_dict()
        assert module["class_head.3.weight"].shape[0] == n_classes
        assert not torch.equal(module["class_head.3.weight"][:3], base.module.state_dict()["class_head.3.weight"])
        assert torch.equal(module["encoder.attn.q.weight"], base.module.state_dict()["encoder.attn.q.weight"])
    relabelled = counts_adata.copy()
    relabelled.obs["coarse"] = np.where(relabelled.obs["cell_type"] == "type0", "a", "b")
    again = finetune(base, relabelled, "coarse", max_epochs=1, batch_size=32, progress=False)
    assert again.classes == ["a", "b"]


@pytest.mark.slow
def test_full_finetuning_learns_a_shared_dataset(shared_dir, tmp_path):
    """Four PBMC types of pbmc3k: the classifier's training loss falls and it fits its training
    cells (the logged epoch accuracy), from a briefly pretrained tiny model."""
    adata = ad.read_h5ad(shared_dir / "data" / "pbmc3k_seurat_2638.h5ad")
    adata = adata[adata.obs["cell_type"].isin(["B", "CD14+ Mono", "NK", "Naive CD4 T"])]
    adata = adata[np.sort(np.random.default_rng(0).choice(adata.n_obs, 240, replace=False))].copy()
    base = pretrain(adata, None, model=TINY, max_epochs=1, batch_size=32, progress=False)
    # One epoch of pretraining leaves little to protect: every weight learns at the head's rate
    # (at the default 0.1 the loss fell from 1.43 to 0.92 in these 20 epochs).
    clf = finetune(base, adata, "cell_type", tmp_path / "clf", pretrained_lr_mult=1.0, max_epochs=20, patience=100,
                   batch_size=16, progress=False)
    log = pd.read_csv(tmp_path / "clf" / "logs" / "metrics.csv").groupby("epoch").mean(numeric_only=True)
    assert log["train_class_loss"].iloc[-1] < 0.5 * log["train_class_loss"].iloc[0]
    assert log["train_accuracy"].iloc[-3:].mean() >= 0.9, log["train_accuracy"].tolist()
    per_class = clf.metrics["train_cells_per_class"]
    assert sorted(per_class) == clf.classes and sum(per_class.values()) == clf.metrics["n_train_cells"]


def test_predict_round_trips_through_the_cli(tiny_model_dir, counts_adata, counts_file, tmp_path, capsys):
    clf_dir = tmp_path / "clf"
    assert main(["-q", "finetune", str(tiny_model_dir), str(counts_file), "--label-key", "cell_type",
                 "--out", str(clf_dir), "--max-epochs", "2", "--batch-size", "32"]) == 0
    assert "3 classes" in capsys.readouterr().out
    clf = Exceiver.load(clf_dir)
    assert clf.classes == ["type0", "type1", "type2"] and clf.training["mode"] == "full"
    out = tmp_path / "predicted.h5ad"
    assert main(["-q", "predict", str(clf_dir), str(counts_file), "--out", str(out)]) == 0
    written = ad.read_h5ad(out)
    proba = written.obsm["exceiver_probabilities"]
    assert proba.shape == (counts_adata.n_obs, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    assert list(written.uns["exceiver"]["exceiver_prediction"]["classes"]) == clf.classes
    expected = np.asarray(clf.classes)[proba.argmax(1)]
    assert (written.obs["exceiver_prediction"].astype(str).to_numpy() == expected).all()
    in_memory = clf.predict(counts_adata.copy(), progress=False)
    assert (in_memory.astype(str).to_numpy() == expected).all()
    untouched = counts_adata.copy()
    returned = clf.predict(untouched, inplace=False, progress=False)
    assert (returned.astype(str).to_numpy() == expected).all() and "exceiver_prediction" not in untouched.obs
    clf.predict(untouched, key_added="celltype_prediction", progress=False)
    assert "celltype_prediction" in untouched.obs and untouched.obsm["celltype_probabilities"].shape == (120, 3)
    assert list(untouched.uns["exceiver"]["celltype_prediction"]["classes"]) == clf.classes
    # A model without classes is not a classifier.
    assert main(["-q", "predict", str(tiny_model_dir), str(counts_file), "--out", str(tmp_path / "x.h5ad")]) == 2
    assert "not a classifier" in capsys.readouterr().err and not (tmp_path / "x.h5ad").exists()
