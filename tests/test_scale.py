"""Scaling up: distributed training matches one process, masks do not depend on global RNG."""

import json
import math
import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file

from exceiver.data.loaders import CellBatcher, training_loader
from exceiver.nn.config import pretraining_configs
from exceiver.data.preprocess import GeneScaler
from exceiver.data.cells import CellCounts


def equal_length_cells(n_cells: int = 80, n_genes: int = 60, n_expressed: int = 20, seed: int = 0) -> ad.AnnData:
    """Every cell expresses the same number of genes, so every process of a distributed run masks
    as many genes as its share of a one-process batch (the loss is a mean per process)."""
    rng = np.random.default_rng(seed)
    indices = np.concatenate([np.sort(rng.choice(n_genes, n_expressed, replace=False)) for _ in range(n_cells)])
    counts = rng.integers(1, 30, n_cells * n_expressed).astype(np.float32)
    indptr = np.arange(0, n_cells * n_expressed + 1, n_expressed)
    return ad.AnnData(sp.csr_matrix((counts, indices, indptr), shape=(n_cells, n_genes)),
                      obs=pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]),
                      var=pd.DataFrame(index=[f"G{j}" for j in range(n_genes)]))


def test_training_masks_depend_only_on_seed_epoch_and_batch():
    adata = equal_length_cells(n_cells=40)
    cells = CellCounts(adata.X, np.ones((1, adata.n_vars), bool), np.zeros(40, np.int32),
                       np.asarray(adata.obs_names), ["cells"])
    _, tokenizer, _ = pretraining_configs("default")
    scaler = GeneScaler.fit(cells)
    batcher = CellBatcher(cells, scaler, tokenizer, masked=True)

    def epoch(seed: int, number: int, global_seed: int, skip: int = 0) -> list[torch.Tensor]:
        torch.manual_seed(global_seed)
        loader = training_loader(cells, np.arange(40), batcher, batch_size=8, seed=seed, consumed=lambda: 0)
        loader.batch_sampler.set_epoch(number)
        loader.load_state_dict({"epoch": number, "batches": skip})
        return [batch.query_ids for batch in loader]

    first = epoch(5, 0, global_seed=1)
    assert len(first) == 5
    assert all(torch.equal(a, b) for a, b in zip(first, epoch(5, 0, global_seed=2)))  # not the global RNG
    assert not torch.equal(first[0], first[1])  # each batch draws fresh masks
    assert not torch.equal(first[0], epoch(5, 1, global_seed=1)[0])  # each epoch too
    assert not torch.equal(first[0], epoch(6, 0, global_seed=1)[0])  # and each seed
    resumed = epoch(5, 0, global_seed=3, skip=2)  # a run resumed after 2 batches sees the rest as they were
    assert len(resumed) == 3 and all(torch.equal(a, b) for a, b in zip(first[2:], resumed))


