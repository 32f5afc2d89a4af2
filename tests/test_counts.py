"""The count objective: whole-cell count targets in batches, the negative-binomial likelihood
through the cell bottleneck, the token cap of training steps, the variable-gene vocabulary, and
the bottleneck as the cell embedding users get."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from exceiver import Exceiver, pretrain
from exceiver.data.cells import CellCounts, align
from exceiver.data.preprocess import GeneScaler
from exceiver.data.tokenizer import TokenizerConfig, make_batch
from exceiver.data.variable_genes import highly_variable_genes
from exceiver.data.vocab import GeneVocab
from exceiver.errors import ExceiverInputError
from exceiver.nn.config import pretraining_configs
from exceiver.nn.network import ExceiverModule
from exceiver.nn.objectives import count_nll

from conftest import TINY, synthetic_counts


def two_datasets() -> CellCounts:
    """Two datasets on one vocabulary; the second measures only the first 80 of 120 genes."""
    first, second = synthetic_counts(n_cells=20, n_genes=120, seed=1), synthetic_counts(n_cells=20, n_genes=80, seed=2)
    vocab = GeneVocab(first.var_names)
    return CellCounts.concat([align(first, vocab, name="a"), align(second, vocab, name="b")])


def test_count_targets_carry_the_whole_cell_whatever_the_tokens():
    cells = two_datasets()
    scaler = GeneScaler.fit(cells)
    tokenizer = TokenizerConfig(train_tokens=10, mask_fraction=0.2, count_targets=True)
    rows = np.arange(cells.n_cells)
    batch = make_batch(cells, rows, scaler, tokenizer, masked=True, salt=3)
    dense = cells.counts.toarray()
    for i in rows:
        real = batch.counts[i] > 0
        genes = batch.count_genes[i][real].numpy()
        np.testing.assert_array_equal(np.sort(genes), np.flatnonzero(dense[i]))
        np.testing.assert_allclose(batch.counts[i][real].numpy(), dense[i, genes])
        assert batch.library[i].item() == pytest.approx(dense[i].sum())
    np.testing.assert_array_equal(batch.measured.numpy(), cells.measured[cells.source])
    assert not batch.measured[cells.source == 1][:, 80:].any()
    inference = make_batch(cells, rows, scaler, tokenizer)  # whole cells: no count targets needed
    assert inference.counts.shape[1] == 0 and inference.measured.shape[1] == 0


def test_training_steps_see_a_fresh_capped_subset_and_inference_every_gene():
    adata = synthetic_counts(n_cells=30, n_genes=400)
    cells = align(adata, GeneVocab(adata.var_names))
    scaler = GeneScaler.fit(cells)
    tokenizer = TokenizerConfig(max_tokens=1000, train_tokens=20, mask_fraction=0.15)
    rows = np.flatnonzero(cells.n_genes_expressed > 40)[:5]
    assert len(rows) == 5
    one, two = (make_batch(cells, rows, scaler, tokenizer, masked=True, salt=s) for s in (1, 2))
    assert (one.query_mask.sum(1) == 3).all()  # 15% of the 20-token cap is masked
    assert (one.token_mask.sum(1) == 20).all()  # the cap is filled from the unmasked genes
    tokens = [set(b.gene_ids[0][b.token_mask[0]].tolist()) for b in (one, two)]
    assert tokens[0] != tokens[1]  # each step draws its own subset
    whole = make_batch(cells, rows, scaler, tokenizer)
    np.testing.assert_array_equal(whole.token_mask.sum(1).numpy(), cells.n_genes_expressed[rows])


def test_count_loss_is_the_negative_binomial_likelihood_of_the_measured_genes():
    cells = two_datasets()
    scaler = GeneScaler.fit(cells)
    config, tokenizer, _ = pretraining_configs("default", n_genes=120, **TINY, bottleneck_dim=4, count_hidden=16)
    torch.manual_seed(0)
    module = ExceiverModule(config)
    with torch.no_grad():
        module.gene_log_dispersion.normal_()
    rows = np.arange(cells.n_cells)
    batch = make_batch(cells, rows, scaler, tokenizer, masked=True, salt=5)
    latents = module.encode(batch)
    loss = count_nll(module, latents, batch)

    logits = module.count_logits(module.pool(latents, "bottleneck"))
    dense = torch.from_numpy(cells.counts.toarray())
    theta = module.gene_log_dispersion.exp()
    for i in rows:
        measured = torch.from_numpy(cells.measured[cells.source[i]])
        share = torch.softmax(logits[i][measured], dim=0)
        mu = dense[i].sum() * share
        # torch's NegativeBinomial(total_count=theta, logits=log(mu / theta)) has mean mu
        nb = torch.distributions.NegativeBinomial(total_count=theta[measured], logits=(mu / theta[measured]).log())
        expected = -nb.log_prob(dense[i][measured]).sum() / measured.sum()
        assert loss[i].item() == pytest.approx(expected.item(), rel=1e-4)
    loss.mean().backward()
    grads = [p.grad for p in (module.gene_log_dispersion, module.count_decoder[0].weight, module.bottleneck[1].weight)]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_vocabulary_is_the_training_cells_most_variable_genes():
    adata = synthetic_counts(n_cells=150, n_genes=300)
    model = pretrain(adata, None, model=TINY, n_top_genes=60, max_epochs=1, progress=False)
    assert len(model.vocab) == 60
    from exceiver.data.datamodule import validation_cells

    cells = align(adata, GeneVocab(adata.var_names))
    train = np.flatnonzero(~validation_cells(cells.n_cells, 0.1, 0))
    chosen = highly_variable_genes(cells.subset(train), 60)
    assert list(model.vocab.genes) == list(adata.var_names[chosen])
    assert len(pretrain(adata, None, model=TINY, n_top_genes=0, max_epochs=1, progress=False).vocab) == 300
    paper = pretrain(adata, None, preset="paper", model=dict(n_latents=4, n_layers=1, ff_dim=8), max_epochs=1,
                     progress=False)
    assert len(paper.vocab) == 300  # the paper preset keeps every gene, as published


def test_with_a_batch_key_the_vocabulary_is_chosen_within_each_batch():
    """seurat_v3 per batch, as scVI's users choose genes for an integration: a run with a batch key
    picks the genes scanpy picks with that batch key, on the training cells."""
    import anndata as ad
    import scanpy as sc

    from exceiver.data.datamodule import validation_cells

    adata = synthetic_counts(n_cells=500, n_genes=300, seed=4)
    adata.obs["assay"] = np.where(np.arange(500) < 300, "deep", "shallow")
    rows = adata.obs["assay"].to_numpy() == "shallow"
    counts = adata.X.toarray()
    counts[rows] = counts[rows] // 3  # the shallow batch: fewer counts, other variable genes
    adata.X = sp.csr_matrix(counts)
    model = pretrain(adata, None, model=TINY, n_top_genes=60, batch_key="assay", max_epochs=1, progress=False)
    train = ~validation_cells(adata.n_obs, 0.1, 0)
    cells = ad.AnnData(adata.X[train].astype(np.float32), obs=adata.obs[train][["assay"]], var=adata.var[[]])
    cells = cells[:, np.asarray((cells.X > 0).sum(0)).ravel() > 0].copy()
    per_batch = sc.pp.highly_variable_genes(cells, flavor="seurat_v3", n_top_genes=60, batch_key="assay", inplace=False)
    pooled = sc.pp.highly_variable_genes(cells, flavor="seurat_v3", n_top_genes=60, inplace=False)
    assert set(model.vocab.genes) == set(cells.var_names[per_batch["highly_variable"].to_numpy()])
    assert set(model.vocab.genes) != set(cells.var_names[pooled["highly_variable"].to_numpy()])


def test_batches_too_small_for_a_loess_fit_are_ranked_together(caplog):
    from exceiver.data.variable_genes import MIN_BATCH_CELLS

    cells = align(synthetic_counts(n_cells=300, n_genes=200, seed=6), GeneVocab(synthetic_counts(n_genes=200).var_names))
    batches = np.array(["big"] * 280 + ["tiny1"] * 12 + ["tiny2"] * 8)
    with caplog.at_level(logging.INFO, logger="exceiver"):
        chosen = highly_variable_genes(cells, 50, batches)
    assert len(chosen) == 50 and MIN_BATCH_CELLS == 50
    assert any("2 batches of fewer than 50 cells" in r.getMessage() for r in caplog.records)
    one_batch = highly_variable_genes(cells, 50, np.full(300, "only"))  # a single batch: as without batches
    np.testing.assert_array_equal(one_batch, highly_variable_genes(cells, 50))


def test_variable_gene_selection_leaves_torch_threads_alone():
    cells = align(synthetic_counts(n_cells=80, n_genes=200), GeneVocab(synthetic_counts(n_genes=200).var_names))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert len(highly_variable_genes(cells, 50)) == 50
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ExceiverInputError, match="n_top_genes must be >= 1"):
        highly_variable_genes(cells, 0)


def test_few_cells_widen_the_loess_span_or_give_a_clear_error(shared_dir, monkeypatch):
    """240 PBMCs make scanpy's seurat_v3 loess singular at its default span 0.3: a wider span ranks them."""
    import anndata as ad
    import scanpy as sc

    adata = ad.read_h5ad(shared_dir / "data" / "pbmc3k_seurat_2638.h5ad")
    adata = adata[adata.obs["cell_type"].isin(["B", "CD14+ Mono", "NK", "Naive CD4 T"])]
    adata = adata[np.sort(np.random.default_rng(0).choice(adata.n_obs, 240, replace=False))].copy()
    cells = align(adata, GeneVocab(adata.var_names))
    with pytest.raises(ValueError, match="singularities"):
        sc.pp.highly_variable_genes(ad.AnnData(cells.counts.astype(np.float32)), flavor="seurat_v3", n_top_genes=2000)
    chosen = highly_variable_genes(cells, 2000)
    assert len(chosen) == 2000 and np.all(np.diff(chosen) > 0)

    def singular(*args, **kwargs):
        raise ValueError("b'There are other near singularities as well.'")

    monkeypatch.setattr(sc.pp, "highly_variable_genes", singular)
    with pytest.raises(ExceiverInputError, match="cannot rank variable genes.*n_top_genes=0"):
        highly_variable_genes(cells, 2000)


