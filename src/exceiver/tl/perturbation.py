"""In-silico perturbation: knock a gene's token out of each cell, or set its value, re-run the
model, and summarise how every query gene's prediction moves against the unperturbed cells.

Work is batch-wise on token batches (see `edit`), so a perturbation costs what the cells express;
the unperturbed predictions of a batch are computed once and shared by all perturbed genes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields

import anndata as ad
import numpy as np
import pandas as pd
import torch
from typing_extensions import Unpack

from exceiver.data.cells import CellCounts
from exceiver.data.contract import ReadingOptions
from exceiver.data.preprocess import log_normalise
from exceiver.data.tokenizer import CellBatch
from exceiver.devices import inference_device
from exceiver.errors import ExceiverInputError, option, plain
from exceiver.inference import CellModel, check_model, decode_values, iterate_batches, on_device, record, sum_dtype
from exceiver.tl.edit import knockout, require_token_model, set_value

log = logging.getLogger(__name__)

MODES = ("knockout", "overexpress")
COLUMNS = ["perturbed_gene", "mode", "level", "group", "gene", "n_cells", "baseline_mean", "perturbed_mean",
           "mean_shift", "effect_size", "fraction_affected"]


@dataclass(frozen=True)
class Perturbation:
    gene: str
    gene_id: int
    mode: str
    level: float = float("nan")  # log-normalised expression the gene is set to (NaN: knockout)
    value: float | None = None  # the same level as a model value (None: knockout)


def perturb(model: CellModel, adata: ad.AnnData, genes: Sequence[str] | str, mode: str | float = "knockout", *,
            query_genes: Sequence[str] | None = None, groupby: str | None = None, groups: Sequence[str] | None = None,
            quantile: float = 0.95, min_shift: float = 0.1, key_added: str = "exceiver_perturbation",
            inplace: bool = True, batch_size: int | None = None, device: str | None = None, progress: bool = True,
            **reading: Unpack[ReadingOptions]) -> pd.DataFrame:
    """Predicted effect of perturbing each of `genes` (one at a time) on each query gene.

    Parameters
    ----------
    model
        A trained model (`exceiver.Exceiver`) whose tokens are a cell's expressed genes.
    adata
        Raw counts, read as the model reads data (mouse data through a human+mouse model's own
        gene map included).
    genes
        Genes to perturb, as the dataset names them (e.g. "Gfap" in mouse data; the model's own
        names are understood too).
    mode
        "knockout" removes the gene's token from the cells that express it; "overexpress" sets it,
        in every cell, to the `quantile` of its log-normalised expression over the cells that
        express it; a number sets it to that log-normalised level.
    query_genes
        Genes whose predictions are read (default: the model's trained genes the dataset measures).
    groupby, groups
        An obs column: effects are summarised per group (`groups`: only these).
    min_shift
        A cell counts as affected when a query gene moves by more than this (log-normalised units).
    key_added, inplace
        The table and the settings go to `adata.uns["exceiver"][key_added]` (as
        `rank_genes_groups` writes to `uns`), unless `inplace=False`.
    batch_size, device, progress
        How inference runs.
    **reading
        How the dataset is read (`exceiver.Exceiver.read`).

    Returns
    -------
    One row per (perturbed gene, group, query gene), genes named as the dataset names them (a
    gene asked for by its model name, "GFAP" of mouse data, is reported as "Gfap"): mean
    predicted shift (log-normalised units), effect size (the shift in the gene's training
    standard deviations), fraction of cells shifted by more than `min_shift`, over the perturbed
    cells (`n_cells`).
    """
    require_token_model(check_model(model))
    inference_device(device)  # before any data is read
    read = model.read(adata, **reading)
    cells = read.in_memory()
    parts = _cell_groups(adata, groupby, groups)
    selected = np.concatenate([rows for _, rows in parts])
    perturbed = read.resolve_genes(genes, "perturbed genes")
    perturbations = plan_perturbations(model, cells.subset(selected), perturbed, read.data_gene_names(perturbed), mode,
                                       quantile)
    query_ids = (np.flatnonzero(read.measured) if query_genes is None
                 else read.resolve_genes(query_genes, "query genes"))
    query_names = read.data_gene_names(query_ids)
    tables = []
    for group, rows in parts:
        stats = perturbation_effects(model, cells.subset(rows), perturbations, query_ids, min_shift=min_shift,
                                     batch_size=batch_size, device=device, progress=progress,
                                     desc="perturbing" if group is None else f"perturbing {group}")
        tables.append(_effects_table(model, perturbations, query_ids, query_names, stats, group))
    table = pd.concat([t for t in tables if len(t)], ignore_index=True)  # a perturbed gene is expressed in some group
    if groupby is None:
        table = table.drop(columns="group")
    if inplace:
        record(adata, key_added, {"mode": str(mode), "genes": [p.gene for p in perturbations], "groupby": groupby,
                                  "quantile": float(quantile), "min_shift": float(min_shift), "effects": table})
    return table


def plan_perturbations(model: CellModel, cells: CellCounts, gene_ids: np.ndarray, names: Sequence[str],
                       mode: str | float, quantile: float = 0.95) -> list[Perturbation]:
    """Fix each perturbed gene's level (vocabulary ids `gene_ids`, named `names`) from the cells."""
    level = _parse_mode(mode)
    if not 0.0 < quantile <= 1.0:
        raise ExceiverInputError(f"{option('quantile', quantile)}: the quantile must be in (0, 1]")
    plan = []
    for gene, gene_id in zip(names, gene_ids):
        expression = gene_expression(cells, int(gene_id), model.scaler.target_sum)
        if mode == "knockout":
            if not len(expression):
                raise ExceiverInputError(f"{gene} is not expressed in any of the {cells.n_cells:,} selected cells: "
                                         "there is nothing to knock out")
            plan.append(Perturbation(gene, int(gene_id), "knockout"))
            continue
        if level is None:  # overexpress
            if not len(expression):
                raise ExceiverInputError(
                    f"{gene} is not expressed in any of the {cells.n_cells:,} selected cells, so it has no "
                    "expression quantile to overexpress to; pass a log-normalised level instead "
                    f"(e.g. {option('mode', 3.0)})")
            target = float(np.quantile(expression, quantile))
        else:
            target = level
        value = float(model.scaler.values(np.array([gene_id]), np.array([target]))[0])
        plan.append(Perturbation(gene, int(gene_id), "overexpress" if level is None else "set", target, value))
    return plan


def gene_expression(cells: CellCounts, gene_id: int, target_sum: float) -> np.ndarray:
    """Log-normalised expression of one gene in the cells that express it."""
    column = cells.counts[:, gene_id].tocoo()
    return log_normalise(column.data.astype(np.float64), cells.library_size[column.row], target_sum)


@torch.inference_mode()
def perturbation_effects(model: CellModel, cells: CellCounts, perturbations: list[Perturbation], query_ids: np.ndarray, *,
                         min_shift: float = 0.1, batch_size: int | None = None, device: str | None = None,
                         progress: bool = True, desc: str = "perturbing") -> dict[str, np.ndarray]:
    """Sums over perturbed cells, per (perturbation, query gene), in model-value units: cells `n`
    [P], `shift` (perturbed - unperturbed), `baseline` values, and cells shifted by > `min_shift`
    log-normalised units (`affected`)."""
    with on_device(model.module, device) as device:
        model.module.eval()
        return _effect_sums(model, cells, perturbations, query_ids, min_shift=min_shift, batch_size=batch_size,
                            device=device, progress=progress, desc=desc)


def _effect_sums(model: CellModel, cells: CellCounts, perturbations: list[Perturbation], query_ids: np.ndarray, *,
                 min_shift: float, batch_size: int | None, device: torch.device, progress: bool,
                 desc: str) -> dict[str, np.ndarray]:
    module = model.module
    query = torch.as_tensor(query_ids, device=device)
    dtype = sum_dtype(device)
    std = torch.as_tensor(model.scaler.value_scale(query_ids), device=device, dtype=dtype)
    n = torch.zeros(len(perturbations), dtype=dtype, device=device)
    sums = {k: torch.zeros(len(perturbations), len(query_ids), dtype=dtype, device=device)
            for k in ("shift", "baseline", "affected")}
    for batch in iterate_batches(cells, model.scaler, model.tokenizer, batch_size=batch_size, device=device,
                                 progress=progress, desc=desc):
        baseline = _predict(module, batch, query).to(dtype)
        for p, perturbation in enumerate(perturbations):
            if perturbation.value is None:
                edited, hit = knockout(batch, perturbation.gene_id, module.pad_id)
            else:
                edited = set_value(batch, perturbation.gene_id, perturbation.value, module.pad_id)
                hit = torch.ones(len(batch), dtype=torch.bool, device=device)
            if not hit.any():
                continue
            shift = _predict(module, _rows(edited, hit), query).to(dtype) - baseline[hit]
            n[p] += hit.sum()
            sums["shift"][p] += shift.sum(0)
            sums["baseline"][p] += baseline[hit].sum(0)
            sums["affected"][p] += (shift.abs() * std > min_shift).sum(0)
    return {"n": n.cpu().numpy(), **{k: v.cpu().numpy() for k, v in sums.items()}}


def _predict(module, batch: CellBatch, query: torch.Tensor) -> torch.Tensor:
    return decode_values(module, module.encode(batch), query)


def _rows(batch: CellBatch, rows: torch.Tensor) -> CellBatch:
    return CellBatch(**{f.name: getattr(batch, f.name)[rows] for f in fields(batch)})


def _effects_table(model: CellModel, perturbations: list[Perturbation], query_ids: np.ndarray, genes: np.ndarray,
                   stats: dict[str, np.ndarray], group: str | None) -> pd.DataFrame:
    """Sums -> one row per (perturbation, query gene `genes`) on the log-normalised scale, largest |effect| first."""
    std = model.scaler.value_scale(query_ids)
    tables = []
    for p, perturbation in enumerate(perturbations):
        n = stats["n"][p]
        if n == 0:
            log.warning("%s is not expressed in any cell of group %s: no knockout effects there",
                        perturbation.gene, group)
            continue
        effect = stats["shift"][p] / n
        baseline = model.scaler.log_expression(query_ids, stats["baseline"][p] / n).astype(np.float64)
        table = pd.DataFrame({
            "perturbed_gene": perturbation.gene, "mode": perturbation.mode, "level": perturbation.level,
            "group": group, "gene": genes, "n_cells": int(n), "baseline_mean": baseline,
            "perturbed_mean": baseline + effect * std, "mean_shift": effect * std, "effect_size": effect,
            "fraction_affected": stats["affected"][p] / n,
        }, columns=COLUMNS)
        tables.append(table.iloc[np.argsort(-np.abs(effect), kind="stable")])
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=COLUMNS)


