"""Importing the original release's checkpoints: outputs equal the original code's reference outputs.

The fixtures in ../shared/reference hold 8 cells (as a normalised CSR matrix with the original
scaler) and the outputs the original code computed from them, in float32 and float64. Our import
runs here in float64 (and in float32, against the looser float32 tolerances of the reference)."""

from __future__ import annotations

import argparse
import logging

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from exceiver import Exceiver, ModelFileError, import_original
from exceiver.cli import main
from exceiver.nn.original import imported_scaler, read_checkpoint
from exceiver.data.tokenizer import TokenizerConfig, make_batch

TOL = 2e-4  # the bound; what we reach in float64 is far tighter:
TOL_INFERENCE = 1e-5  # from raw counts through our preprocessing (float32 token values)
TOL_TENSORS = 1e-10  # from the original's own input tensors
# The fixture's matrix is normalised to 1e4 per cell, not integer counts: calls accept that explicitly.
ACCEPT = dict(allow_non_integer=True)
FIXTURES = {
    "pretrained": ("pretrained_TS_exceiver.ckpt", "fixture_pretrained.npz"),
    "classifier": ("pretrained_TS_exceiver_classifier.ckpt", "fixture_classifier.npz"),
}


@pytest.fixture(scope="module")
def reference(shared_dir):
    return shared_dir / "reference"


def load(reference, kind: str) -> tuple[Exceiver, dict, ad.AnnData]:
    ckpt, npz = FIXTURES[kind]
    z = dict(np.load(reference / npz, allow_pickle=False))
    model = import_original(reference / ckpt)
    model.scaler = imported_scaler(z["scaler_mean"], z["scaler_scale"])
    counts = sp.csr_matrix((z["csr_data"], z["csr_indices"], z["csr_indptr"]), shape=tuple(z["csr_shape"]))
    adata = ad.AnnData(counts)  # already normalised to 1e4 per cell: our normalisation keeps it
    adata.var_names = list(model.vocab.genes)
    return model, z, adata


@pytest.mark.parametrize("kind", FIXTURES)
def test_masked_batches_reproduce_the_original(reference, kind):
    model, z, _ = load(reference, kind)
    module = model.module.double()
    t = {k: torch.from_numpy(v) for k, v in z.items()}
    # The original's masked input, which paper-compatible batches reproduce: a masked gene is the
    # padding id with value 1 and no attention bias.
    pad = z["gene_ids"] == 19067
    assert pad.sum(1).tolist() == [335] * 8
    assert (z["gene_vals"][pad] == 1).all() and (z["key_padding_mask"][pad] == 0).all()
    with torch.no_grad():
        enc = module.encode_tokens(t["gene_ids"], t["gene_vals"].double(), torch.ones_like(t["gene_ids"], dtype=torch.bool),
                                   t["key_padding_mask"].bool())
        proc = module.process(enc)
        y_hat = module.predict_values(proc, t["mask_ids"])
        np.testing.assert_allclose(enc.numpy(), z["latent_enc_f64"], rtol=0, atol=TOL_TENSORS)
        np.testing.assert_allclose(proc.numpy(), z["latent_proc_f64"], rtol=0, atol=TOL_TENSORS)
        np.testing.assert_allclose(y_hat.numpy(), z["y_hat_f64"][..., 0], rtol=0, atol=TOL_TENSORS)
        if kind == "classifier":
            np.testing.assert_allclose(module.class_logits(proc).numpy(), z["class_logits_f64"], rtol=0,
                                       atol=TOL_TENSORS)
        # The float mask is what the original computed: a boolean one gives its other outputs.
        bool_enc = module.encode_tokens(t["gene_ids"], t["gene_vals"].double(), t["key_padding_mask"] == 0)
        np.testing.assert_allclose(bool_enc.numpy(), z["latent_enc_if_bool_mask"], rtol=0, atol=TOL)
        assert np.abs(bool_enc.numpy() - z["latent_enc_f64"]).max() > 100 * TOL


@pytest.mark.parametrize("kind", FIXTURES)
def test_our_preprocessing_and_model_reproduce_the_original_inference(reference, kind):
    model, z, adata = load(reference, kind)
    model.module.double()
    cells = model.cells(adata, **ACCEPT)
    batch = make_batch(cells, np.arange(8), model.scaler, TokenizerConfig(max_tokens=model.tokenizer.max_tokens, all_genes=True))
    assert batch.gene_ids.shape == (8, 19067) and batch.token_mask.all()
    assert (~batch.token_zero).sum().item() == len(z["csr_data"])  # expressed genes are the non-zero ones
    np.testing.assert_allclose(batch.values.numpy(), z["inf_gene_vals"], rtol=0, atol=1e-5)
    with torch.no_grad():
        enc = model.module.encode_tokens(batch.gene_ids, batch.values, batch.token_mask, batch.token_zero)
    np.testing.assert_allclose(enc.numpy(), z["inf_latent_enc_f64"], rtol=0, atol=TOL_INFERENCE)

    latents = model.embed(adata, pooling="flatten", progress=False, **ACCEPT)
    y_hat = model.predict_values(adata, progress=False, **ACCEPT)
    logits = model.predict_logits(adata, progress=False, **ACCEPT) if kind == "classifier" else None
    np.testing.assert_allclose(latents, z["inf_latent_proc_f64"].reshape(8, -1), rtol=0, atol=TOL_INFERENCE)
    np.testing.assert_allclose(y_hat, z["inf_y_hat_f64"][..., 0], rtol=0, atol=TOL_INFERENCE)
    if kind == "classifier":
        np.testing.assert_allclose(logits, z["inf_class_logits_f64"], rtol=0, atol=TOL_INFERENCE)
        proba = model.predict_proba(adata, progress=False, **ACCEPT)
        np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)
        assert (proba.argmax(1) == z["inf_class_logits_f64"].argmax(1)).all()