def test_the_cell_embedding_is_the_bottleneck(tmp_path):
    adata = synthetic_counts(n_cells=60)
    model = pretrain(adata, tmp_path / "m", model={**TINY, "bottleneck_dim": 6}, max_epochs=2, progress=False)
    assert model.objectives.count_weight > 0 and model.config.count_head
    embedding = model.embed(adata, progress=False)
    assert embedding.shape == (60, 6) and adata.uns["exceiver"]["X_exceiver"]["pooling"] == "bottleneck"
    again = Exceiver.load(tmp_path / "m")
    np.testing.assert_allclose(again.embed(adata, inplace=False, progress=False), embedding, atol=1e-5)
    assert model.embed(adata, pooling="mean", inplace=False, progress=False).shape == (60, 16)
    assert "val_counts" in model.metrics and model.metrics["val_counts"] > 0
    no_bottleneck = pretrain(adata, None, model={**TINY, "count_weight": 0.0}, max_epochs=1, progress=False)
    assert no_bottleneck.module.bottleneck is None  # nothing would train it
    assert no_bottleneck.embed(adata, inplace=False, progress=False).shape == (60, 16)  # the mean latent
    with pytest.raises(ExceiverInputError, match="no cell bottleneck"):
        no_bottleneck.embed(adata, pooling="bottleneck", progress=False)
    with pytest.raises(ExceiverInputError, match="bottleneck_dim > 0"):
        pretrain(adata, None, model={**TINY, "bottleneck_dim": 0}, max_epochs=1, progress=False)


