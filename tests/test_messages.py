"""Input that a long job cannot use is refused before the work, in one line, in the words of the
interface (command line or Python), and leaves nothing behind: hardware options, empty datasets,
data that is not counts, counts in adata.raw, labels; warnings go through logging."""

from __future__ import annotations

import logging
import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from exceiver import Exceiver, ExceiverInputError, TrainingConfig, finetune, pretrain
from exceiver.cli import main
from exceiver.data.counts import NON_INTEGER_LIMIT
from exceiver.devices import inference_device, training_accelerator
from exceiver.errors import option, plain, speaking
from exceiver.progress import progress_bar

from conftest import TINY, synthetic_counts

COMMANDS = ["embed", "predict", "impute", "perturb", "evaluate", "pretrain", "finetune", "build-corpus"]


def _refused(capsys, command: str, argv: list, message: str) -> str:
    """Run the CLI; it must exit 2 with one line `exceiver COMMAND: error: ...` holding `message`."""
    assert main(["-q", command, *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"exceiver {command}: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "np." not in err, err  # no numpy reprs
    return err


def _argv(command: str, model, classifier, data, out) -> list:
    """The arguments of each command reading DATA, writing under `out`."""
    return {
        "embed": [model, data, "--out", out / "embedded.h5ad"],
        "predict": [classifier, data, "--out", out / "predicted.h5ad"],
        "impute": [model, data, "--out", out / "imputed.h5ad"],
        "perturb": [model, data, "--gene", "G0003", "--out", out / "effects.csv"],
        "evaluate": [model, data, "--out", out / "report", "--label-key", "cell_type"],
        "pretrain": [data, "--out", out / "model", "--max-epochs", "1"],
        "finetune": [model, data, "--label-key", "cell_type", "--out", out / "classifier", "--max-epochs", "1"],
        "build-corpus": [data, "--out", out / "corpus"],
    }[command]


@pytest.fixture(scope="module")
def classifier_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("classifier") / "clf"
    finetune(tiny_model_dir, synthetic_counts(), "cell_type", out, max_epochs=1, batch_size=32, progress=False)
    return out


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Datasets no command can use: without cells, without genes, log-normalised."""
    folder = tmp_path_factory.mktemp("bad")
    counts = synthetic_counts(n_cells=30, seed=21)
    counts[:0].copy().write_h5ad(folder / "nocells.h5ad")
    counts[:, :0].copy().write_h5ad(folder / "nogenes.h5ad")
    lognorm = counts.copy()
    lognorm.X = sp.csr_matrix(np.log1p(lognorm.X.toarray()), dtype=np.float32)
    lognorm.write_h5ad(folder / "lognorm.h5ad")
    return folder


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


# -- hardware options ---------------------------------------------------------------------------

@pytest.mark.parametrize("device, message", [
    ("cuda", "--device cuda is not available: this machine has only a CPU"),
    ("tpu7", "--device tpu7 is not a device: use one of auto, cpu, cuda, cuda:N, mps; this machine has only a CPU"),
])
def test_cli_refuses_a_device_this_machine_lacks_before_reading_data(cpu_only, tiny_model_dir, tmp_path, capsys,
                                                                     device, message):
    missing = tmp_path / "not-read.h5ad"  # the device is refused first: the missing file is never looked at
    for command in ("embed", "impute", "evaluate"):
        _refused(capsys, command, [tiny_model_dir, missing, "--out", tmp_path / "out", "--device", device], message)
    assert list(tmp_path.iterdir()) == []


def test_a_gpu_index_beyond_the_machines_gpus_is_refused(two_gpus, tiny_model_dir, tmp_path, capsys):
    _refused(capsys, "embed", [tiny_model_dir, tmp_path / "x.h5ad", "--out", tmp_path / "o.h5ad", "--device", "cuda:3"],
             "--device cuda:3 is not available: this machine has a CPU and 2 CUDA GPUs (cuda:0, cuda:1)")
    with pytest.raises(ExceiverInputError, match=r"devices=4 asks for more GPUs than there are: .* 2 CUDA GPUs"):
        TrainingConfig(accelerator="gpu", devices=4)


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
@pytest.mark.parametrize("flags, message", [
    (["--accelerator", "gpu"], "--accelerator gpu is not available: this machine has only a CPU; use --accelerator "
                               "cpu or --accelerator auto"),
    (["--precision", "7-bit"], "--precision 7-bit is not a Lightning precision: use one of "),
    (["--accelerator", "abacus"], "--accelerator abacus is not a Lightning accelerator: use one of auto, cpu, gpu"),
])
def test_training_hardware_is_checked_before_the_data(cpu_only, tiny_model_dir, tmp_path, capsys, command, flags,
                                                      message):
    argv = _argv(command, tiny_model_dir, None, tmp_path / "not-read.h5ad", tmp_path)
    err = _refused(capsys, command, argv + flags, message)
    if "precision" in message:
        assert "bf16-mixed" in err and "32-true" in err
    assert list(tmp_path.iterdir()) == []


def test_python_calls_check_devices_in_python_words(cpu_only, tiny_model_dir):
    model = Exceiver.load(tiny_model_dir)
    with pytest.raises(ExceiverInputError, match="^device='cuda' is not available: this machine has only a CPU$"):
        model.embed(synthetic_counts(n_cells=5), device="cuda", progress=False)
    with pytest.raises(ExceiverInputError, match="^precision='7-bit' is not a Lightning precision"):
        pretrain(synthetic_counts(n_cells=5), None, precision="7-bit")
    with pytest.raises(ExceiverInputError, match="^accelerator='gpu' is not available"):
        TrainingConfig(accelerator="gpu")
    assert TrainingConfig(precision="bf16-mixed", accelerator="cpu", devices=2).precision == "bf16-mixed"


def _machine(monkeypatch, n_cuda: int, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n_cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("n_cuda, mps, chosen", [(2, True, "cuda"), (1, False, "cuda"), (0, True, "mps"),
                                                 (0, False, "cpu")])
def test_auto_is_a_cuda_gpu_then_an_apple_gpu_then_the_cpu(monkeypatch, n_cuda, mps, chosen):
    _machine(monkeypatch, n_cuda, mps)
    assert inference_device("auto") == inference_device(None) == torch.device(chosen)
    assert training_accelerator("auto") == chosen
    assert training_accelerator("cpu") == "cpu"
    if chosen != "cpu":
        assert training_accelerator("gpu") == chosen


def test_an_apple_gpu_runs_inference_and_training_as_one_device(monkeypatch, tiny_model_dir, tmp_path, capsys):
    _machine(monkeypatch, 0, True)
    assert inference_device("mps") == torch.device("mps")
    assert TrainingConfig(accelerator="mps").accelerator == "mps" and TrainingConfig(accelerator="gpu", devices=1)
    for accelerator in ("auto", "gpu", "mps"):
        with pytest.raises(ExceiverInputError, match=r"^devices=2 asks for more GPUs than there are: this machine has "
                                                     r"a CPU and an Apple GPU \(mps\)$"):
            TrainingConfig(accelerator=accelerator, devices=2)
    assert TrainingConfig(accelerator="cpu", devices=2).devices == 2  # CPU processes
    _refused(capsys, "embed", [tiny_model_dir, tmp_path / "x.h5ad", "--out", tmp_path / "o.h5ad", "--device", "cuda"],
             "--device cuda is not available: this machine has a CPU and an Apple GPU (mps)")


# -- datasets every command refuses ------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case, message", [
    ("nocells", "nocells is empty (0 cells x 200 genes): there is nothing to read"),
    ("nogenes", "nogenes is empty (30 cells x 0 genes): there is nothing to read"),
    ("lognorm", "lognorm: 100% of the nonzero values in X are not integers: exceiver needs raw counts, and the "
                "dataset has no layer or raw to read them from; pass --allow-non-integer if you know what you do"),
])
def test_every_command_refuses_the_same_unusable_dataset_the_same_way(tiny_model_dir, classifier_dir, bad_files,
                                                                      tmp_path, capsys, command, case, message):
    _refused(capsys, command, _argv(command, tiny_model_dir, classifier_dir, bad_files / f"{case}.h5ad", tmp_path),
             message)
    assert list(tmp_path.iterdir()) == []


def test_python_refuses_empty_data_and_non_counts_in_python_words(tiny_model_dir):
    model = Exceiver.load(tiny_model_dir)
    with pytest.raises(ExceiverInputError, match=r"^dataset is empty \(0 cells x 200 genes\)"):
        model.embed(synthetic_counts(n_cells=5)[:0].copy(), progress=False)
    lognorm = synthetic_counts(n_cells=20)
    lognorm.layers["counts"] = lognorm.X.copy()
    lognorm.X = sp.csr_matrix(np.log1p(lognorm.X.toarray()), dtype=np.float32)
    with pytest.raises(ExceiverInputError, match=r"^adata0: 100% of the nonzero values in X are not integers: exceiver "
                                                 r"needs raw counts; pass layer='counts' if it holds them, or "
                                                 r"allow_non_integer=True if you know what you do$"):
        pretrain(lognorm, None, model=TINY, max_epochs=1, progress=False)
    expected = model.embed(lognorm, layer="counts", inplace=False, progress=False)
    accepted = model.embed(lognorm, allow_non_integer=True, inplace=False, progress=False)
    assert accepted.shape == expected.shape and not np.allclose(accepted, expected)


def test_a_few_fractional_counts_pass_with_a_note_and_many_need_the_option(tiny_model_dir, tmp_path, caplog, capsys):
    adata = synthetic_counts(n_cells=30, seed=22)
    nonzero = adata.X.nnz
    fraction = 0.05
    adata.X.data[: int(fraction * nonzero)] += 0.5  # 5%: below the limit
    assert fraction < NON_INTEGER_LIMIT
    with caplog.at_level(logging.WARNING):
        Exceiver.load(tiny_model_dir).embed(adata, progress=False, name="noisy")
    assert "noisy: 4.99% of the nonzero values in X are not integers; they are used as counts" in caplog.text
    adata.X.data[: int(0.2 * nonzero)] += 0.25  # 20%: above it
    adata.write_h5ad(tmp_path / "fractional.h5ad")
    out = tmp_path / "out.h5ad"
    _refused(capsys, "embed", [tiny_model_dir, tmp_path / "fractional.h5ad", "--out", out],
             "fractional: 20% of the nonzero values in X are not integers")
    assert main(["-q", "embed", str(tiny_model_dir), str(tmp_path / "fractional.h5ad"), "--out", str(out),
                 "--allow-non-integer"]) == 0
    assert ad.read_h5ad(out).obsm["X_exceiver"].shape == (30, 16)


# -- counts in adata.raw -----------------------------------------------------------------------

def test_counts_are_read_from_adata_raw_in_memory_on_disk_and_for_training(tiny_model_dir, tmp_path, capsys):
    model = Exceiver.load(tiny_model_dir)
    counts = synthetic_counts(n_cells=20, seed=23)
    expected = model.embed(counts.copy(), progress=False)
    adata = counts.copy()
    adata.raw = adata
    adata = adata[:, :150].copy()  # X: log-normalised, fewer genes; raw: every gene's counts
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()), dtype=np.float32)
    np.testing.assert_allclose(model.embed(adata, layer="raw", inplace=False, progress=False), expected, atol=1e-6)
    path, out = tmp_path / "raw.h5ad", tmp_path / "embedded.h5ad"
    adata.write_h5ad(path)
    assert main(["-q", "embed", str(tiny_model_dir), str(path), "--out", str(out), "--layer", "raw"]) == 0
    np.testing.assert_allclose(ad.read_h5ad(out).obsm["X_exceiver"], expected, atol=1e-6)
    backed = ad.read_h5ad(path, backed="r")
    np.testing.assert_allclose(model.embed(backed, layer="raw", inplace=False, progress=False), expected, atol=1e-6)
    trained = pretrain(adata, None, layer="raw", n_top_genes=0, model=TINY, max_epochs=1, progress=False)
    assert len(trained.vocab) == 200 and trained.layer == "raw"  # raw.var's genes, not var's 150

    with pytest.raises(ExceiverInputError, match=r"^dataset has no raw counts: layer='raw' reads adata.raw, which "
                                                 r"this dataset does not have \(nor any layer\)$"):
        model.embed(counts, layer="raw", progress=False)
    counts.write_h5ad(tmp_path / "plain.h5ad")
    _refused(capsys, "impute", [tiny_model_dir, tmp_path / "plain.h5ad", "--out", tmp_path / "i.h5ad", "--layer", "raw"],
             "plain has no raw counts: --layer raw reads adata.raw, which this dataset does not have (nor any layer)")


# -- one mechanism names options per interface ----------------------------------------------------

def test_options_are_named_as_the_interface_spells_them():
    assert option("gene_key", "gene_symbol") == "gene_key='gene_symbol'"
    assert option("allow_non_integer", True) == "allow_non_integer=True"
    assert option("batch_size") == "batch_size"
    with speaking("cli"):
        assert option("gene_key", np.str_("gene_symbol")) == "--gene-key gene_symbol"
        assert option("allow_non_integer", True) == "--allow-non-integer"
        assert option("key_added", "my key") == "--key 'my key'"
        assert option("batch_size") == "--batch-size"
    assert option("layer", "counts") == "layer='counts'"  # the block ended
    assert plain({np.str_("B"): np.int64(1), "genes": np.array(["CD3E"])}) == {"B": 1, "genes": ["CD3E"]}


def test_gene_key_hints_speak_python_or_cli_without_numpy_reprs(tiny_model_dir, tmp_path, capsys):
    adata = synthetic_counts(n_cells=10, seed=24)
    adata.var["gene_symbol"] = adata.var_names.to_numpy()
    adata.var_names = [f"ENSG{i:05d}" for i in range(adata.n_vars)]
    with pytest.raises(ExceiverInputError) as refused:
        Exceiver.load(tiny_model_dir).embed(adata, progress=False)
    message = str(refused.value)
    assert "(e.g. dataset ['ENSG00000', 'ENSG00001', 'ENSG00002'] vs vocabulary ['G0000'" in message
    assert message.endswith("var['gene_symbol'] matches 200 vocabulary genes: pass gene_key='gene_symbol'.")
    adata.write_h5ad(tmp_path / "ensembl.h5ad")
    _refused(capsys, "embed", [tiny_model_dir, tmp_path / "ensembl.h5ad", "--out", tmp_path / "o.h5ad"],
             "var['gene_symbol'] matches 200 vocabulary genes: pass --gene-key gene_symbol.")
    _refused(capsys, "embed", [tiny_model_dir, tmp_path / "ensembl.h5ad", "--out", tmp_path / "o.h5ad",
                               "--gene-key", "symbol"],
             "--gene-key symbol names no column of var; var has columns ['gene_symbol'] (or use --gene-key var_names)")


# -- labels: one check, one policy ----------------------------------------------------------------

def test_label_checks_name_small_classes_alike_in_finetune_and_evaluate(tiny_model_dir, tmp_path, capsys):
    adata = synthetic_counts(n_cells=30, seed=25)
    adata.obs["cell_type"] = ["rare"] + ["common"] * 14 + ["other"] * 15
    adata.write_h5ad(tmp_path / "rare.h5ad")
    _refused(capsys, "evaluate", [tiny_model_dir, tmp_path / "rare.h5ad", "--out", tmp_path / "report",
                                  "--label-key", "cell_type"],
             "rare: 1 class of 'cell_type' has fewer than 2 cells (rare: 1); remove or merge them")
    _refused(capsys, "finetune", [tiny_model_dir, tmp_path / "rare.h5ad", "--out", tmp_path / "clf",
                                  "--label-key", "cell_type"],
             "rare: 1 class of 'cell_type' has fewer than 3 cells (rare: 1); remove or merge them")
    _refused(capsys, "evaluate", [tiny_model_dir, tmp_path / "rare.h5ad", "--out", tmp_path / "report",
                                  "--label-key", "tissue"],
             "rare: obs has no column 'tissue'; its columns: ['cell_type']")
    assert [p.name for p in tmp_path.iterdir()] == ["rare.h5ad"]


def test_finetuning_leaves_unlabelled_cells_out_and_says_how_many(tiny_model_dir, caplog):
    adata = synthetic_counts(seed=26)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object).where(np.arange(adata.n_obs) >= 3)
    with caplog.at_level(logging.WARNING):
        model = finetune(tiny_model_dir, adata, "cell_type", max_epochs=1, batch_size=32, progress=False)
    assert "adata0: 3 of 120 cells have no 'cell_type' label and are left out" in caplog.text
    metrics = model.metrics
    assert metrics["n_unlabelled_cells"] == 3 and metrics["n_train_cells"] + metrics["n_val_cells"] == 117


@pytest.mark.slow
def test_evaluation_leaves_unlabelled_cells_out_and_says_how_many(tiny_model_dir, tmp_path, caplog):
    from exceiver.evaluate import evaluate

    adata = synthetic_counts(n_cells=40, seed=27)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object).where(np.arange(adata.n_obs) >= 4)
    with caplog.at_level(logging.WARNING):
        metrics = evaluate(Exceiver.load(tiny_model_dir), adata, tmp_path / "report", label_keys=["cell_type"], progress=False)
    assert "adata0: 4 of 40 cells have no 'cell_type' label and are left out" in caplog.text
    assert metrics["cells"]["cell_type"]["n_cells"] == 36 and metrics["cells"]["cell_type"]["n_unlabelled_cells"] == 4


# -- warnings ------------------------------------------------------------------------------------

def test_warnings_raised_under_a_progress_bar_are_logged_not_printed(caplog):
    with warnings.catch_warnings(record=True) as printed, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        with progress_bar(total=1, disable=True):
            warnings.warn("the variance is close to zero", UserWarning)
    assert not printed
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("exceiver.warnings", "the variance is close to zero")]
