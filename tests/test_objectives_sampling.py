"""The count objective on a sample of each cell's zero-count genes (`count_zero_samples`), its
sampled normaliser (`count_sampled_share`) and the factorised output layer (`count_rank`):
what each estimates, against the dense likelihood over every measured gene."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from exceiver.data.preprocess import GeneScaler
from exceiver.data.tokenizer import make_batch
from exceiver.nn.config import ObjectiveConfig, pretraining_configs
from exceiver.nn.network import ExceiverModule
from exceiver.nn.objectives import count_nll, pretraining_loss, sampled_log_normaliser, sampled_zero_genes
from exceiver.warm_start import transfer_weights

from conftest import TINY
from test_counts import two_datasets

N_GENES = 120


def setting(**architecture):
    """A tiny count model (dispersions and output biases spread out, so that genes differ), a
    masked batch of two datasets (the second measures 80 of the 120 genes), its bottleneck."""
    cells = two_datasets()
    config, tokenizer, _ = pretraining_configs("default", n_genes=N_GENES, **TINY, bottleneck_dim=4,
                                               count_hidden=16, **architecture)
    torch.manual_seed(0)
    module = ExceiverModule(config)
    with torch.no_grad():
        module.gene_log_dispersion.normal_()
        module.count_decoder[-1].bias.normal_(0, 2)
    batch = make_batch(cells, np.arange(cells.n_cells), GeneScaler.fit(cells), tokenizer, masked=True, salt=5)
    return module, batch, module.pool(module.encode(batch), "bottleneck")


def n_zeros(batch) -> torch.Tensor:
    return batch.measured.sum(-1) - (batch.counts > 0).sum(-1)


def test_each_zero_is_sampled_with_the_probability_its_weight_undoes():
    module, batch, _ = setting()
    n_measured = batch.measured.sum(-1)
    rows, slots = np.nonzero(batch.counts.numpy() > 0)
    expressed = set(zip(rows.tolist(), batch.count_genes[rows, slots].tolist()))
    hits = torch.zeros(len(batch), N_GENES)
    for salt in range(400):
        genes, weights = sampled_zero_genes(batch, n_measured, N_GENES, 10, salt)
        for c, g in (weights > 0).nonzero().tolist():
            gene = genes[c, g].item()
            assert batch.measured[c, gene] and (c, gene) not in expressed  # only the cell's zeros
            assert weights[c, g] == pytest.approx(n_zeros(batch)[c].item() / 10)  # 1 / its probability
            hits[c, gene] += 1
    zeros = batch.measured.clone()
    zeros[[c for c, _ in expressed], [g for _, g in expressed]] = False
    assert not hits[~zeros].any()
    frequency = hits[zeros] / 400  # each zero of each cell: probability 10 / its zeros
    expected = (10 / n_zeros(batch).double())[:, None].expand(-1, N_GENES)[zeros].float()
    assert ((frequency - expected).abs() < 4 * (expected * (1 - expected) / 400).sqrt()).float().mean() > 0.99
    assert (hits.sum(1) / 400 - 10).abs().max() < 1.0  # about K zeros per cell


def test_the_sampled_loss_is_the_dense_loss_in_expectation():
    module, batch, cell = setting()
    dense = count_nll(module, None, batch, cell=cell).detach()
    draws = torch.stack([count_nll(module, None, batch, cell=cell, zero_samples=8, salt=s).detach()
                         for s in range(600)])
    mean, standard_error = draws.mean(0), draws.std(0) / 600 ** 0.5
    assert (standard_error > 1e-3 * dense.abs()).all()  # the sample does vary
    assert ((mean - dense).abs() < 4 * standard_error).all()
    assert not torch.allclose(draws[0], dense, rtol=1e-3)  # one draw is not the dense loss itself


def test_the_sampled_normaliser_is_unbiased_and_its_bias_in_the_loss_shrinks_with_the_sample():
    module, batch, cell = setting()
    logits = module.count_logits(cell).detach()
    exact = torch.logsumexp(logits.masked_fill(~batch.measured, float("-inf")), dim=-1).exp()
    expressed = batch.count_genes.clamp(max=N_GENES - 1)
    n_measured = batch.measured.sum(-1)
    estimates = []
    for salt in range(600):
        zero_genes, zero_weights = sampled_zero_genes(batch, n_measured, N_GENES, 8, salt)
        genes = torch.cat([expressed, zero_genes], dim=1)
        weights = torch.cat([(batch.counts > 0).float(), zero_weights], dim=1)
        estimates.append(sampled_log_normaliser(logits.gather(1, genes), weights).exp())
    estimates = torch.stack(estimates)
    assert ((estimates.mean(0) - exact).abs() < 4 * estimates.std(0) / 600 ** 0.5).all()
    dense = count_nll(module, None, batch, cell=cell).detach()
    bias = [(torch.stack([count_nll(module, None, batch, cell=cell, zero_samples=k, sampled_share=True, salt=s)
                          for s in range(300)]).detach().mean(0) - dense).abs().mean() for k in (4, 16)]
    assert bias[1] < bias[0] / 2  # the log's bias falls about as 1 / K


@pytest.mark.parametrize("sampled_share", [False, True])
@pytest.mark.parametrize("rank", [0, 3])
def test_a_sample_of_every_zero_is_the_dense_loss_and_gradient(sampled_share, rank):
    module, batch, cell = setting(count_rank=rank)
    dense = count_nll(module, None, batch, cell=cell)
    dense_grads = torch.autograd.grad(dense.sum(), list(module.count_decoder.parameters()), retain_graph=True)
    every = int(n_zeros(batch).max())
    for k in (every, 10 * every):
        sampled = count_nll(module, None, batch, cell=cell, zero_samples=k, sampled_share=sampled_share, salt=3)
        torch.testing.assert_close(sampled, dense, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(sampled.sum(), list(module.count_decoder.parameters()), retain_graph=True)
        for got, expected in zip(grads, dense_grads):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_the_sample_is_fixed_by_the_salt_and_the_cell_not_its_batch():
    module, batch, cell = setting()
    for share in (False, True):
        one = count_nll(module, None, batch, cell=cell, zero_samples=5, sampled_share=share, salt=11)
        torch.testing.assert_close(count_nll(module, None, batch, cell=cell, zero_samples=5, sampled_share=share,
                                             salt=11), one, rtol=0, atol=0)
        other = count_nll(module, None, batch, cell=cell, zero_samples=5, sampled_share=share, salt=12)
        assert (one != other).sum() > len(batch) // 2
        rows = torch.tensor([7, 3, 30])
        part = dataclasses.replace(batch, **{f.name: getattr(batch, f.name)[rows]
                                             for f in dataclasses.fields(batch)})
        alone = count_nll(module, None, part, cell=cell[rows], zero_samples=5, sampled_share=share, salt=11)
        torch.testing.assert_close(alone, one[rows], rtol=1e-6, atol=0)


def test_the_default_objectives_compute_the_dense_loss_whatever_the_salt():
    module, batch, _ = setting()
    objectives = pretraining_configs("default", n_genes=N_GENES)[2]
    assert objectives.count_zero_samples == 0 and not objectives.count_sampled_share
    parts = [pretraining_loss(module, batch, objectives, salt=s).parts["counts"] for s in (0, 1, 99)]
    dense = count_nll(module, module.encode(batch), batch).mean()
    assert all(torch.equal(p, dense) for p in parts)
    sampled = pretraining_loss(module, batch, dataclasses.replace(objectives, count_zero_samples=5), salt=0)
    assert not torch.isclose(sampled.parts["counts"], dense)


def test_the_default_count_decoder_keeps_its_weights_layout():
    module, _, _ = setting()
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items() if k.startswith("count_decoder")}
    assert shapes == {"count_decoder.0.weight": (16, 4), "count_decoder.0.bias": (16,),
                      "count_decoder.1.weight": (16,), "count_decoder.1.bias": (16,),
                      "count_decoder.3.weight": (N_GENES, 16), "count_decoder.3.bias": (N_GENES,)}
    factorised, _, _ = setting(count_rank=3)
    assert factorised.count_decoder[-2].weight.shape == (3, 16) and factorised.count_decoder[-1].weight.shape == (N_GENES, 3)


def test_a_factorised_decoder_takes_new_genes_as_the_full_one_does():
    base, _, _ = setting(count_rank=3)
    grown = ExceiverModule(dataclasses.replace(base.config, n_genes=N_GENES + 5))
    transfer_weights(base, grown)
    torch.testing.assert_close(grown.count_decoder[-1].weight[:N_GENES], base.count_decoder[-1].weight)
    torch.testing.assert_close(grown.count_decoder[-2].weight, base.count_decoder[-2].weight)


def test_impossible_sampling_settings_are_refused():
    with pytest.raises(ValueError, match="count_zero_samples must be >= 0"):
        ObjectiveConfig(count_zero_samples=-1)
    with pytest.raises(ValueError, match="needs count_zero_samples > 0"):
        ObjectiveConfig(count_sampled_share=True)
    with pytest.raises(ValueError, match="model sizes must be positive"):
        pretraining_configs("default", count_rank=-2)


def test_a_model_trained_on_samples_is_written_and_read_with_its_settings(tmp_path):
    from exceiver import Exceiver, pretrain

    from conftest import synthetic_counts

    settings = dict(count_zero_samples=20, count_sampled_share=True, count_rank=4)
    adata = synthetic_counts(n_cells=60)
    model = pretrain(adata, tmp_path / "model", model={**TINY, **settings}, max_epochs=1, batch_size=32,
                     progress=False)
    assert np.isfinite(model.metrics["val_counts"])
    loaded = Exceiver.load(tmp_path / "model")
    assert (loaded.objectives.count_zero_samples, loaded.objectives.count_sampled_share) == (20, True)
    assert loaded.config.count_rank == 4 and loaded.module.count_decoder[-1].weight.shape == (len(loaded.vocab), 4)
    np.testing.assert_allclose(loaded.embed(adata), model.embed(adata), rtol=1e-5, atol=1e-6)