@pytest.mark.parametrize("detach", [False, True])
def test_a_detached_value_head_learns_without_moving_the_encoder(detach):
    from exceiver.nn.objectives import pretraining_loss

    cells = two_datasets()
    scaler = GeneScaler.fit(cells)
    config, tokenizer, objectives = pretraining_configs("default", n_genes=120, **TINY, count_weight=0.0,
                                                        value_detach=detach)
    torch.manual_seed(0)
    module = ExceiverModule(config)
    batch = make_batch(cells, np.arange(cells.n_cells), scaler, tokenizer, masked=True, salt=1)
    record = pretraining_loss(module, batch, objectives, salt=1)
    record.total.backward()
    encoder = [module.latents, *module.encoder.parameters(), *module.processor.parameters()]
    moved = any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder)
    assert moved != detach
    assert module.value_head[-1].weight.grad.abs().sum() > 0  # the head itself learns either way


def test_log_values_and_a_flattened_bottleneck_round_trip(tmp_path):
    """Token values "log" are the log-normalised expression itself, remembered by the saved scaler;
    a "flatten" bottleneck reads every latent."""
    from exceiver.data.preprocess import entry_library_size, log_normalise

    adata = synthetic_counts(n_cells=60)
    model = pretrain(adata, tmp_path / "m", model={**TINY, "values": "log", "bottleneck_input": "flatten"},
                     max_epochs=1, progress=False)
    cells = align(adata, model.vocab)
    expected = log_normalise(cells.counts.data, entry_library_size(cells), model.scaler.target_sum)
    np.testing.assert_allclose(model.scaler.cell_values(cells), expected, rtol=1e-6)
    ids = np.arange(5)
    np.testing.assert_array_equal(model.scaler.log_expression(ids, np.full(5, 2.5, np.float32)), np.full(5, 2.5))
    assert model.module.bottleneck[1].in_features == TINY["n_latents"] * TINY["latent_dim"]
    again = Exceiver.load(tmp_path / "m")
    assert not again.scaler.standardise and again.tokenizer.values == "log"
    np.testing.assert_allclose(again.embed(adata, inplace=False, progress=False),
                               model.embed(adata, inplace=False, progress=False), atol=1e-5)
    zscores = GeneScaler.fit(cells)
    assert zscores.standardise  # the paper's z-scores otherwise
    np.testing.assert_array_equal(zscores.value_scale(ids), zscores.std[ids])  # value units -> log units
    np.testing.assert_array_equal(model.scaler.value_scale(ids), np.ones(5))
    with pytest.raises(ValueError, match="values must be 'zscore' or 'log'"):
        pretraining_configs("default", values="rank")
    with pytest.raises(ValueError, match="bottleneck_input must be"):
        pretraining_configs("default", bottleneck_input="max")


