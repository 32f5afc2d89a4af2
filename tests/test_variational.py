"""Batch integration as scVI does it: a bottleneck posterior with a learned variance and its KL
(`bottleneck_variance`, `bottleneck_kl`), the KL's warm-up (`kl_warmup_steps`), the batch in
every count-decoder layer (`batch_injection`), and query mapping that trains only new batches'
rows (`freeze_except_batches`)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from exceiver import Exceiver, pretrain
from exceiver.cli import main
from exceiver.data.preprocess import GeneScaler
from exceiver.data.tokenizer import make_batch
from exceiver.errors import ExceiverInputError
from exceiver.inference import cell_latents
from exceiver.nn.config import ObjectiveConfig, pretraining_configs
from exceiver.nn.network import BATCH_TABLES, INITIAL_LOG_VARIANCE, ExceiverModule
from exceiver.nn.objectives import bottleneck_sample, gaussian_kl, kl_weight_at, pretraining_loss
from exceiver.warm_start import warm_module

from conftest import TINY, synthetic_counts
from test_counts import two_datasets

N_GENES = 120
LEARNED = dict(bottleneck_variance="learned", bottleneck_kl=1.0)
RUN = dict(batch_size=32, progress=False)


def setting(objectives: dict | None = None, **architecture):
    """A tiny count model on two datasets (the second measures 80 of the 120 genes), its masked
    batch and objectives."""
    cells = two_datasets()
    config, tokenizer, chosen = pretraining_configs("default", n_genes=N_GENES, **TINY, bottleneck_dim=4,
                                                    count_hidden=16, **(objectives or {}))
    torch.manual_seed(0)
    module = ExceiverModule(dataclasses.replace(config, **architecture))
    batch = make_batch(cells, np.arange(cells.n_cells), GeneScaler.fit(cells), tokenizer, masked=True, salt=5)
    return module, batch, chosen


def test_the_kl_is_the_closed_form_on_a_hand_example():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    log_variance = torch.tensor([[0.0, math.log(4.0)], [0.0, 0.0]])
    # 0.5 * ((1 + 1 - 1 - 0) + (4 + 4 - 1 - log 4)); the prior itself costs nothing
    torch.testing.assert_close(gaussian_kl(mean, log_variance), torch.tensor([0.5 * (8 - math.log(4.0)), 0.0]))
    torch.testing.assert_close(gaussian_kl(mean), torch.tensor([2.5, 0.0]))  # unit variance: 0.5 * |mean|^2


def test_the_kl_in_the_loss_is_per_cell_over_its_measured_genes_times_the_weight():
    module, batch, objectives = setting(LEARNED, bottleneck_variance="learned")
    mean, log_variance = module.bottleneck_posterior(module.encode(batch))
    expected = (gaussian_kl(mean, log_variance) / batch.measured.sum(-1)).mean()
    weighted = {}
    for weight in (0.0, 0.25):
        torch.manual_seed(1)  # the same posterior sample for both
        weighted[weight] = pretraining_loss(module, batch, objectives, salt=0, kl_weight=weight)
    torch.testing.assert_close(weighted[0.25].parts["bottleneck_kl"], expected)
    torch.testing.assert_close(weighted[0.25].total - weighted[0.0].total, 0.25 * expected)
    assert batch.measured.sum(-1).unique().tolist() == [80, 120]  # the two datasets' measured genes


def test_a_learned_variance_starts_small_and_learns_per_cell_and_dimension():
    module, batch, objectives = setting(LEARNED, bottleneck_variance="learned")
    head = module.bottleneck_log_variance
    assert head is not None and torch.equal(head.bias, torch.full((4,), INITIAL_LOG_VARIANCE))
    start = module.bottleneck_posterior(module.encode(batch))[1].detach()
    optimiser = torch.optim.Adam(module.parameters(), lr=1e-2)
    for step in range(5):
        optimiser.zero_grad()
        pretraining_loss(module, batch, objectives, salt=step).total.backward()
        assert head.weight.grad.abs().sum() > 0  # reached through the sample and the KL
        optimiser.step()
    log_variance = module.bottleneck_posterior(module.encode(batch))[1].detach()
    assert (log_variance - start).abs().min() > 1e-4  # every cell's and dimension's sigma moved
    assert log_variance.std(0).min() > 1e-3 and log_variance.std(1).min() > 1e-3  # across cells, across dims


def test_the_sample_is_reparameterised_and_the_embedding_is_its_mean():
    module, batch, _ = setting(LEARNED, bottleneck_variance="learned")
    latents = module.encode(batch)
    mean, log_variance = module.bottleneck_posterior(latents)
    torch.testing.assert_close(module.pool(latents, "bottleneck"), mean)
    torch.manual_seed(3)
    sample, kl = bottleneck_sample(module, latents)
    torch.manual_seed(3)
    noise = torch.randn_like(mean)
    torch.testing.assert_close(sample, mean + noise * (0.5 * log_variance).exp())
    torch.testing.assert_close(kl, gaussian_kl(mean, log_variance))
    unit, _, _ = setting({"bottleneck_kl": 1.0})
    assert unit.bottleneck_log_variance is None and unit.bottleneck_posterior(unit.encode(batch))[1] is None


def test_the_kl_weight_warms_up_linearly():
    warm = ObjectiveConfig(count_weight=1.0, bottleneck_kl=2.0, kl_warmup_steps=4)
    assert [kl_weight_at(warm, step) for step in (0, 1, 2, 3, 4, 100)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert kl_weight_at(dataclasses.replace(warm, kl_warmup_steps=0), 0) == 2.0
    assert kl_weight_at(ObjectiveConfig(), 7) == 0.0


def test_a_learned_variance_model_trains_logs_its_kl_weight_and_round_trips(tmp_path):
    settings = {**TINY, **LEARNED, "kl_warmup_steps": 3}
    adata = synthetic_counts(n_cells=80)
    model = pretrain(adata, tmp_path / "m", model=settings, max_epochs=2, **RUN)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architecture"]["bottleneck_variance"] == "learned"
    assert config["objectives"]["kl_warmup_steps"] == 3 and config["objectives"]["bottleneck_kl"] == 1.0
    logged = pd.read_csv(tmp_path / "m" / "logs" / "metrics.csv")
    rows = logged.dropna(subset=["kl_weight"])  # every few steps
    assert len(rows) >= 2 and rows["step"].min() < 3
    np.testing.assert_allclose(rows["kl_weight"], np.minimum(rows["step"] / 3, 1.0), rtol=1e-6)
    loaded = Exceiver.load(tmp_path / "m")
    assert loaded.config == model.config and loaded.objectives == model.objectives
    first, second = (loaded.embed(adata, inplace=False, progress=False) for _ in range(2))
    np.testing.assert_array_equal(first, second)  # deterministic: the posterior mean, no sample
    means = np.empty_like(first)
    module = loaded.module
    with torch.inference_mode():
        for batch, latents in cell_latents(loaded, loaded.read(adata), progress=False):
            means[batch.cells.numpy()] = module.bottleneck_posterior(latents)[0].numpy()
    np.testing.assert_array_equal(first, means)


def test_every_layer_injection_shifts_each_decoder_layer_per_batch_and_input_keeps_its_numerics():
    module, batch, _ = setting(n_batches=2, batch_injection="every_layer", count_rank=3)
    assert module.batch_hidden_embedding.weight.shape == (2, 16) and module.batch_rank_embedding.weight.shape == (2, 3)
    cell = module.pool(module.encode(batch), "bottleneck")
    first, second = torch.zeros(len(cell), dtype=torch.long), torch.ones(len(cell), dtype=torch.long)
    torch.testing.assert_close(module.count_logits(cell, first), module.count_logits(cell, second))  # zeros at start
    torch.testing.assert_close(module.count_logits(cell, first), module.count_decoder(cell))
    with torch.no_grad():
        module.batch_rank_embedding.weight[1] = torch.tensor([1.0, -2.0, 0.5])
    shift = module.count_logits(cell, second) - module.count_logits(cell, first)  # the rank code's: linear
    rank_row, output = module.batch_rank_embedding.weight[1], module.count_decoder[-1].weight
    torch.testing.assert_close(shift, (output @ rank_row).expand_as(shift))
    with torch.no_grad():
        module.batch_hidden_embedding.weight[1].normal_()
    decoder, hidden_row = module.count_decoder, module.batch_hidden_embedding.weight[1]
    hidden = decoder[-1](decoder[3](decoder[1:3](decoder[0](cell) + hidden_row)) + rank_row)
    torch.testing.assert_close(module.count_logits(cell, second), hidden)
    assert not torch.allclose(module.count_logits(cell, second) - module.count_logits(cell, first),
                              shift)  # the hidden shift passes the LayerNorm and ReLU: a non-linear effect
    plain, _, _ = setting(n_batches=2)
    assert all(getattr(plain, name) is None for name in BATCH_TABLES[1:])
    with torch.no_grad():
        plain.batch_embedding.weight.normal_()
    assert torch.equal(plain.count_logits(cell, second), plain.count_decoder(cell + plain.batch_embedding.weight[1]))


def _filled(module: ExceiverModule) -> ExceiverModule:
    with torch.no_grad():
        for name in BATCH_TABLES:
            if getattr(module, name) is not None:
                getattr(module, name).weight.normal_()
    return module


def test_a_continued_network_extends_every_batch_table_with_zero_rows():
    base = _filled(setting(n_batches=2, batch_injection="every_layer", count_rank=3)[0])
    grown = warm_module(base, N_GENES, 3)
    for name in BATCH_TABLES:
        rows = getattr(grown, name).weight
        assert torch.equal(rows[:2], getattr(base, name).weight) and torch.equal(rows[2], torch.zeros_like(rows[2]))
    without = setting(batch_injection="every_layer", count_rank=3)[0]
    assert all(getattr(without, name) is None for name in BATCH_TABLES)
    started = warm_module(without, N_GENES, 2)  # a base without batches, continued with a batch key
    assert all(getattr(started, name).weight.abs().max() == 0 for name in BATCH_TABLES)
    before = without.state_dict()
    assert all(torch.equal(before[k], v) for k, v in started.state_dict().items() if k in before)


def _with_batches(n_cells: int, seed: int, names: list[str]):
    adata = synthetic_counts(n_cells=n_cells, seed=seed)
    adata.obs["assay"] = pd.Categorical(np.resize(names, n_cells))
    return adata


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Exceiver:
    out = tmp_path_factory.mktemp("reference") / "model"
    model = {**TINY, **LEARNED, "batch_injection": "every_layer", "count_rank": 4}
    return pretrain(_with_batches(100, 1, ["10x", "smart"]), out, model=model, batch_key="assay", max_epochs=2, **RUN)


def test_the_query_step_trains_only_the_new_batches_rows(reference):
    before = {k: v.clone() for k, v in reference.module.state_dict().items()}
    query = _with_batches(60, 2, ["drop", "smart"])
    mapped = pretrain(query, None, init=reference, batch_key="assay", freeze_except_batches=True, max_epochs=2,
                      learning_rate=1e-2, **RUN)
    assert mapped.batches["categories"] == ["10x", "smart", "drop"] and mapped.metrics["init"]["freeze_except_batches"]
    after = mapped.module.state_dict()
    tables = {f"{name}.weight" for name in BATCH_TABLES}
    assert all(torch.equal(before[k], after[k]) for k in before if k not in tables)  # bit-identical
    for key in tables:
        assert torch.equal(after[key][:2], before[key]) and after[key][2].abs().min() > 0  # only the new row learned
    reference_cells = _with_batches(30, 5, ["10x"])
    np.testing.assert_array_equal(reference.embed(reference_cells, inplace=False, progress=False),
                                  mapped.embed(reference_cells, inplace=False, progress=False))
    # the batch enters only the count decoder: the query's cells embed where the model put them too
    np.testing.assert_array_equal(reference.embed(query, inplace=False, progress=False),
                                  mapped.embed(query, inplace=False, progress=False))
    assert all(p.requires_grad for p in mapped.module.parameters())  # handed back trainable, as any network


def test_the_query_step_from_a_model_without_batches_trains_fresh_tables(tmp_path):
    base = pretrain(synthetic_counts(n_cells=60), None, model=TINY, max_epochs=1, **RUN)
    mapped = pretrain(_with_batches(60, 2, ["drop", "smart"]), None, init=base, batch_key="assay",
                      freeze_except_batches=True, max_epochs=1, learning_rate=1e-2, **RUN)
    before, after = base.module.state_dict(), mapped.module.state_dict()
    assert set(after) - set(before) == {"batch_embedding.weight"}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (after["batch_embedding.weight"].abs().sum(-1) > 0).all()  # every row is new, every row learned


def test_a_continued_run_takes_the_integration_settings_with_fresh_heads():
    """`init` with the integration settings: the pretrained network gains a log-variance head and
    batch tables that start fresh, every pretrained weight is carried, and the run trains with the
    new objective (a shipped model continued with scVI's objective)."""
    base = pretrain(synthetic_counts(n_cells=60), None, model=TINY, max_epochs=1, **RUN)
    config = dataclasses.replace(base.config, bottleneck_variance="learned", batch_injection="every_layer")
    grown = warm_module(base.module, base.config.n_genes, 2, config=config)
    before, after = base.module.state_dict(), grown.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.all(grown.bottleneck_log_variance.bias == INITIAL_LOG_VARIANCE)
    assert grown.batch_embedding.weight.abs().max() == 0 and grown.batch_hidden_embedding.weight.abs().max() == 0
    settings = {**LEARNED, "kl_warmup_steps": 5, "batch_injection": "every_layer"}
    continued = pretrain(_with_batches(60, 2, ["drop", "smart"]), None, init=base, model=settings, batch_key="assay",
                         max_epochs=2, **RUN)
    assert (continued.config.bottleneck_variance, continued.config.batch_injection) == ("learned", "every_layer")
    assert (continued.objectives.bottleneck_kl, continued.objectives.kl_warmup_steps) == (1.0, 5)
    assert continued.metrics["init"]["settings"] == settings  # metrics.json says what the run changed
    assert continued.config.n_latents == base.config.n_latents and continued.tokenizer == base.tokenizer
    assert not torch.equal(continued.module.bottleneck_log_variance.bias, grown.bottleneck_log_variance.bias)  # it learned
    assert continued.embed(synthetic_counts(n_cells=20), inplace=False, progress=False).shape == (20, 16)


def test_bad_settings_are_refused_in_one_line(reference, tmp_path, capsys):
    adata = _with_batches(40, 3, ["drop"])
    refused = [
        (dict(freeze_except_batches=True, batch_key="assay", model=TINY), "needs init and batch_key"),
        (dict(freeze_except_batches=True, init=reference), "needs init and batch_key"),
        (dict(freeze_except_batches=True, init=reference, batch_key="assay", extend_genes=True),
         "excludes own_genes=True and extend_genes=True"),
        (dict(model={**TINY, "batch_injection": "every_layer"}), "on batches: give batch_key"),
        (dict(model={**TINY, "batch_injection": "each"}), "batch_injection must be one of ('input', 'every_layer')"),
        (dict(model={**TINY, "bottleneck_variance": "fixed"}), "must be one of ('unit', 'learned')"),
        (dict(model={**TINY, "bottleneck_variance": "learned"}), "'learned' needs bottleneck_kl > 0"),
        (dict(model={**TINY, "kl_warmup_steps": 10}), "kl_warmup_steps needs bottleneck_kl > 0"),
        (dict(model={**TINY, "bottleneck_kl": 1.0, "kl_warmup_steps": -1}), "kl_warmup_steps must be >= 0"),
        (dict(model={**TINY, "bottleneck_variance": "learned", "bottleneck_kl": 1.0, "count_weight": 0.0}),
         "needs the cell bottleneck"),
        (dict(init=reference, model={"n_latents": 4}), "drop the model settings ['n_latents'] (a continued run may "
                                                        "set only bottleneck_variance, bottleneck_kl"),
        (dict(init=reference, model={"bottleneck_kl": 0.0}), "'learned' needs bottleneck_kl > 0"),
        (dict(init=reference, model={"batch_injection": "input"}), "a new batch_injection conditions the count "
                                                                   "decoder on the data's batches: give batch_key"),
        (dict(init=reference, batch_key="assay", freeze_except_batches=True, model={"bottleneck_kl": 2.0}),
         "freeze_except_batches=True keeps the model as it is: drop the model settings"),
    ]
    for options, message in refused:
        with pytest.raises(ExceiverInputError) as caught:
            pretrain(adata, None, **options, **RUN)
        assert message in str(caught.value) and "\n" not in str(caught.value), (options, caught.value)
    known = _with_batches(40, 3, ["smart"])
    with pytest.raises(ExceiverInputError, match="every assay of the data is one of the model's: nothing would learn"):
        pretrain(known, None, init=reference, batch_key="assay", freeze_except_batches=True, **RUN)
    path = tmp_path / "d.h5ad"
    adata.write_h5ad(path)
    assert main(["-q", "pretrain", str(path), "--out", str(tmp_path / "m"), "--freeze-except-batches"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--freeze-except-batches is scArches' query step on a pretrained model: it needs " \
                                    "--init and --batch-key" in err, err
    assert not (tmp_path / "m").exists()


def test_model_folders_written_before_these_options_still_load(tmp_path):
    adata = synthetic_counts(n_cells=60)
    model = pretrain(adata, tmp_path / "m", model=TINY, max_epochs=1, **RUN)
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    new_fields = {"architecture": ("batch_injection", "bottleneck_variance"), "objectives": ("kl_warmup_steps",)}
    for part, names in new_fields.items():
        for name in names:
            del config[part][name]
    path.write_text(json.dumps(config))
    loaded = Exceiver.load(tmp_path / "m")
    assert loaded.config == model.config and loaded.objectives == model.objectives
    assert (loaded.config.batch_injection, loaded.config.bottleneck_variance, loaded.objectives.kl_warmup_steps) == (
        "input", "unit", 0)
    np.testing.assert_array_equal(loaded.embed(adata, inplace=False, progress=False),
                                  model.embed(adata, inplace=False, progress=False))


def test_the_command_line_sets_each_option():
    from exceiver.cli import build_parser
    from exceiver.commands.training import pretrain_settings

    args = build_parser().parse_args(
        ["pretrain", "q.h5ad", "--out", "m", "--init", "ref", "--batch-key", "assay", "--freeze-except-batches",
         "--set", "bottleneck_variance=learned", "--set", "bottleneck_kl=1", "--set", "kl_warmup_steps=400",
         "--set", "batch_injection=every_layer"])
    settings = pretrain_settings(args)
    assert settings["freeze_except_batches"] is True and settings["batch_key"] == "assay"
    assert settings["model"] == {"bottleneck_variance": "learned", "bottleneck_kl": 1.0, "kl_warmup_steps": 400,
                                 "batch_injection": "every_layer"}
    assert pretrain_settings(build_parser().parse_args(["pretrain", "q.h5ad", "--out", "m"]))[
        "freeze_except_batches"] is False
