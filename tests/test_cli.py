import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import exceiver
from exceiver.cli import main
from exceiver.version import __version__

from conftest import synthetic_counts


COMMANDS = ["pretrain", "embed", "build-corpus", "finetune", "predict", "annotate", "impute", "perturb", "evaluate", "demo",
            "import-original"]


def test_every_command_has_help(capsys):
    """Every subcommand the parser knows (read from the parser, so a new one cannot be missed)."""
    from exceiver.cli import build_parser

    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert sorted(subcommands) == sorted(COMMANDS)
    for command in subcommands:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert "usage: exceiver " + command in capsys.readouterr().out


# What `exceiver --help` must not load: each costs seconds, and all of them together 6-9 s.
HEAVY_MODULES = ("torch", "lightning", "anndata", "scanpy", "numpy", "scipy", "pandas", "sklearn", "matplotlib",
                 "h5py")

STARTUP = """
import sys
from exceiver.cli import build_parser, main

for argv in (["--help"], ["--version"], ["pretrain", "--help"], ["evaluate", "--help"], ["evaluate"],
             ["pretrain", "x.h5ad", "--out", "m", "--set", "no_such_field=1"]):
    try:
        main(argv)
    except SystemExit:
        pass
build_parser().parse_args(["pretrain", "x.h5ad", "--out", "m", "--set", "n_layers=3", "--set", "values=log"])
print(" ".join(m for m in {heavy} if m in sys.modules))
"""


def test_help_version_and_argument_errors_load_no_heavy_module():
    """The command line starts at once: torch, Lightning, scanpy and friends load inside the
    command that needs them, never for help, --version, --set checks or an argument error
    (checked by what is imported in a fresh interpreter, not by a clock)."""
    src = str(Path(exceiver.__file__).parents[1])
    code = STARTUP.format(heavy=HEAVY_MODULES)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": src})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: exceiver" in out.stdout and f"exceiver {__version__}" in out.stdout
    assert "no_such_field=1" in out.stderr  # the --set error was reached
    assert out.stdout.splitlines()[-1] == "", f"loaded for --help: {out.stdout.splitlines()[-1]}"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"exceiver {__version__}\n"


def test_pretrain_then_embed_from_the_command_line(counts_file, tmp_path, capsys):
    model_dir = tmp_path / "model"
    code = main(["-q", "pretrain", str(counts_file), "--out", str(model_dir), "--max-epochs", "1",
                 "--batch-size", "32", "--seed", "3"])
    assert code == 0 and (model_dir / "model.safetensors").is_file()
    out = tmp_path / "embedded.h5ad"
    assert main(["-q", "embed", str(model_dir), str(counts_file), "--out", str(out), "--key", "X_test"]) == 0
    embedded = ad.read_h5ad(out)
    assert embedded.obsm["X_test"].shape[0] == 120
    assert np.isfinite(embedded.obsm["X_test"]).all()
    assert "cell_type" in embedded.obs  # the input's annotations travel with the output
    assert "wrote" in capsys.readouterr().out