def test_a_variational_bottleneck_samples_in_training_and_pays_its_kl():
    """bottleneck_kl: the count decoder reads a sample N(bottleneck, 1) in training, and the loss adds
    the KL to N(0, 1) per measured gene; embeddings (the mean) stay deterministic."""
    from exceiver.nn.objectives import count_nll, pretraining_loss

    cells = two_datasets()
    scaler = GeneScaler.fit(cells)
    config, tokenizer, objectives = pretraining_configs("default", n_genes=120, **TINY, bottleneck_kl=2.0)
    torch.manual_seed(0)
    module = ExceiverModule(config)
    batch = make_batch(cells, np.arange(cells.n_cells), scaler, tokenizer, masked=True, salt=1)
    one, two = (pretraining_loss(module, batch, objectives, salt=1) for _ in range(2))
    assert not torch.isclose(one.parts["counts"], two.parts["counts"])  # a fresh sample each time
    latents = module.encode(batch)
    mean = module.pool(latents, "bottleneck")
    kl = (0.5 * mean.pow(2).sum(-1) / batch.measured.sum(-1)).mean()
    torch.testing.assert_close(one.parts["bottleneck_kl"], kl)
    expected = one.parts["masked_values"] + one.parts["counts"] + 2.0 * kl
    torch.testing.assert_close(one.total, expected)
    unsampled = count_nll(module, latents, batch).mean()  # validation reads the mean itself, no sample
    torch.testing.assert_close(unsampled, count_nll(module, latents, batch, cell=mean).mean())
    assert not torch.isclose(unsampled, one.parts["counts"])
    deterministic = pretraining_configs("default", n_genes=120, **TINY)[2]
    assert "bottleneck_kl" not in pretraining_loss(module, batch, deterministic, salt=1).parts
