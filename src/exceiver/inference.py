"""Batched inference over cells: latents for each batch, with bounded memory and a progress bar;
what the decoders read from them (values of query genes, expected normalised expression); and
`CellModel`, what the tools of `exceiver.tl` and `exceiver.evaluate` need of a model (the public
`exceiver.Exceiver` is one), so that they depend on this module, not on the public class."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

import anndata as ad
import numpy as np
import pandas as pd
import torch
from typing_extensions import Unpack

from exceiver.data.cells import CellCounts
from exceiver.data.contract import ModelCells, ReadingOptions
from exceiver.data.vocab import GeneVocab
from exceiver.devices import inference_device
from exceiver.errors import ExceiverInputError, option
from exceiver.data.loaders import CellBatcher, cell_loader
from exceiver.data.preprocess import GeneScaler
from exceiver.data.sources import H5adCells
from exceiver.data.streams import EpochLoader, OrderedBatches
from exceiver.data.tokenizer import CellBatch, TokenizerConfig
from exceiver.nn.network import POOLINGS, ExceiverModule
from exceiver.progress import progress_bar


class CellModel(Protocol):
    """A trained network with its vocabulary, scaler and tokenizer, and its way of reading data."""

    module: ExceiverModule
    vocab: GeneVocab
    scaler: GeneScaler
    tokenizer: TokenizerConfig
    batches: dict | None  # {"key", "categories"} of a model trained with batches

    def read(self, adata: ad.AnnData, *, empty: str = "refuse", **options: Unpack[ReadingOptions]) -> ModelCells:
        """`adata` read through the model's data contract (`exceiver.data.contract`)."""

QUERY_CHUNK = 4096  # decoder queries per call when predicting many genes (bounds memory)


def decode_values(module: ExceiverModule, latents: torch.Tensor, query_ids: torch.Tensor) -> torch.Tensor:
    """Predicted values [B, Q] of the same query genes [Q] in every cell, decoded in chunks of genes."""
    return torch.cat([module.predict_values(latents, query_ids[start:start + QUERY_CHUNK].expand(len(latents), -1))
                      for start in range(0, len(query_ids), QUERY_CHUNK)], 1)


def decode_expression(module: ExceiverModule, latents: torch.Tensor, query_ids: torch.Tensor,
                      measured_ids: torch.Tensor, batches: torch.Tensor | None = None,
                      target_sum: float = 1e4) -> torch.Tensor:
    """The count decoder's expected normalised expression [B, Q] of the query genes [Q]: each
    gene's share of the cell's library x `target_sum` (scVI's `get_normalized_expression`).

    Shares are a softmax over `measured_ids` [M], the genes the cell's dataset measured, as the
    count objective trains them (`objectives.count_nll`): a query gene outside them gets its
    logit's share relative to the same normaliser. `batches` [K] (a model with batches): the cell
    is decoded in each of these batches and the expression averaged over them.

    Parameters
    ----------
    module
        A network with a count decoder (`config.count_head`).
    latents
        Processed latents [B, n_latents, latent_dim] of B cells.
    query_ids, measured_ids
        Vocabulary ids of the genes to return and of the genes the shares are taken over.
    batches
        Batch codes of the model to condition on (None: no batch embedding, for a model without).
    target_sum
        Counts per cell that the shares are scaled to (the scaler's `target_sum`).

    Returns
    -------
    Expected counts per `target_sum` [B, Q], float32, >= 0.
    """
    cell = module.pool(latents, "bottleneck")
    conditions = [None] if batches is None else [code.expand(len(cell)) for code in batches]
    expression = torch.zeros(len(cell), len(query_ids), device=cell.device)
    for condition in conditions:
        logits = module.count_logits(cell, condition).float()
        log_share = logits[:, query_ids] - torch.logsumexp(logits[:, measured_ids], dim=-1, keepdim=True)
        expression += log_share.exp()
    return expression * (target_sum / len(conditions))


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype of sums accumulated over many batches: float64, except on Apple GPUs (MPS), which
    have none (float32 there)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def default_batch_size(device: torch.device) -> int:
    """On CPU, small batches keep the latents' activations in cache: batch 16 embedded 2.4x faster
    than 64 (`paper`) and 1.2x faster (`default`) in benchmarks/embed_throughput.py; GPUs want
    large batches."""
    return 16 if device.type == "cpu" else 256


def iterate_batches(
    cells: CellCounts | H5adCells,
    scaler: GeneScaler,
    tokenizer: TokenizerConfig,
    *,
    batch_size: int | None = None,
    device: torch.device,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "cells",
    prepare: Callable[[CellCounts], CellCounts] | None = None,
    masked: bool = False,
    salt: int = 0,
) -> Iterator[CellBatch]:
    """Yield whole cells (or, `masked`, cells with the pretraining task's masks drawn with `salt`)
    as batches on `device`, with a progress bar.

    Cells in memory are visited longest first, so that batches hold cells of similar length
    (little padding) and peak memory is reached at once rather than at the end. Cells on disk (a
    cell source such as `H5adCells`) are read chunk by chunk in the loader's workers, longest
    first within a chunk, each chunk passed through `prepare` (checks; it must keep every row).
    """
    batch_size = batch_size or default_batch_size(device)
    if isinstance(cells, CellCounts):
        batcher = CellBatcher(cells, scaler, tokenizer, masked=masked, salt=salt)
        loader = cell_loader(cells, np.arange(cells.n_cells), batcher, batch_size=batch_size,
                             num_workers=num_workers, distributed=False)
    else:
        stream = OrderedBatches(cells, scaler, tokenizer, batch_size=batch_size, masked=masked, salt=salt,
                                prepare=prepare, distributed=False)
        loader = EpochLoader(stream, num_workers=num_workers)
    with progress_bar(total=cells.n_cells, unit="cell", desc=desc, disable=not progress) as bar:
        for batch in loader:
            yield batch.to(device, non_blocking=True)
            bar.update(len(batch))


