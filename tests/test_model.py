import numpy as np
import pytest
import torch

from exceiver.errors import ModelFileError
from exceiver.nn.config import ExceiverConfig, from_dict, pretraining_configs
from exceiver.nn.attention import _merge_heads, _split_heads
from exceiver.nn.network import ExceiverModule
from exceiver.data.preprocess import GeneScaler
from exceiver.data.tokenizer import TokenizerConfig, make_batch
from exceiver.data.cells import CellCounts, align
from exceiver.data.vocab import GeneVocab

from conftest import TINY, synthetic_counts


def encode(module, gene_ids, values, mask, zero=None):
    """Latents of raw token tensors (the batches of these tests are built by hand)."""
    return module.process(module.encode_tokens(gene_ids, values, mask, zero))


def forward(module, gene_ids, values, mask, queries):
    return module.predict_values(encode(module, gene_ids, values, mask), queries)


@pytest.fixture
def module():
    torch.manual_seed(0)
    return ExceiverModule(ExceiverConfig(n_genes=120, n_classes=3, **TINY)).eval()


def test_presets_and_config_checks():
    paper, tokenizer, objectives = pretraining_configs("paper", n_genes=19067)
    assert (paper.gene_dim, paper.n_latents, paper.latent_dim, paper.n_layers, paper.n_heads, paper.ff_dim) == (4, 128, 4, 8, 4, 2048)
    assert from_dict(ExceiverConfig, paper.to_dict(), "test") == paper
    assert not (paper.detection_head or paper.projection_head or objectives.detection_weight)
    assert not (paper.bottleneck_dim or paper.count_head or tokenizer.count_targets or tokenizer.train_tokens)
    default, tokenizer, objectives = pretraining_configs("default", n_genes=10, n_latents=8)
    assert default.count_head and not (default.detection_head or default.projection_head)  # heads follow objectives
    assert (default.n_latents, default.bottleneck_dim, tokenizer.train_tokens, objectives.count_weight) == (8, 16, 256, 1.0)
    assert objectives.value_detach and default.bottleneck_input == "flatten" and tokenizer.values == "log"
    paper, paper_tokens, _ = pretraining_configs("paper", n_genes=10)
    assert paper.bottleneck_dim == 0 and paper_tokens.values == "zscore"  # the published transform
    assert tokenizer.count_targets and tokenizer.zero_query_ratio == 0
    detection, tokenizer, _ = pretraining_configs("default", n_genes=10, detection_weight=1.0, zero_query_ratio=1.0,
                                                  contrastive_weight=0.2)
    assert detection.detection_head and detection.projection_head
    with pytest.raises(ValueError, match="unknown preset"):
        pretraining_configs("huge")
    with pytest.raises(ValueError, match=r"unknown or derived fields \['detection_head'\]"):
        pretraining_configs("default", detection_head=False)
    with pytest.raises(ValueError, match="needs zero_query_ratio > 0"):
        pretraining_configs("default", detection_weight=1.0)
    with pytest.raises(ModelFileError, match=r"unknown ExceiverConfig fields \['cell_query'\]"):
        from_dict(ExceiverConfig, {**paper.to_dict(), "cell_query": True}, "test")
    with pytest.raises(ValueError, match="latent_dim / n_heads must divide evenly"):
        ExceiverConfig(latent_dim=10, n_heads=4)
    # The paper model's parameter count: embedding, cross-attention and 8 layers of width 4.
    assert ExceiverModule(paper).n_parameters() < 250_000


def test_padding_does_not_change_outputs(module):
    torch.manual_seed(1)
    gene_ids = torch.randint(0, 120, (1, 30))
    values = torch.randn(1, 30)
    queries = torch.randint(0, 120, (1, 5))
    alone = forward(module, gene_ids, values, torch.ones(1, 30, dtype=torch.bool), queries)
    padded_ids = torch.cat([gene_ids, torch.full((1, 50), 120)], dim=1)
    padded_values = torch.cat([values, torch.randn(1, 50)], dim=1)  # junk values at padding
    mask = torch.zeros(1, 80, dtype=torch.bool)
    mask[0, :30] = True
    padded = forward(module, padded_ids, padded_values, mask, queries)
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_encoder_is_invariant_to_token_order(module):
    torch.manual_seed(2)
    gene_ids, values = torch.randint(0, 120, (2, 40)), torch.randn(2, 40)
    mask = torch.ones(2, 40, dtype=torch.bool)
    perm = torch.randperm(40)
    latents = encode(module, gene_ids, values, mask)
    shuffled = encode(module, gene_ids[:, perm], values[:, perm], mask)
    torch.testing.assert_close(latents, shuffled, atol=1e-5, rtol=1e-5)


