"""Edits of a token batch that stand for a perturbation of one gene in every cell.

Only the perturbed gene's token changes: the other tokens keep their values (a real knockout would
shift the other genes' library-normalised values by the gene's share of the library, a small
effect left out so that a perturbation is exactly one input change).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from exceiver.data.tokenizer import CellBatch
from exceiver.errors import ExceiverInputError


def require_token_model(model) -> None:
    """Edits assume that a cell's tokens are its expressed genes, which paper-compatible models break."""
    if model.module.config.paper_compatible:
        raise ExceiverInputError("perturbation needs a model whose tokens are a cell's expressed genes; a "
                                 "paper-compatible (imported original) model makes every measured gene a token")


def knockout(batch: CellBatch, gene_id: int, pad_id: int) -> tuple[CellBatch, torch.Tensor]:
    """The batch without `gene_id`'s token, and which cells lost it. A cell whose only token it is
    keeps it (an empty cell has no latents) and does not count as perturbed."""
    hit = (batch.gene_ids == gene_id) & batch.token_mask
    hit &= (batch.token_mask & ~hit).any(1, keepdim=True)
    edited = replace(batch, gene_ids=batch.gene_ids.masked_fill(hit, pad_id), values=batch.values.masked_fill(hit, 0.0),
                     token_mask=batch.token_mask & ~hit)
    return edited, hit.any(1)


def set_value(batch: CellBatch, gene_id: int, value: float, pad_id: int) -> CellBatch:
    """The batch with `gene_id`'s token set to `value` in every cell. Cells that do not express the
    gene get the token added in a new last slot: an overexpressed gene is an expressed one."""
    present = (batch.gene_ids == gene_id) & batch.token_mask
    values = batch.values.masked_fill(present, value)
    missing = ~present.any(1, keepdim=True)
    if not missing.any():
        return replace(batch, values=values)
    pad = torch.full_like(missing, pad_id, dtype=batch.gene_ids.dtype)
    return replace(
        batch,
        gene_ids=torch.cat([batch.gene_ids, pad.masked_fill(missing, gene_id)], 1),
        values=torch.cat([values, missing.to(values.dtype) * value], 1),
        token_mask=torch.cat([batch.token_mask, missing], 1),
        token_zero=torch.cat([batch.token_zero, torch.zeros_like(missing)], 1),
    )
