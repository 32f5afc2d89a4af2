"""Embedding throughput (cells/s) on synthetic cells with Tabula Sapiens statistics (19,067-gene
vocabulary, ~2,000 expressed genes per cell), for the `paper` and `default` presets, beside a dense
formulation of the original (every vocabulary gene a token, a key padding mask,
`nn.MultiheadAttention` and post-norm `nn.TransformerEncoder`) timed in the same run.

With `--model NAME_OR_FOLDER`: a trained model's `embed` end to end (AnnData in, `obsm` out: reading,
translation, tokens, network) on the real pbmc3k file, beside scVI's `get_latent_representation`
(scvi-tools' defaults on the file's 2,000 HVGs; the [bench] extra) on the same cells, same threads,
same run; the best of `--repeats` timings each. scVI is trained for a few seconds only: the speed of
its encoder does not depend on its weights.

    python benchmarks/embed_throughput.py [--cells 2048] [--dense-cells 128] [--batch-sizes 16 64] [--threads N]
    EXCEIVER_SHARED=../shared python benchmarks/embed_throughput.py --model human-mouse-base --threads 2
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from common import TARGETS, add_threads_option, benchmark_parser, quiet, scvi_baseline, shared_folder, threads
from exceiver import Exceiver
from exceiver.data.cells import CellCounts
from exceiver.data.preprocess import GeneScaler
from exceiver.data.tokenizer import TokenizerConfig, make_batch
from exceiver.inference import iterate_latents
from exceiver.nn.config import ExceiverConfig, pretraining_configs
from exceiver.nn.network import ExceiverModule

N_GENES = 19_067


def tabula_sapiens_like(n_cells: int, mean_expressed: int = 2000, seed: int = 0) -> CellCounts:
    """Cells whose genes are detected with power-law popularity and counts drawn from a
    gamma-Poisson (negative binomial): most non-zero counts are 1-3 with a long tail."""
    rng = np.random.default_rng(seed)
    popularity = rng.pareto(1.2, N_GENES) + 1.0
    popularity /= popularity.sum()
    n_expressed = np.clip(rng.lognormal(np.log(mean_expressed), 0.35, n_cells), 200, 8000).astype(int)
    indptr = np.concatenate([[0], np.cumsum(n_expressed)])
    indices = np.concatenate([np.sort(rng.choice(N_GENES, n, replace=False, p=popularity)) for n in n_expressed])
    mean = 1.0 + 2e4 * popularity[indices]
    data = 1.0 + rng.poisson(rng.gamma(0.8, mean / 0.8)).astype(np.float32)
    counts = sp.csr_matrix((data, indices.astype(np.int32), indptr), shape=(n_cells, N_GENES))
    return CellCounts(counts, np.ones((1, N_GENES), bool), np.zeros(n_cells, np.int32),
                      np.array([f"cell{i}" for i in range(n_cells)]), ["synthetic"])


class DenseOriginal(nn.Module):
    """The original's encoder and processor: all genes are tokens, zeros hidden by a mask."""

    def __init__(self, c: ExceiverConfig):
        super().__init__()
        self.gene_emb = nn.Embedding(c.n_genes + 1, c.gene_dim, padding_idx=c.n_genes)
        self.latents = nn.Parameter(torch.randn(c.n_latents, c.latent_dim))
        self.norm_kv, self.norm_q = nn.LayerNorm(c.gene_dim), nn.LayerNorm(c.latent_dim)
        self.cross = nn.MultiheadAttention(c.latent_dim, c.cross_heads, kdim=c.gene_dim, vdim=c.gene_dim, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(c.latent_dim), nn.Linear(c.latent_dim, c.latent_dim), nn.GELU(),
                                 nn.LayerNorm(c.latent_dim), nn.Linear(c.latent_dim, c.latent_dim))
        layer = nn.TransformerEncoderLayer(c.latent_dim, c.n_heads, c.ff_dim, 0.0, activation="gelu", batch_first=True)
        self.processor = nn.TransformerEncoder(layer, c.n_layers, enable_nested_tensor=False)

    def forward(self, values: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        gene_ids = torch.arange(values.shape[1]).expand(values.shape[0], -1)
        kv = self.norm_kv(self.gene_emb(gene_ids) * values.unsqueeze(-1))
        q = self.norm_q(self.latents).expand(values.shape[0], -1, -1)
        latents = self.cross(q, kv, kv, key_padding_mask=zero, need_weights=False)[0] + self.latents
        return self.processor(self.mlp(latents) + latents)


@torch.inference_mode()
def dense_cells_per_s(cells: CellCounts, scaler: GeneScaler, config: ExceiverConfig, batch_size: int) -> float:
    model = DenseOriginal(config).eval()
    zero_values = scaler.zero_values(np.arange(N_GENES))
    start = time.perf_counter()
    for first in range(0, cells.n_cells, batch_size):
        rows = np.arange(first, min(first + batch_size, cells.n_cells))
        part = cells.subset(rows)
        # Every vocabulary gene is a token: zero genes carry the value of a zero count.
        values = np.tile(zero_values, (len(rows), 1))
        r, c = part.counts.nonzero()
        values[r, c] = scaler.cell_values(part)
        model(torch.from_numpy(values), torch.from_numpy(part.counts.toarray() == 0))
    return cells.n_cells / (time.perf_counter() - start)


def sparse_cells_per_s(cells: CellCounts, scaler: GeneScaler, config: ExceiverConfig, tokenizer: TokenizerConfig,
                       batch_size: int) -> float:
    module = ExceiverModule(config).eval()
    start = time.perf_counter()
    for _ in iterate_latents(module, cells, scaler, tokenizer, batch_size=batch_size, device=torch.device("cpu"),
                             progress=False):
        pass
    return cells.n_cells / (time.perf_counter() - start)


def processor_cells_per_s(config, batch_size: int, *, train: bool, steps: int = 8) -> float:
    """cells/s of the processor alone (forward, and backward if `train`) on random latents: these
    self-attention blocks do the same work in the dense and the sparse formulations, so
    (dense cells/s) / (this) bounds what removing zero-gene tokens can gain (Amdahl)."""
    module = ExceiverModule(config).train(train)
    latents = torch.randn(batch_size, config.n_latents, config.latent_dim, requires_grad=train)

    def step():
        with torch.set_grad_enabled(train):
            out = module.process(latents)
            if train:
                out.pow(2).mean().backward()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


@torch.inference_mode()
def max_difference_from_dense(cells: CellCounts, scaler: GeneScaler, config: ExceiverConfig,
                              tokenizer: TokenizerConfig) -> float:
    """The sparse encoder's latents vs the same module fed every vocabulary gene as a token with
    a boolean mask over the expressed ones: the semantics match, so the outputs must too."""
    module = ExceiverModule(config).eval()
    sparse = make_batch(cells, np.arange(cells.n_cells), scaler, tokenizer)
    values = np.zeros((cells.n_cells, N_GENES), dtype=np.float32)
    r, c = cells.counts.nonzero()
    values[r, c] = scaler.cell_values(cells)
    gene_ids = torch.arange(N_GENES).expand(cells.n_cells, -1)
    dense = module.process(module.encode_tokens(gene_ids, torch.from_numpy(values),
                                                torch.from_numpy(cells.counts.toarray() > 0)))
    return float((module.encode(sparse) - dense).abs().max())


def best_seconds(run, repeats: int) -> float:
    """The fastest of `repeats` timed calls, after one untimed call (warm-up)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def real_cells_comparison(model_name: str, repeats: int) -> None:
    """A trained model's `embed` on pbmc3k beside scVI's latent on the same cells."""
    quiet()
    adata = TARGETS["pbmc3k"].read(shared_folder() / "data")
    model = Exceiver.load(model_name)
    expressed = model.read(adata).cells.n_genes_expressed
    print(f"{adata.n_obs:,} cells of pbmc3k ({adata.n_vars:,} genes), {model_name}: median "
          f"{int(np.median(expressed))} expressed model genes per cell, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    ours = best_seconds(lambda: model.embed(adata, inplace=False, progress=False), repeats)
    scvi_model, _ = scvi_baseline(adata, minutes=0.05)
    theirs = best_seconds(lambda: scvi_model.get_latent_representation(), repeats)
    print(f"{'scVI get_latent_representation':<34} {adata.n_obs / theirs:10,.0f} cells/s   1.00x")
    print(f"{'exceiver embed (AnnData to obsm)':<34} {adata.n_obs / ours:10,.0f} cells/s {theirs / ours:6.2f}x")


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--cells", type=int, default=2048)
    parser.add_argument("--dense-cells", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--model", help="a trained model's name or folder: time its embed on pbmc3k beside scVI")
    parser.add_argument("--repeats", type=int, default=3)
    add_threads_option(parser)
    args = parser.parse_args()
    threads(args.threads)
    if args.model:
        real_cells_comparison(args.model, args.repeats)
        return
    torch.manual_seed(0)
    cells = tabula_sapiens_like(args.cells)
    scaler = GeneScaler.fit(cells)
    print(f"{cells.n_cells} synthetic cells, {N_GENES:,} genes, median {int(np.median(cells.n_genes_expressed))} "
          f"expressed genes per cell, torch {torch.__version__}, {torch.get_num_threads()} threads")
    paper, paper_tokenizer, _ = pretraining_configs("paper", n_genes=N_GENES)
    for batch_size in args.batch_sizes:
        dense = dense_cells_per_s(cells.subset(np.arange(args.dense_cells)), scaler, paper, batch_size)
        print(f"batch {batch_size:>4}  {'dense original formulation, paper':<38} {dense:8.1f} cells/s   1.0x")
        for preset in ("paper", "default"):
            config, tokenizer, _ = pretraining_configs(preset, n_genes=N_GENES)
            rate = sparse_cells_per_s(cells, scaler, config, tokenizer, batch_size)
            print(f"batch {batch_size:>4}  {'exceiver sparse tokens, ' + preset:<38} {rate:8.1f} cells/s {rate / dense:6.1f}x")
        processor = processor_cells_per_s(paper, batch_size, train=False)
        print(f"batch {batch_size:>4}  {'processor alone, paper (in both)':<38} {processor:8.1f} cells/s "
              f"{processor / dense:6.1f}x = the most sparsity can gain at this preset")
    equal = max_difference_from_dense(cells.subset(np.arange(16)), scaler, paper, paper_tokenizer)
    print(f"sparse vs dense (every gene a token, boolean mask), same weights: max |latent difference| {equal:.1e}")


if __name__ == "__main__":
    main()