def test_cli_errors_are_clear_and_leave_no_output(tiny_model_dir, tmp_path, capsys):
    other = tmp_path / "ensembl.h5ad"
    synthetic_counts(n_cells=10, prefix="ENSG").write_h5ad(other)
    out = tmp_path / "out.h5ad"
    assert main(["-q", "embed", str(tiny_model_dir), str(other), "--out", str(out)]) == 2
    assert "none of its 200 genes is in the model's vocabulary" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [other]
    assert main(["-q", "embed", str(tmp_path / "no-model"), str(other), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    counts = tmp_path / "counts.h5ad"
    synthetic_counts(n_cells=10).write_h5ad(counts)
    with pytest.raises(SystemExit):  # the retired cell-query pooling
        main(["-q", "embed", str(tiny_model_dir), str(counts), "--out", str(out), "--pooling", "cell"])
    assert "invalid choice: 'cell'" in capsys.readouterr().err
    assert not out.exists()


def test_pretrain_set_overrides_model_fields_and_refuses_bad_ones(counts_file, tmp_path, capsys):
    import json

    out = tmp_path / "model"
    assert main(["-q", "pretrain", str(counts_file), "--out", str(out), "--max-epochs", "1", "--batch-size", "32",
                 "--set", "n_latents=8", "--set", "latent_dim=16", "--set", "zero_query_ratio=0.5",
                 "--set", "detection_weight=1", "--set", "gene_bias=false", "--n-top-genes", "50"]) == 0
    config = json.loads((out / "config.json").read_text())
    architecture, tokenizer, objectives = config["architecture"], config["tokenizer"], config["objectives"]
    assert (architecture["n_latents"], architecture["latent_dim"], tokenizer["zero_query_ratio"]) == (8, 16, 0.5)
    assert objectives["contrastive_weight"] == 0 and not architecture["projection_head"]
    assert architecture["gene_bias"] is False and architecture["detection_head"]
    assert len((out / "genes.txt").read_text().split()) == 50  # --n-top-genes
    with pytest.raises(SystemExit):
        main(["pretrain", str(counts_file), "--out", str(tmp_path / "x"), "--set", "n_latents=many"])
    assert "'n_latents=many': n_latents needs an integer" in capsys.readouterr().err
    assert main(["-q", "pretrain", str(counts_file), "--out", str(tmp_path / "y"), "--set", "detection_weight=1"]) == 2
    assert "needs zero_query_ratio" in capsys.readouterr().err and not (tmp_path / "y").exists()
    for retired in ("value_encoding=rank", "depth_tokens=true", "cell_query=true", "detection_head=false",
                    "paper_compatible=true"):  # retired, derived, or import-original's alone
        with pytest.raises(SystemExit):
            main(["pretrain", str(counts_file), "--out", str(tmp_path / "z"), "--set", retired])
        assert "expected FIELD=VALUE with FIELD one of" in capsys.readouterr().err


def test_training_options_reach_the_training_config():
    from exceiver.cli import build_parser, training_options
    from exceiver.train.config import training_config

    args = build_parser().parse_args(["pretrain", "x.h5ad", "--out", "m", "--num-nodes", "2", "--devices", "4",
                                      "--strategy", "ddp", "--precision", "bf16-mixed"])
    training = training_options(args)
    assert training == {"num_nodes": 2, "devices": 4, "strategy": "ddp", "precision": "bf16-mixed"}
    assert training_config(training).num_nodes == 2
    finetuning = build_parser().parse_args(["finetune", "m", "x.h5ad", "--label-key", "c", "--out", "f",
                                            "--max-epochs", "3", "--learning-rate", "0.01"])
    assert training_options(finetuning) == {"max_epochs": 3, "learning_rate": 0.01}


def test_perturb_reports_the_query_genes_with_the_minimum_shift_given(tiny_model_dir, counts_file, tmp_path):
    """--query-gene and --min-shift reach exceiver.tl.perturb: the CSV is its table for them."""
    import pandas as pd

    from exceiver.tl import perturb

    tables = {}
    for min_shift in ("0", "1000"):
        out = tmp_path / f"effects-{min_shift}.csv"
        assert main(["-q", "perturb", str(tiny_model_dir), str(counts_file), "--gene", "G0003", "--query-gene", "G0001",
                     "--query-gene", "G0010", "--min-shift", min_shift, "--out", str(out)]) == 0
        tables[min_shift] = pd.read_csv(out)
    assert sorted(tables["0"]["gene"]) == ["G0001", "G0010"]
    assert (tables["0"]["fraction_affected"] > 0).all() and (tables["1000"]["fraction_affected"] == 0).all()
    python = perturb(exceiver.Exceiver.load(tiny_model_dir), ad.read_h5ad(counts_file), ["G0003"],
                     query_genes=["G0001", "G0010"], min_shift=0.0, progress=False)
    pd.testing.assert_frame_equal(tables["0"], python, check_dtype=False, check_categorical=False)
