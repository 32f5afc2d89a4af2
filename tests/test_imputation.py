"""Imputation through the count decoder: expected normalised expression, as scVI's
`get_normalized_expression` gives it, checked against the module computed by hand."""

import dataclasses

import numpy as np
import pytest
import torch

from conftest import synthetic_counts
from exceiver import Exceiver, ExceiverInputError
from exceiver.data.tokenizer import make_batch
from exceiver.nn.network import ExceiverModule
from exceiver.tl import impute


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return Exceiver.load(tiny_model_dir)


@pytest.fixture
def adata():
    return synthetic_counts(n_cells=30, seed=12)[:, :150].copy()  # the dataset measured 150 of the 200 genes


def _count_logits(model, adata, batch_code: int | None = None) -> torch.Tensor:
    """The count decoder's logits [cells, vocabulary] of each cell, by hand from the module."""
    cells = model.cells(adata)
    batch = make_batch(cells, np.arange(cells.n_cells), model.scaler, model.tokenizer)
    module = model.module.eval()
    with torch.no_grad():
        cell = module.bottleneck(module.pool(module.encode(batch), "flatten"))
        if batch_code is not None:
            cell = cell + module.batch_embedding.weight[batch_code]
        return module.count_decoder(cell).double()


def test_counts_are_log1p_of_the_softmax_share_over_measured_genes_x_1e4(model, adata):
    imputed = impute(model, adata, progress=False)
    assert imputed.shape == (30, 150) and imputed.dtype == np.float32
    assert np.isfinite(imputed).all() and (imputed >= 0).all()
    logits = _count_logits(model, adata)
    share = torch.softmax(logits[:, :150], dim=1).numpy()  # renormalised over the 150 measured genes
    np.testing.assert_allclose(imputed, np.log1p(1e4 * share), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.expm1(imputed.astype(np.float64)).sum(1), 1e4, rtol=1e-3)
    assert adata.layers["exceiver_imputed"] is imputed
    assert adata.uns["exceiver"]["exceiver_imputed"]["method"] == "counts"
    # A gene the dataset did not measure: its share relative to the same normaliser.
    chosen = impute(model, adata, ["G0003", "G0180"], progress=False)
    outside = torch.exp(logits[:, 180] - torch.logsumexp(logits[:, :150], dim=1)).numpy()
    np.testing.assert_allclose(chosen[:, 0], imputed[:, 3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chosen[:, 1], np.log1p(1e4 * outside), rtol=1e-4, atol=1e-5)


def test_counts_differ_from_the_value_heads_level_if_expressed(model, adata):
    counts = impute(model, adata, inplace=False, progress=False)
    values = impute(model, adata, method="values", inplace=False, progress=False)
    assert not np.allclose(counts, values, atol=0.1)
    with pytest.raises(ExceiverInputError, match=r"method='expected' is not one of counts, values"):
        impute(model, adata, method="expected", progress=False)
    with pytest.raises(ExceiverInputError, match="trained without batches"):
        impute(model, adata, batch="10x", progress=False)


def test_a_model_without_a_count_decoder_refuses_counts(model, adata):
    config = dataclasses.replace(model.config, count_head=False)
    plain = Exceiver(ExceiverModule(config), model.vocab, model.scaler, model.tokenizer)
    with pytest.raises(ExceiverInputError, match=r"^this model has no count decoder .*use method='values'$"):
        impute(plain, adata, progress=False)
    assert "exceiver_imputed" not in adata.layers
    values = impute(plain, adata, method="values", progress=False)
    assert values.shape == (30, 150) and np.isfinite(values).all()


def test_batches_condition_the_decoder_on_one_batch_or_average_over_all(model, adata):
    config = dataclasses.replace(model.config, n_batches=2)
    module = ExceiverModule(config)
    module.load_state_dict(model.module.state_dict(), strict=False)
    with torch.no_grad():
        draw = torch.Generator().manual_seed(0)
        module.batch_embedding.weight.copy_(torch.randn(2, config.bottleneck_dim, generator=draw))
    batched = Exceiver(module, model.vocab, model.scaler, model.tokenizer,
                       batches={"key": "assay", "categories": ["10x", "smart"]})
    expected = [1e4 * torch.softmax(_count_logits(batched, adata, code)[:, :150], dim=1).numpy() for code in (0, 1)]
    smart = impute(batched, adata, batch="smart", inplace=False, progress=False)
    np.testing.assert_allclose(smart, np.log1p(expected[1]), rtol=1e-4, atol=1e-5)
    mean = impute(batched, adata, progress=False)
    np.testing.assert_allclose(mean, np.log1p((expected[0] + expected[1]) / 2), rtol=1e-4, atol=1e-5)
    assert adata.uns["exceiver"]["exceiver_imputed"]["batch"] == "mean over the model's batches"
    assert not np.allclose(smart, np.log1p(expected[0]), atol=1e-3)  # the batch matters
    with pytest.raises(ExceiverInputError, match=r"batch='drop' is not one of the model's 2 batches of 'assay'"):
        impute(batched, adata, batch="drop", progress=False)
    with pytest.raises(ExceiverInputError, match="method='values' takes no batch"):
        impute(batched, adata, method="values", batch="smart", progress=False)


def test_genes_that_cannot_be_filled_are_warned_about(model, adata):
    trained = model.scaler.n_expressed[7]
    model.scaler.n_expressed[7] = 0  # as if no training cell had expressed G0007
    try:
        adata.var_names = ["X1", "X2"] + list(adata.var_names[2:])
        with pytest.warns(UserWarning, match=r"^3 of 150 genes of pbmc cannot be imputed \(2 not in the model's "
                                             r"vocabulary, 1 never expressed in its training cells\)"):
            imputed = impute(model, adata, name="pbmc", progress=False)
    finally:
        model.scaler.n_expressed[7] = trained
    assert np.isnan(imputed[:, [0, 1, 7]]).all() and np.isfinite(np.delete(imputed, [0, 1, 7], axis=1)).all()
    adata.var_names = [f"Y{j}" for j in range(150)]
    with pytest.raises(ExceiverInputError, match="none of its 150 genes is in the model.s vocabulary"):
        impute(model, adata, progress=False)
