import anndata as ad
import numpy as np
import pytest

from exceiver.cli import main

from conftest import synthetic_counts


@pytest.mark.parametrize("command", ["pretrain", "embed", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: exceiver " + command in capsys.readouterr().out


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
    assert main(["-q", "embed", str(tiny_model_dir), str(counts), "--out", str(out), "--pooling", "cell"]) == 2
    assert "pooling 'cell' needs a model pretrained with a cell query" in capsys.readouterr().err
    assert not out.exists()


def test_pretrain_set_overrides_model_fields_and_refuses_bad_ones(counts_file, tmp_path, capsys):
    import json

    out = tmp_path / "model"
    assert main(["-q", "pretrain", str(counts_file), "--out", str(out), "--max-epochs", "1", "--batch-size", "32",
                 "--set", "n_latents=8", "--set", "latent_dim=16", "--set", "zero_query_ratio=0.5",
                 "--set", "value_encoding=rank", "--set", "depth_tokens=true"]) == 0
    config = json.loads((out / "config.json").read_text())["model"]
    assert (config["n_latents"], config["latent_dim"], config["zero_query_ratio"]) == (8, 16, 0.5)
    assert config["value_encoding"] == "rank" and config["depth_tokens"] is True
    with pytest.raises(SystemExit):
        main(["pretrain", str(counts_file), "--out", str(tmp_path / "x"), "--set", "n_latents=many"])
    assert "n_latents needs a int" in capsys.readouterr().err
    assert main(["-q", "pretrain", str(counts_file), "--out", str(tmp_path / "y"), "--set", "zero_query_ratio=0"]) == 2
    assert "needs zero_query_ratio" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert main(["-q", "pretrain", str(counts_file), "--out", str(tmp_path / "z"), "--set", "value_encoding=log"]) == 2
    assert "value_encoding must be one of" in capsys.readouterr().err


def test_training_options_reach_the_training_config():
    from exceiver.cli import TRAINING_OPTIONS, build_parser

    args = build_parser().parse_args(["pretrain", "x.h5ad", "--out", "m", "--num-nodes", "2", "--devices", "4",
                                      "--strategy", "ddp", "--precision", "bf16-mixed"])
    training = {name: getattr(args, name) for name in TRAINING_OPTIONS if getattr(args, name) is not None}
    assert training == {"num_nodes": 2, "devices": 4, "strategy": "ddp", "precision": "bf16-mixed"}
    import exceiver
    assert exceiver.TrainingConfig(**training).num_nodes == 2