def test_float32_import_is_within_the_references_float32_tolerance(reference):
    model, z, adata = load(reference, "classifier")
    latents = model.embed(adata, pooling="flatten", progress=False, **ACCEPT)
    y_hat = model.predict_values(adata, model.vocab.genes[:2000], progress=False, **ACCEPT)
    np.testing.assert_allclose(latents, z["inf_latent_proc_f64"].reshape(8, -1), rtol=0, atol=TOL)
    np.testing.assert_allclose(y_hat, z["inf_y_hat_f64"][:, :2000, 0], rtol=0, atol=1e-3)


def test_cli_import_writes_a_model_folder_that_loads_and_computes_the_same(reference, tmp_path, caplog):
    z = np.load(reference / "fixture_classifier.npz")
    np.savez(tmp_path / "scaler.npz", mean=z["scaler_mean"], scale=z["scaler_scale"])
    out = tmp_path / "imported"
    with caplog.at_level(logging.WARNING):
        assert main(["-q", "import-original", str(reference / FIXTURES["classifier"][0]), "--out", str(out),
                     "--scaler", str(tmp_path / "scaler.npz")]) == 0
    assert "gene order is not recoverable" in caplog.text
    loaded = Exceiver.load(out)
    assert loaded.config.paper_compatible and loaded.config.n_classes == 24 and len(loaded.classes) == 24
    assert loaded.vocab.genes[0] == "gene_00000"
    direct, _, adata = load(reference, "classifier")
    np.testing.assert_array_equal(loaded.predict_logits(adata, progress=False, **ACCEPT),
                                  direct.predict_logits(adata, progress=False, **ACCEPT))
    np.testing.assert_allclose(loaded.scaler.mean, z["scaler_mean"].astype(np.float32))


def test_gene_list_names_the_genes_and_must_match_the_checkpoint(reference, tmp_path):
    genes = [f"GENE{i}" for i in range(19067)]
    (tmp_path / "genes.txt").write_text("\n".join(genes) + "\n")
    model = import_original(reference / FIXTURES["pretrained"][0], genes=tmp_path / "genes.txt")
    assert list(model.vocab.genes[:2]) == ["GENE0", "GENE1"] and model.classes is None
    (tmp_path / "short.txt").write_text("\n".join(genes[:100]) + "\n")
    with pytest.raises(ModelFileError, match="100 genes, the checkpoint 19,067"):
        import_original(reference / FIXTURES["pretrained"][0], genes=tmp_path / "short.txt")
    np.savez(tmp_path / "bad_scaler.npz", mean=np.zeros(5), scale=np.ones(5))
    with pytest.raises(ModelFileError, match="'mean' has shape"):
        import_original(reference / FIXTURES["pretrained"][0], scaler=tmp_path / "bad_scaler.npz")
    np.savez(tmp_path / "no_scale.npz", mean=np.zeros(19067))
    with pytest.raises(ModelFileError, match="lacks the array"):
        import_original(reference / FIXTURES["pretrained"][0], scaler=tmp_path / "no_scale.npz")


def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset:offset + 64] = bytes(b ^ 0xFF for b in out[offset:offset + 64])
    return bytes(out)


def test_corrupt_truncated_and_foreign_checkpoints_are_refused(reference, tmp_path, capsys):
    good = (reference / FIXTURES["pretrained"][0]).read_bytes()
    checkpoint = torch.load(reference / FIXTURES["pretrained"][0], map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"]["args"] = argparse.Namespace(data="x")  # an object outside the allow-list
    torch.save(checkpoint, tmp_path / "foreign.ckpt")
    (tmp_path / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    (tmp_path / "corrupt.ckpt").write_bytes(_flip(good, len(good) // 2))  # inside a tensor's bytes
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    cases = {"foreign": "holds a pickled argparse.Namespace", "truncated": "not a PyTorch checkpoint",
             "corrupt": "fails its checksum", "text": "not a PyTorch checkpoint"}
    for name, message in cases.items():
        with pytest.raises(ModelFileError, match=message):
            read_checkpoint(tmp_path / f"{name}.ckpt")
        out = tmp_path / f"out_{name}"
        assert main(["-q", "import-original", str(tmp_path / f"{name}.ckpt"), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ModelFileError, match="not an original Exceiver checkpoint"):
        read_checkpoint(tmp_path / "other.ckpt")
