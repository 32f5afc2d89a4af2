"""Continued training from a pretrained model (`init`), extended vocabularies, batch covariates
and gene maps (e.g. mouse data through human orthologs)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY, synthetic_counts
from exceiver import Exceiver, finetune, pretrain
from exceiver.cli import main
from exceiver.errors import ExceiverInputError

COUNTS = dict(model=TINY, batch_size=32, progress=False)
FROZEN = dict(learning_rate=1e-12, max_epochs=1)  # a run that moves no weight: what it starts from shows


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Exceiver:
    out = tmp_path_factory.mktemp("base") / "model"
    return pretrain(synthetic_counts(n_cells=150, seed=1), out, max_epochs=2, **COUNTS)


def _weights(model: Exceiver) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.module.state_dict().items()}


def test_continued_training_starts_from_the_model_with_its_vocabulary(base, tmp_path):
    new = synthetic_counts(n_cells=80, n_genes=150, seed=2, prefix="G")  # the model's first 150 genes
    model = pretrain(new, tmp_path / "continued", init=base, batch_size=32, progress=False, **FROZEN)
    assert list(model.vocab.genes) == list(base.vocab.genes) and model.config == base.config
    before, after = _weights(base), _weights(model)
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    assert model.metrics["init"] == {"model": "in memory", "n_genes": 200, "n_genes_added": 0}
    # genes the new data never expresses keep the model's statistics; the others are re-estimated
    assert np.array_equal(model.scaler.n_expressed[150:], base.scaler.n_expressed[150:])
    assert not np.array_equal(model.scaler.expressed_mean[:150], base.scaler.expressed_mean[:150])
    assert Exceiver.load(tmp_path / "continued").metrics["init"]["n_genes"] == 200


def test_extended_genes_get_fresh_rows_and_keep_every_pretrained_one(base, tmp_path):
    other = synthetic_counts(n_cells=80, n_genes=40, seed=3, prefix="H")
    new = synthetic_counts(n_cells=80, n_genes=200, seed=2)
    joined = pd.concat([new.to_df(), other.to_df().set_index(new.obs_names)], axis=1)
    data = new.__class__(joined.to_numpy(np.float32), obs=new.obs, var=pd.DataFrame(index=joined.columns))
    kept = pretrain(data, None, init=base, batch_size=32, progress=False, **FROZEN)
    assert len(kept.vocab) == 200  # without extend_genes the H genes are left out
    model = pretrain(data, None, init=base, extend_genes=True, n_top_genes=0, batch_size=32, progress=False,
                     **FROZEN)
    assert list(model.vocab.genes) == [*base.vocab.genes, *other.var_names]
    before, after = _weights(base), _weights(model)
    for key in ("gene_emb.weight", "gene_log_dispersion"):
        assert torch.allclose(after[key][:200], before[key][:200], atol=1e-6)
    assert torch.allclose(after["gene_emb.weight"][-2:], before["gene_emb.weight"][-2:])  # padding, class rows
    output = next(k for k in after if k.startswith("count_decoder.") and k.endswith(".weight") and after[k].shape[0] == 240)
    assert torch.allclose(after[output][:200], before[output][:200], atol=1e-6)
    assert model.embed(data, inplace=False).shape == (80, TINY.get("bottleneck_dim", base.config.bottleneck_dim))


def test_a_warm_start_refuses_what_it_cannot_continue(base, tmp_path):
    with pytest.raises(ExceiverInputError, match=r"architecture, tokenizer and objectives are the model's: drop the "
                                                 r"model settings \['n_latents'\]"):
        pretrain(synthetic_counts(n_cells=40), None, init=base, model={"n_latents": 4}, progress=False)
    classifier = finetune(base, synthetic_counts(n_cells=60), "cell_type", max_epochs=1, progress=False)
    with pytest.raises(ExceiverInputError, match="needs a pretrained model; this one is a classifier of 3 classes"):
        pretrain(synthetic_counts(n_cells=40), None, init=classifier, progress=False)
    corpus = tmp_path / "corpus"
    assert main(["-q", "build-corpus", str(_write(synthetic_counts(n_cells=40, prefix="H"), tmp_path)),
                 "--out", str(corpus)]) == 0
    with pytest.raises(ExceiverInputError, match="built with other genes than the model's"):
        pretrain(corpus, None, init=base, progress=False)


def _write(adata, folder, name="cells.h5ad"):
    path = folder / name
    adata.write_h5ad(path)
    return path


def _with_batches(n_cells: int, seed: int, names: list[str]):
    adata = synthetic_counts(n_cells=n_cells, seed=seed)
    adata.obs["assay"] = pd.Categorical(np.resize(names, n_cells))
    return adata


def test_batches_condition_the_count_decoder_and_continue_with_new_ones(tmp_path):
    model = pretrain(_with_batches(120, 1, ["10x", "smart"]), tmp_path / "m", batch_key="assay", max_epochs=2, **COUNTS)
    assert model.batches == {"key": "assay", "categories": ["10x", "smart"]} and model.config.n_batches == 2
    trained_rows = model.module.batch_embedding.weight.detach().clone()
    assert trained_rows.abs().sum() > 0  # learned (they start at zero)
    loaded = Exceiver.load(tmp_path / "m")
    assert loaded.batches == model.batches and json.loads((tmp_path / "m" / "config.json").read_text())["batches"]
    embedding = loaded.embed(synthetic_counts(n_cells=30, seed=5), inplace=False)  # no batch needed to embed
    assert embedding.shape == (30, model.config.bottleneck_dim) and np.isfinite(embedding).all()

    query = _with_batches(60, 2, ["drop", "smart"])
    continued = pretrain(query, None, init=model, batch_key="assay", batch_size=32, progress=False, **FROZEN)
    assert continued.batches["categories"] == ["10x", "smart", "drop"]  # known first, new appended
    rows = continued.module.batch_embedding.weight.detach()
    assert torch.allclose(rows[:2], trained_rows, atol=1e-6) and rows[2].abs().max() < 1e-9  # a new row starts at 0


def test_a_model_without_batches_continues_with_a_batch_key(base):
    continued = pretrain(_with_batches(60, 2, ["drop", "smart"]), None, init=base, batch_key="assay", batch_size=32,
                         progress=False, **FROZEN)
    assert continued.batches == {"key": "assay", "categories": ["drop", "smart"]} and continued.config.n_batches == 2
    assert continued.module.batch_embedding.weight.abs().max() < 1e-9  # new rows start at no batch effect
    before, after = _weights(base), _weights(continued)
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)  # every other weight is the base's


def test_batch_columns_are_checked(tmp_path):
    adata = _with_batches(40, 1, ["a", "b"])
    with pytest.raises(ExceiverInputError, match=r"batch column 'donor' is not in obs; available columns: cell_type, assay"):
        pretrain(adata, None, batch_key="donor", **COUNTS)
    adata.obs["assay"] = adata.obs["assay"].astype(object)
    adata.obs.iloc[:3, adata.obs.columns.get_loc("assay")] = None
    with pytest.raises(ExceiverInputError, match=r"3 of 40 cells have no 'assay' batch"):
        pretrain(adata, None, batch_key="assay", **COUNTS)
    with pytest.raises(ExceiverInputError, match="conditions the count decoder"):
        pretrain(_with_batches(40, 1, ["a", "b"]), None, batch_key="assay", preset="paper", model=TINY, progress=False)


def test_a_gene_map_translates_the_datasets_whose_genes_it_maps(tmp_path, base):
    mouse = synthetic_counts(n_cells=60, seed=6)
    mouse.var_names = [f"g{j:04d}" for j in range(200)]  # "mouse" names of the model's G genes
    gene_map = tmp_path / "orthologs.csv"
    gene_map.write_text("human,mouse\n" + "".join(f"G{j:04d},g{j:04d}\n" for j in range(200)))
    human = synthetic_counts(n_cells=60, seed=7)
    model = pretrain([human, mouse], None, gene_map=gene_map, max_epochs=1, n_top_genes=0, **COUNTS)
    assert list(model.vocab.genes) == [f"G{j:04d}" for j in range(200)]  # one vocabulary for both species
    assert model.metrics["n_cells"] == 120

    path = _write(mouse, tmp_path, "mouse.h5ad")
    base.save(tmp_path / "base")
    assert main(["-q", "embed", str(tmp_path / "base"), str(path), "--out", str(tmp_path / "mapped.h5ad"),
                 "--gene-map", str(gene_map)]) == 0
    mapped = pd.read_csv(gene_map)  # the Python API gives the same embedding
    direct = base.embed(mouse, gene_map=mapped, inplace=False)
    assert np.allclose(ad.read_h5ad(tmp_path / "mapped.h5ad").obsm["X_exceiver"], direct, atol=1e-5)


def test_own_genes_keep_the_datas_vocabulary_with_the_models_rows_for_known_genes(base, tmp_path):
    # half of the data's genes are the model's (G0100..G0199), half are new; a map names 20 more
    new = synthetic_counts(n_cells=80, n_genes=300, seed=3, prefix="G")[:, 100:].copy()
    mouse_names = [f"m{g}" if i < 20 else g for i, g in enumerate(new.var_names)]
    pairs = pd.DataFrame({"model_gene": [f"G{j:04d}" for j in range(100, 120)],
                          "data_gene": [f"mG{j:04d}" for j in range(100, 120)]})
    new.var_names = mouse_names
    gene_map = tmp_path / "map.csv"
    pairs.to_csv(gene_map, index=False, header=False)
    model = pretrain(new, tmp_path / "own", init=base, own_genes=True, gene_map=gene_map, n_top_genes=0,
                     batch_size=32, progress=False, **FROZEN)
    assert list(model.vocab.genes) == list(new.var_names) and model.gene_map is None
    assert model.metrics["init"]["own_genes"] and model.metrics["init"]["n_genes_added"] == 100
    before, after = base.module.gene_emb.weight.detach(), model.module.gene_emb.weight.detach()
    rows = base.vocab.ids([g.removeprefix("m") for g in model.vocab.genes])
    assert (rows[:100] >= 0).all() and (rows[100:] < 0).all()  # mapped and named genes, then new ones
    torch.testing.assert_close(after[:100], before[rows[:100]], atol=1e-6, rtol=0)
    torch.testing.assert_close(after[-2:], before[-2:], atol=1e-6, rtol=0)  # padding and class rows
    decoder = f"count_decoder.{len(base.module.count_decoder) - 1}.weight"
    torch.testing.assert_close(model.module.state_dict()[decoder][:100], base.module.state_dict()[decoder][rows[:100]],
                               atol=1e-6, rtol=0)
    with pytest.raises(ExceiverInputError, match="own_genes=True needs init and excludes extend_genes=True"):
        pretrain(new, None, own_genes=True, progress=False)
    with pytest.raises(ExceiverInputError, match="excludes"):
        pretrain(new, None, init=base, own_genes=True, extend_genes=True, progress=False)


def test_a_continued_scaler_keeps_the_base_medians_of_genes_the_data_never_expresses():
    import dataclasses as dc

    from exceiver.data.preprocess import GeneScaler
    from exceiver.warm_start import merged_scaler

    n = 4
    base = GeneScaler(np.ones(n, np.float32), np.ones(n, np.float32), np.full(n, 10), np.ones(n, np.float32),
                      np.full(n, 5), expressed_median=np.array([7.0, 8.0, 9.0, 10.0], np.float32))
    fitted = dc.replace(base, n_expressed=np.array([3, 0, 2, 0]), expressed_median=np.full(n, 1.0, np.float32))
    np.testing.assert_array_equal(merged_scaler(fitted, base).expressed_median, [1.0, 8.0, 1.0, 10.0])
