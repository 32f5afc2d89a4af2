"""The pretrained model that ships inside the package: opened by name (Python and every command
that takes MODEL_DIR), checked against its checksums, float16 on disk and float32 in use, mouse
data translated through its own ortholog pairs, and part of the wheel. No shared data is needed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from safetensors import safe_open

from exceiver import Exceiver
from exceiver import shipped
from exceiver.cli import main
from exceiver.demo import pbmc68k_counts
from exceiver.errors import ExceiverInputError, ModelFileError

NAME = "human-mouse-small"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model() -> Exceiver:
    return Exceiver.pretrained(NAME)


@pytest.fixture(scope="module")
def pbmc() -> ad.AnnData:
    return pbmc68k_counts()[:120].copy()


@pytest.mark.parametrize("name", ["human-mouse-small", "human-mouse-base"])
def test_the_models_ship_and_open_by_name(name):
    assert name in shipped.shipped_names()
    model = Exceiver.pretrained(name)
    folder = shipped.shipped_folder(name)
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "genes.txt", "scaler.safetensors",
                                                  "metrics.json", "gene_map.csv", "checksums.json"}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:  # float16 on disk ...
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert all(p.dtype == torch.float32 for p in model.module.parameters())  # ... float32 in use
    assert model.metrics["learned_context"] and model.metrics["val_mse_ratio"] < 1
    assert model.metrics["float16"]["min_cosine_float32_vs_float16"] > 0.999
    assert len(model.gene_map) > 0 and model.gene_map.iloc[:, 0].isin(model.vocab.genes).all()
    assert Exceiver.load(name).fingerprint() == model.fingerprint()


def test_a_damaged_installation_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "models" / NAME
    shutil.copytree(shipped.shipped_folder(NAME), copy)
    monkeypatch.setattr(shipped, "_models_root", lambda: tmp_path / "models")
    Exceiver.pretrained(NAME)  # the intact copy opens
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-3] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(ModelFileError, match="model.safetensors is missing or fails its checksum"):
        Exceiver.pretrained(NAME)


def test_unknown_names_and_folders_are_refused_with_the_shipped_names(tmp_path, capsys):
    with pytest.raises(ExceiverInputError, match=f"no shipped model is named 'tiny'; shipped: .*{NAME}"):
        Exceiver.pretrained("tiny")
    data = tmp_path / "cells.h5ad"
    pbmc68k_counts()[:20].copy().write_h5ad(data)
    assert main(["embed", "no-such-model", str(data), "--out", str(tmp_path / "out.h5ad")]) == 2
    assert "does not exist, and no shipped model has that name (shipped: human-mouse-base, human-mouse-small)" in \
        capsys.readouterr().err
    assert not (tmp_path / "out.h5ad").exists()


def test_a_folder_of_the_same_name_is_the_users(tmp_path, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).mkdir()
    with pytest.raises(ModelFileError, match="lacks config.json"):
        Exceiver.load(NAME)  # the user's folder, not the shipped model
    assert Exceiver.pretrained(NAME).fingerprint() == model.fingerprint()


def test_the_command_line_embeds_by_name(tmp_path, monkeypatch, pbmc, model):
    monkeypatch.delenv("EXCEIVER_SHARED", raising=False)
    data, out = tmp_path / "pbmc.h5ad", tmp_path / "out.h5ad"
    pbmc.write_h5ad(data)
    assert main(["-q", "embed", NAME, str(data), "--out", str(out)]) == 0
    written = ad.read_h5ad(out).obsm["X_exceiver"]
    np.testing.assert_allclose(written, model.embed(pbmc, inplace=False, progress=False), rtol=1e-4, atol=1e-4)
    assert written.shape == (pbmc.n_obs, model.module.embedding_width("bottleneck")) and np.isfinite(written).all()


def test_mouse_genes_are_translated_through_the_models_orthologs(model, pbmc):
    pairs = model.gene_map.drop_duplicates("model_gene", keep=False).drop_duplicates("data_gene", keep=False)
    one_to_one = pairs[pairs.model_gene.isin(pbmc.var_names)]
    assert len(one_to_one) > 100
    human = pbmc[:, one_to_one.model_gene.to_numpy()].copy()
    human = human[np.asarray(human.X.sum(1)).ravel() > 0].copy()
    mouse = human.copy()
    mouse.var_names = one_to_one.data_gene.to_numpy()  # the same counts under mouse symbols
    assert mouse.var_names.isin(model.vocab.genes).mean() < 0.1  # mouse symbols are not the model's genes
    np.testing.assert_allclose(model.embed(mouse, inplace=False, progress=False),
                               model.embed(human, inplace=False, progress=False), rtol=1e-5, atol=1e-5)


def test_continued_training_carries_the_orthologs(model, pbmc, tmp_path):
    from exceiver import pretrain

    continued = pretrain(pbmc, tmp_path / "continued", init=NAME, max_epochs=1, batch_size=32, progress=False)
    reopened = Exceiver.load(tmp_path / "continued")
    assert reopened.gene_map is not None and reopened.gene_map.equals(continued.gene_map)
    assert len(reopened.vocab) == len(model.vocab)
    assert reopened.metrics["init"]["model"] == NAME


@pytest.mark.slow
def test_the_wheel_contains_the_model(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
                   check=True, capture_output=True, timeout=600)
    [wheel] = tmp_path.glob("exceiver-*.whl")
    assert wheel.stat().st_size < 30e6  # every shipped model included
    with zipfile.ZipFile(wheel) as zf:
        for model in shipped.shipped_names():
            folder = shipped.shipped_folder(model)
            for name in json.loads((folder / "checksums.json").read_text()) | {"checksums.json": ""}:
                assert zf.read(f"exceiver/models/{model}/{name}") == (folder / name).read_bytes()


def test_pretrained_without_a_name_opens_the_default_model(model):
    assert shipped.DEFAULT_MODEL in shipped.shipped_names()
    assert Exceiver.pretrained().fingerprint() == Exceiver.pretrained(shipped.DEFAULT_MODEL).fingerprint()


def test_a_retired_name_is_refused_naming_its_successor(monkeypatch):
    monkeypatch.setattr(shipped, "RETIRED", {"human-mouse-tiny": NAME})
    assert shipped.is_shipped_name("human-mouse-tiny")
    with pytest.raises(ExceiverInputError, match=r"'human-mouse-tiny' was retired: use its successor 'human-mouse-small'"):
        Exceiver.load("human-mouse-tiny")


def test_the_base_model_knows_every_gene(shared_dir):
    """human-mouse-base's vocabulary: every protein-coding gene its training files measure,
    interferon regulators and the hallmark interferon response genes included."""
    import pandas as pd

    genes = set(Exceiver.pretrained("human-mouse-base").vocab.genes)
    assert len(genes) >= 17_000 and {"STAT1", "IRF7", "IRF9"} <= genes
    annotations = pd.read_csv(shared_dir / "annotations" / "gene_annotations.tsv.gz", sep="\t")
    for hallmark in ("HALLMARK_INTERFERON_ALPHA_RESPONSE", "HALLMARK_INTERFERON_GAMMA_RESPONSE"):
        members = set(annotations.loc[annotations.annotation_id == hallmark, "gene_symbol"])
        assert len(members) > 50 and len(members & genes) >= 0.95 * len(members)