@torch.inference_mode()
def iterate_latents(module: ExceiverModule, cells: CellCounts | H5adCells, scaler: GeneScaler,
                    tokenizer: TokenizerConfig, **options) -> Iterator[tuple[CellBatch, torch.Tensor]]:
    """Yield (batch on device, processed latents) for all cells (options: `iterate_batches`)."""
    module.eval()
    for batch in iterate_batches(cells, scaler, tokenizer, **options):
        yield batch, module.encode(batch)


def check_model(model: object) -> CellModel:
    """`model` if it is a trained model; a folder or a name is refused in one line (the tools
    take the model itself, opened once: `exceiver.Exceiver.load`)."""
    if not all(hasattr(model, name) for name in ("read", "module", "vocab", "scaler", "tokenizer")):
        raise ExceiverInputError(f"expected a trained model, got {type(model).__name__} {str(model)[:80]!r}: open it "
                                 "first with exceiver.Exceiver.load(path_or_name)")
    return model


@contextlib.contextmanager
def on_device(module: ExceiverModule, device: str | torch.device | None) -> Iterator[torch.device]:
    """Run `module` on `device` (`exceiver.devices.inference_device`) and leave it where the user
    had it afterwards."""
    target = inference_device(device)
    home = next(module.parameters()).device
    with torch.inference_mode(False):  # moved weights must stay usable by autograd afterwards
        module.to(target)
    try:
        yield target
    finally:
        with torch.inference_mode(False):
            module.to(home)


@torch.inference_mode()
def cell_latents(model: CellModel, cells: ModelCells, *, batch_size: int | None = None, device: str | None = None,
                 num_workers: int = 0, progress: bool = True, desc: str = "cells",
                 ) -> Iterator[tuple[CellBatch, torch.Tensor]]:
    """(batch, processed latents) over a dataset read by `model`, in batches on `device`; rows of
    `batch.cells` index the dataset's cells."""
    with on_device(model.module, device) as on:
        yield from iterate_latents(model.module, cells.cells, model.scaler, model.tokenizer, batch_size=batch_size,
                                   device=on, num_workers=num_workers, progress=progress, desc=desc,
                                   prepare=cells.prepare)


@torch.inference_mode()
def cell_embedding(model: CellModel, cells: ModelCells, pooling: str | None = None, *,
                   desc: str = "embedding", **options) -> np.ndarray:
    """Cell embeddings [cells, width] of a dataset read by `model` (`pooling`: `check_pooling`;
    options: `cell_latents`)."""
    pooling = check_pooling(pooling, model.module)
    embedding = np.empty((cells.n_cells, model.module.embedding_width(pooling)), dtype=np.float32)
    for batch, latents in cell_latents(model, cells, desc=desc, **options):
        embedding[batch.cells.cpu().numpy()] = model.module.pool(latents, pooling).float().cpu().numpy()
    return embedding


@torch.inference_mode()
def decoded_values(model: CellModel, cells: ModelCells, gene_ids: np.ndarray, *, desc: str = "predicting",
                   **options) -> np.ndarray:
    """The masked-value head's prediction [cells, genes] of vocabulary genes `gene_ids` in every
    cell of a dataset read by `model`, in model values (options: `cell_latents`)."""
    out = np.empty((cells.n_cells, len(gene_ids)), dtype=np.float32)
    query = torch.as_tensor(np.asarray(gene_ids, dtype=np.int64))
    for batch, latents in cell_latents(model, cells, desc=desc, **options):
        out[batch.cells.cpu().numpy()] = decode_values(model.module, latents, query.to(latents.device)).float().cpu().numpy()
    return out


def check_pooling(pooling: str | None, module: ExceiverModule) -> str:
    """The pooling to use: `module`'s default for None; refuses unknown ones and a bottleneck that
    the model does not have."""
    if pooling is None:
        return module.default_pooling
    if pooling not in POOLINGS:
        raise ExceiverInputError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
    if pooling == "bottleneck" and module.bottleneck is None:
        raise ExceiverInputError(f"this model has no cell bottleneck: use {option('pooling', 'mean')} or "
                                 f"{option('pooling', 'flatten')}")
    return pooling


def gene_embedding_table(module: ExceiverModule, vocab: GeneVocab) -> pd.DataFrame:
    """The learned gene embedding of every vocabulary gene (rows indexed by gene)."""
    weights = module.gene_emb.weight.detach().cpu().numpy()[: len(vocab)]
    columns = [f"dim_{i}" for i in range(weights.shape[1])]
    return pd.DataFrame(weights, index=pd.Index(vocab.genes, name="gene"), columns=columns)


def record(adata: ad.AnnData, key_added: str, settings: dict) -> None:
    """The settings of a result written under `key_added`, in `adata.uns["exceiver"][key_added]`:
    one layout for everything exceiver writes into an AnnData."""
    adata.uns.setdefault("exceiver", {})[key_added] = settings