def test_cells_in_a_batch_match_cells_alone(module):
    adata = synthetic_counts(n_cells=12, n_genes=120)
    cells = align(adata, GeneVocab(adata.var_names))
    scaler = GeneScaler.fit(cells)
    kwargs = dict(tokenizer=TokenizerConfig(max_tokens=1000, mask_fraction=0.15), masked=True, salt=5)
    batch = make_batch(cells, np.arange(12), scaler, **kwargs)
    together = module(batch)
    for i in (0, 7):
        single = make_batch(cells, [i], scaler, **kwargs)
        alone = module(single)
        n = int(single.query_mask.sum())
        torch.testing.assert_close(alone[0, :n], together[i, :n], atol=1e-5, rtol=1e-5)


def test_masked_counts_do_not_influence_latents(module):
    """End to end: multiplying only the masked genes' counts changes the targets, not the latents."""
    adata = synthetic_counts(n_cells=6, n_genes=120)
    cells = align(adata, GeneVocab(adata.var_names))
    scaler = GeneScaler.fit(cells)
    kwargs = dict(tokenizer=TokenizerConfig(max_tokens=1000, mask_fraction=0.3), masked=True, salt=9)
    batch = make_batch(cells, np.arange(6), scaler, **kwargs)
    boosted = cells.counts.tolil()
    for i in range(6):
        for g in batch.query_ids[i][batch.query_mask[i]].tolist():
            boosted[i, g] *= 20
    changed = make_batch(CellCounts(boosted.tocsr(), cells.measured, cells.source, cells.obs_names,
                                    cells.source_names), np.arange(6), scaler, **kwargs)
    latents = module.encode(batch)
    torch.testing.assert_close(latents, module.encode(changed),
                               atol=0, rtol=0)
    assert not torch.equal(batch.targets, changed.targets)


def test_output_shapes_pooling_and_class_head(module):
    gene_ids, values = torch.randint(0, 120, (3, 20)), torch.rand(3, 20)
    latents = encode(module, gene_ids, values, torch.ones(3, 20, dtype=torch.bool))
    assert latents.shape == (3, 8, 16)
    assert module.pool(latents, "mean").shape == (3, 16)
    assert module.pool(latents, "flatten").shape == (3, 128)
    with pytest.raises(ValueError, match="unknown pooling"):
        module.pool(latents, "max")
    assert module.class_logits(latents).shape == (3, 3)
    assert module.predict_values(latents, torch.randint(0, 120, (3, 7))).shape == (3, 7)
    no_head = ExceiverModule(ExceiverConfig(n_genes=120, **TINY))
    with pytest.raises(ValueError, match="no class head"):
        no_head.class_logits(latents)


def test_padding_gene_embedding_is_zero_and_untrained(module):
    assert torch.all(module.gene_emb.weight[module.pad_id] == 0)
    gene_ids = torch.full((1, 4), module.pad_id)
    gene_ids[0, 0] = 3
    out = forward(module, gene_ids, torch.ones(1, 4), torch.tensor([[True, False, False, False]]), torch.tensor([[5]]))
    out.sum().backward()
    assert torch.all(module.gene_emb.weight.grad[module.pad_id] == 0)


def test_value_offsets_start_at_the_gene_means():
    gene_means = torch.linspace(1.0, 5.0, 120)
    torch.manual_seed(0)
    with_bias = ExceiverModule(ExceiverConfig(n_genes=120, gene_bias=True, **TINY))
    with_bias.init_value_offsets(gene_means, 2.5)
    torch.testing.assert_close(with_bias.gene_bias[:120].detach(), gene_means)
    assert torch.all(with_bias.gene_bias[120:] == 0)
    plain = ExceiverModule(ExceiverConfig(n_genes=120, **TINY))
    plain.init_value_offsets(gene_means, 2.5)
    assert plain.value_head[-1].bias.item() == pytest.approx(2.5)
    # Predictions start near the offsets: the head's learned part is small at initialisation.
    latents = encode(plain, torch.randint(0, 120, (2, 10)), torch.rand(2, 10), torch.ones(2, 10, dtype=torch.bool))
    assert (plain.predict_values(latents, torch.randint(0, 120, (2, 5))) - 2.5).abs().max() < 2.0