def _parse_mode(mode: str | float) -> float | None:
    """None for knockout / overexpress, else the log-normalised level to set."""
    if isinstance(mode, str) and mode in MODES:
        return None
    try:
        level = float(mode)
    except (TypeError, ValueError):
        raise ExceiverInputError(f"unknown {option('mode', mode)}: use knockout, overexpress or a log-normalised "
                                 "expression level (a number >= 0)") from None
    if not np.isfinite(level) or level < 0:
        raise ExceiverInputError(f"{option('mode', mode)}: a log-normalised expression level must be a finite "
                                 "number >= 0")
    return level


def _cell_groups(adata: ad.AnnData, groupby: str | None,
                 groups: Sequence[str] | None) -> list[tuple[str | None, np.ndarray]]:
    """(group name, cell rows) for each group of `groupby` (all cells as one group without it)."""
    if groupby is None:
        if groups is not None:
            raise ExceiverInputError(f"{option('groups')} needs {option('groupby')} (the obs column the groups "
                                     "come from)")
        return [(None, np.arange(adata.n_obs))]
    if groupby not in adata.obs.columns:
        raise ExceiverInputError(f"{option('groupby', groupby)} is not an obs column; obs has "
                                 f"{plain(list(adata.obs.columns))}")
    labels = adata.obs[groupby].astype(str).to_numpy()
    present = list(pd.unique(labels))
    names = sorted(present) if groups is None else [str(g) for g in groups]
    missing = [g for g in names if g not in present]
    if missing:
        raise ExceiverInputError(f"groups {plain(missing)} are not values of obs[{groupby!r}] "
                                 f"(values: {plain(sorted(present)[:10])})")
    return [(name, np.flatnonzero(labels == name)) for name in names]
