"""Model folders written before the restructuring (format 1) still load, and compute what the code
that wrote them computed (tests/fixtures/format_v1, written at commit cfcd7bd)."""

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from safetensors.numpy import load_file

from exceiver import Exceiver, ModelFileError

FIXTURE = Path(__file__).parent / "fixtures" / "format_v1"


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    return load_file(FIXTURE / "expected.safetensors")


def test_format_1_folders_are_migrated_to_the_sections_of_format_2():
    assert json.loads((FIXTURE / "model" / "config.json").read_text())["format_version"] == 1
    model = Exceiver.load(FIXTURE / "model")
    assert model.config.detection_head and model.config.projection_head  # heads follow the objectives
    assert (model.tokenizer.zero_query_ratio, model.tokenizer.mask_fraction, model.tokenizer.all_genes) == (1.0, 0.15, False)
    assert (model.objectives.detection_weight, model.objectives.contrastive_weight) == (1.0, 0.2)
    classifier = Exceiver.load(FIXTURE / "classifier")
    assert classifier.classes == ["type0", "type1", "type2"]
    assert not (classifier.config.detection_head or classifier.config.projection_head)


def test_format_1_models_compute_what_they_computed_when_written(expected):
    cells = ad.read_h5ad(FIXTURE / "cells.h5ad")
    model = Exceiver.load(FIXTURE / "model")
    np.testing.assert_allclose(model.embed(cells, progress=False), expected["embedding_mean"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.embed(cells, pooling="flatten", progress=False), expected["embedding_flatten"],
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.predict_values(cells, progress=False), expected["predicted_values"],
                               rtol=0, atol=1e-6)
    classifier = Exceiver.load(FIXTURE / "classifier")
    np.testing.assert_allclose(classifier.predict_proba(cells, progress=False), expected["classifier_probabilities"],
                               rtol=0, atol=1e-6)


def test_a_migrated_model_saves_as_format_2_and_computes_the_same(tmp_path, expected):
    cells = ad.read_h5ad(FIXTURE / "cells.h5ad")
    Exceiver.load(FIXTURE / "model").save(tmp_path / "v2")
    config = json.loads((tmp_path / "v2" / "config.json").read_text())
    assert config["format_version"] == 2 and "model" not in config
    again = Exceiver.load(tmp_path / "v2")
    np.testing.assert_allclose(again.embed(cells, progress=False), expected["embedding_mean"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("retired", [{"cell_query": True}, {"depth_tokens": True}, {"value_encoding": "rank"}])
def test_format_1_models_of_retired_options_are_refused_by_name(tmp_path, retired):
    folder = tmp_path / "old"
    shutil.copytree(FIXTURE / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    config["model"].update(retired)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=f"retired options {{'{next(iter(retired))}'"):
        Exceiver.load(folder)


def test_unknown_format_versions_are_refused(tmp_path):
    folder = tmp_path / "future"
    shutil.copytree(FIXTURE / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    config["format_version"] = 9
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="format version 9; this exceiver reads 1 and 2"):
        Exceiver.load(folder)