def _pretrain_cli(data, out, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "exceiver.cli", "-q", "pretrain", str(data), "--out", str(out),
               "--max-epochs", "2", "--seed", "1", "--accelerator", "cpu", *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_two_process_cpu_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    """2 gloo processes with 8 cells each per step vs 1 process with 16: the same global batches,
    the same masks and contrastive views, the contrastive term's negatives gathered from both
    processes, averaged gradients: every objective of the default preset computes what one process
    would, and the weights agree up to float32 summation order (measured 1.9e-4; with each
    process's own cells as negatives they differed by 0.07)."""
    data = tmp_path / "cells.h5ad"
    equal_length_cells(n_cells=77).write_h5ad(data)  # 72 training cells under the seeded split
    one = _pretrain_cli(data, tmp_path / "one", "--devices", "1", "--batch-size", "16")
    two = _pretrain_cli(data, tmp_path / "two", "--devices", "2", "--strategy", "ddp", "--batch-size", "8")
    assert one["steps"] == two["steps"] == 10  # 72 training cells in 5 global batches, 2 epochs
    assert two["val_masked_mse"] == pytest.approx(one["val_masked_mse"], rel=1e-4)
    single, distributed = (load_file(tmp_path / run / "model.safetensors") for run in ("one", "two"))
    assert single.keys() == distributed.keys()
    for name, weight in single.items():
        torch.testing.assert_close(distributed[name], weight, rtol=0, atol=1e-3, msg=name)


# On-disk corpora and streams ------------------------------------------------------------------

from exceiver import Exceiver, pretrain  # noqa: E402
from exceiver.cli import main  # noqa: E402
from exceiver.data.corpus import CorpusCells, build_corpus, fit_scaler  # noqa: E402
from exceiver.data.datamodule import validation_cells  # noqa: E402
from exceiver.errors import ExceiverInputError  # noqa: E402
from exceiver.data import streams  # noqa: E402
from exceiver.data.streams import ShuffledBatches  # noqa: E402
from exceiver.data.cells import align  # noqa: E402
from exceiver.data.vocab import GeneVocab  # noqa: E402

from conftest import TINY, synthetic_counts  # noqa: E402


def _without_counts(counts: sp.csr_matrix, row: int) -> sp.csr_matrix:
    keep = np.ones(counts.shape[0])
    keep[row] = 0
    return sp.csr_matrix(sp.diags(keep) @ counts)


@pytest.fixture
def two_files(tmp_path):
    first = synthetic_counts(n_cells=300, seed=1)
    second = synthetic_counts(n_cells=200, n_genes=150, seed=2)
    second.X = _without_counts(second.X, 5)  # an empty cell: dropped when building, and counted
    paths = [tmp_path / "first.h5ad", tmp_path / "second.h5ad"]
    first.write_h5ad(paths[0])
    second.write_h5ad(paths[1])
    return paths, [first, second]


def test_corpus_holds_each_file_aligned_once_in_shards_of_one_file(two_files, tmp_path):
    paths, adatas = two_files
    corpus = build_corpus(paths, tmp_path / "corpus", shard_cells=128, progress=False)
    vocab = corpus.vocab
    assert vocab == GeneVocab([f"G{j:04d}" for j in range(200)])
    assert corpus.n_cells == 499 and [d["n_dropped"] for d in corpus.meta["datasets"]] == [0, 1]
    assert [(s["dataset"], s["n_cells"]) for s in corpus.shards] == [(0, 128), (0, 128), (0, 44), (1, 128), (1, 71)]
    expected = CellCounts.concat([align(adatas[0], vocab, name="first"), align(adatas[1], vocab, name="second")])
    expected = expected.subset(np.flatnonzero(expected.n_genes_expressed > 0))
    cells = corpus.read(100, 499)  # across shards and files
    assert (cells.counts != expected.counts[100:499]).nnz == 0
    np.testing.assert_array_equal(cells.source, expected.source[100:499])
    np.testing.assert_array_equal(cells.measured, expected.measured)


def test_corpus_refuses_what_it_cannot_read(two_files, tmp_path):
    with pytest.raises(ExceiverInputError, match="not a corpus folder"):
        CorpusCells(tmp_path)
    corpus = build_corpus(two_files[0], tmp_path / "corpus", progress=False)
    shard = tmp_path / "corpus" / "shards" / f"{corpus.shards[0]['name']}.counts.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(ExceiverInputError, match="truncated"):
        CorpusCells(tmp_path / "corpus")
    with pytest.raises(ExceiverInputError, match="layer='counts': .* has no such layer"):
        build_corpus(two_files[0], tmp_path / "other", layer="counts", progress=False)
    assert not (tmp_path / "other").exists()


def _epoch(stream: ShuffledBatches, epoch: int, rank: int, world: int, workers: int = 0) -> list[np.ndarray]:
    """One pass as process `rank` of a `world`-process run sees it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(streams, "rank_and_world_size", lambda: (rank, world))
        announced = len(stream)  # what Lightning reads before the pass, to plan the schedule
        assert announced == math.ceil(math.ceil(stream.n_cells / world) / stream.batch_size)
        stream.start_epoch(epoch)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        batches = [b.cells.numpy() for b in loader]
    assert len(batches) == announced
    return batches


def test_training_stream_sees_every_cell_once_with_disjoint_shares(two_files, tmp_path):
    corpus = build_corpus(two_files[0], tmp_path / "corpus", shard_cells=128, progress=False)
    validation = validation_cells(corpus.n_cells, 0.1, 0)
    scaler = fit_scaler(corpus, validation, progress=False)
    _, tokenizer, _ = pretraining_configs("default")
    training = ~validation
    stream = ShuffledBatches(corpus, scaler, tokenizer, blocks=corpus.blocks(64), batch_size=16, seed=3,
                             buffer_cells=64, keep=lambda rows: training[rows])
    single = _epoch(stream, 0, 0, 1)
    assert sorted(np.concatenate(single).tolist()) == np.flatnonzero(training).tolist()
    assert all(len(b) == 16 for b in single[:-1])
    shares = [_epoch(stream, 0, rank, 3, workers=2 if rank == 0 else 0) for rank in range(3)]
    assert len({len(s) for s in shares}) == 1  # equal steps
    seen = np.concatenate([np.concatenate(s) for s in shares])
    assert set(seen.tolist()) == set(np.flatnonzero(training).tolist())
    assert len(seen) - training.sum() == (-training.sum()) % 3  # a few cells twice, to even out
    assert [b.tolist() for b in _epoch(stream, 0, 0, 1)] == [b.tolist() for b in single]  # seeded
    assert [b.tolist() for b in _epoch(stream, 1, 0, 1)] != [b.tolist() for b in single]  # reshuffled
    lengths = corpus.read(0, corpus.n_cells).n_genes_expressed
    fill = np.mean([lengths[b].mean() / lengths[b].max() for b in single])
    assert fill > np.mean([lengths[b].mean() / lengths[b].max() for b in np.array_split(np.concatenate(single), len(single))])


@pytest.mark.slow
def test_pretraining_streams_a_corpus_from_the_command_line(two_files, tmp_path, capsys):
    paths, _ = two_files
    corpus = tmp_path / "corpus"
    assert main(["-q", "build-corpus", *map(str, paths), "--out", str(corpus), "--shard-cells", "100"]) == 0
    assert "499 cells, 200 genes, 5 shard(s)" in capsys.readouterr().out
    model = pretrain(corpus, tmp_path / "model", model=TINY, max_epochs=2, batch_size=32, num_workers=2,
                     progress=False)
    n_val = int(validation_cells(499, 0.1, 0).sum())
    assert model.metrics["n_cells"] == 499 and model.metrics["n_val_cells"] == n_val
    assert model.metrics["steps"] == 2 * -(-(499 - n_val) // 32)
    assert np.isfinite(model.metrics["val_masked_mse"]) and model.metrics["datasets"] == {"first": 300, "second": 199}
    with pytest.raises(ExceiverInputError, match="corpus folder"):
        pretrain(corpus, None, genes=["G0001"], progress=False)


def test_backed_embedding_streams_and_equals_in_memory(tiny_model_dir, counts_file, tmp_path):
    model = Exceiver.load(tiny_model_dir)
    in_memory = model.embed(ad.read_h5ad(counts_file), progress=False)
    backed = ad.read_h5ad(counts_file, backed="r")
    np.testing.assert_allclose(model.embed(backed, progress=False, batch_size=7), in_memory, rtol=1e-5, atol=1e-6)
    out = tmp_path / "embedded.h5ad"
    model.embed_file(counts_file, out, pooling="flatten", key_added="X_flat", num_workers=2, progress=False)
    written = ad.read_h5ad(out)
    flat = model.embed(ad.read_h5ad(counts_file), pooling="flatten", progress=False)
    np.testing.assert_allclose(written.obsm["X_flat"], flat, rtol=1e-5, atol=1e-6)
    assert written.uns["exceiver"]["X_flat"]["pooling"] == "flatten" and "cell_type" in written.obs
    assert (written.X != ad.read_h5ad(counts_file).X).nnz == 0  # the input travels unchanged


def test_streamed_embedding_refuses_empty_cells_and_leaves_no_output(tiny_model_dir, tmp_path):
    adata = synthetic_counts(n_cells=20)
    adata.X = _without_counts(adata.X, 3)
    path, out = tmp_path / "cells.h5ad", tmp_path / "out.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(ExceiverInputError, match="1 of 20 cells have no counts"):
        Exceiver.load(tiny_model_dir).embed_file(path, out, progress=False)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad"]