def test_paper_compatible_switch_changes_only_the_documented_computation():
    torch.manual_seed(3)
    config = ExceiverConfig(n_genes=120, n_classes=3, paper_compatible=True, **TINY)
    original = ExceiverModule(config).eval()
    ours = ExceiverModule(ExceiverConfig(n_genes=120, n_classes=3, **TINY))
    extra = set(original.state_dict()) - set(ours.state_dict())
    # LayerNorm on the encoder's tokens and inside both cross-attention feed-forwards.
    assert extra == {"encoder.norm_kv.weight", "encoder.norm_kv.bias", "encoder.ff.4.weight", "encoder.ff.4.bias",
                     "decoder.ff.4.weight", "decoder.ff.4.bias"}
    assert isinstance(original.encoder.ff[3], torch.nn.LayerNorm) and isinstance(ours.encoder.ff[3], torch.nn.Linear)
    assert original.processor[0].post_norm and not ours.processor[0].post_norm
    gene_ids, values = torch.randint(0, 120, (1, 30)), torch.rand(1, 30) + 0.5
    zero = torch.zeros(1, 30, dtype=torch.bool)
    zero[0, 20:] = True  # the last 10 tokens are zero-count genes: +1 logit, not excluded
    mask = torch.ones(1, 30, dtype=torch.bool)
    with torch.no_grad():
        flagged = encode(original, gene_ids, values, mask, zero)
        unflagged = encode(original, gene_ids, values, mask)
        assert (flagged - unflagged).abs().max() > 1e-4
        padded = encode(original, torch.cat([gene_ids, torch.full((1, 7), 120)], 1),
                                 torch.cat([values, torch.randn(1, 7)], 1),
                                 torch.cat([mask, torch.zeros(1, 7, dtype=torch.bool)], 1),
                                 torch.cat([zero, torch.ones(1, 7, dtype=torch.bool)], 1))
    torch.testing.assert_close(flagged, padded, atol=1e-5, rtol=1e-5)
    # Sparse (default) models ignore zero flags: their batches never hold zero-count tokens.
    torch.testing.assert_close(encode(ours, gene_ids, values, mask, zero), encode(ours, gene_ids, values, mask))


@pytest.mark.parametrize("paper_compatible", [False, True])
def test_attention_weights_reproduce_the_attention_output(paper_compatible):
    """Gene-dependency maps read the model's own attention weights: applied to the block's values,
    they give exactly what its fused attention computes (boolean and float masks)."""
    torch.manual_seed(3)
    module = ExceiverModule(ExceiverConfig(n_genes=120, paper_compatible=paper_compatible, **TINY)).eval()
    gene_ids, values = torch.randint(0, 120, (2, 9)), torch.rand(2, 9) + 0.5
    mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    zero = torch.zeros(2, 9, dtype=torch.bool)
    zero[:, 1] = True
    fused = module.encode_tokens(gene_ids, values, mask, zero)
    again, weights = module.encode_tokens(gene_ids, values, mask, zero, need_weights=True)
    torch.testing.assert_close(again, fused, atol=1e-6, rtol=1e-6)
    assert weights.shape == (2, 2, 8, 9)  # cells, heads, latents, tokens
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 8))
    assert (weights[1, ..., 5:] == 0).all()  # no attention on padding
    # The weights times the block's own value projections are its attention output.
    block = module.encoder
    tokens = module.gene_emb(gene_ids) * values.unsqueeze(-1)
    _, v = _split_heads(block.attn.kv(block.norm_kv(tokens)), 2 * block.attn.n_heads).chunk(2, dim=-3)
    from_weights = module.latents + block.attn.out(_merge_heads(weights @ v))
    torch.testing.assert_close(from_weights + block.ff(from_weights), fused, atol=1e-6, rtol=1e-6)
    latents = module.process(fused)
    queries = torch.randint(0, 120, (2, 4))
    decoded, decoder_weights = module.decode(latents, queries, need_weights=True)
    torch.testing.assert_close(decoded, module.decode(latents, queries), atol=1e-6, rtol=1e-6)
    assert decoder_weights.shape == (2, 2, 4, 8)


def test_sparse_tokens_equal_the_dense_formulation_with_a_boolean_mask(module):
    """Every vocabulary gene a token, zero-count genes masked out (the dense formulation), gives
    the latents of the expressed genes alone."""
    adata = synthetic_counts(n_cells=6, n_genes=120)
    cells = align(adata, GeneVocab(adata.var_names))
    scaler = GeneScaler.fit(cells)
    sparse = make_batch(cells, np.arange(6), scaler, TokenizerConfig(max_tokens=1000))
    values = np.full((6, 120), 123.0, dtype=np.float32)  # junk at zero genes: the mask must hide it
    r, c = cells.counts.nonzero()
    values[r, c] = scaler.cell_values(cells)
    dense = encode(module, torch.arange(120).expand(6, -1), torch.from_numpy(values),
                          torch.from_numpy(cells.counts.toarray() > 0))
    assert sparse.gene_ids.shape[1] < 120
    torch.testing.assert_close(module.encode(sparse), dense,
                               atol=1e-5, rtol=1e-5)
