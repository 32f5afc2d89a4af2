"""Start a pretraining run from a pretrained model (continued training on new data): the model's
vocabulary, optionally extended by genes of the new data; its normalisation, with per-gene
statistics re-estimated on the new data where it measures a gene; its weights, with fresh rows
for new genes and new batches. Fine-tuning starts from a model's weights through the same
transfer (`transfer_weights`).

Per-gene parameters are tables with one row per vocabulary gene (the gene embedding, with its two
special rows, padding and the class token, after the genes; the gene bias; the count decoder's
output layer and dispersions): their first rows are the model's genes, in the model's order, so
extending a vocabulary appends rows and keeps every pretrained one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import torch

from exceiver.data.genemap import GenePairs
from exceiver.data.preprocess import GeneScaler
from exceiver.data.vocab import GeneVocab
from exceiver.errors import ExceiverInputError, option
from exceiver.nn.config import INIT_SETTINGS, ExceiverConfig, ObjectiveConfig, check_bottleneck_settings
from exceiver.nn.network import BATCH_TABLES, ExceiverModule

log = logging.getLogger(__name__)

# Parameters with one row per gene, and how many special rows follow the genes.
GENE_ROWS = {"gene_emb.weight": 2, "gene_bias": 2, "gene_log_dispersion": 0}


def merged_scaler(fitted: GeneScaler, base: GeneScaler) -> GeneScaler:
    """Statistics fitted on the new data, and the model's for its genes the new data never
    expresses (they stay trained genes of the model); the model's normalisation settings."""
    if (fitted.standardise, fitted.target_sum) != (base.standardise, base.target_sum):
        raise ValueError("the scaler must be fitted with the model's normalisation settings")
    n = len(base)
    keep = np.zeros(len(fitted), dtype=bool)
    keep[:n] = fitted.n_expressed[:n] == 0
    arrays = {}
    fields = ["mean", "std", "n_cells", "expressed_mean", "n_expressed"]
    if fitted.expressed_median is not None and base.expressed_median is not None:
        fields.append("expressed_median")  # rank tokens: a base gene the data never expresses keeps its median
    for field in fields:
        values = getattr(fitted, field).copy()
        values[keep] = getattr(base, field)[keep[:n]]
        arrays[field] = values
    return dataclasses.replace(fitted, **arrays)


def continued_network(base, vocab: GeneVocab, scaler: GeneScaler, n_batches: int, *, own_genes: bool = False,
                      gene_map: GenePairs | None = None,
                      config: ExceiverConfig | None = None) -> tuple[ExceiverModule, int]:
    """The network a continued run starts from, and how many of its genes start fresh: the model's,
    its vocabulary extended by the new genes; or, with `own_genes`, the data's vocabulary
    (`vocab`) with the model's rows where it knows a gene, by name or through `gene_map`."""
    if own_genes:
        rows = base_rows(base, list(vocab.genes), gene_map)
        module = warm_module(base.module, len(vocab), n_batches, rows=rows, config=config)
        new_gene_offsets(module, scaler, rows < 0)
        return module, int((rows < 0).sum())
    module = warm_module(base.module, len(vocab), n_batches, config=config)
    new_gene_offsets(module, scaler, len(base.vocab))
    return module, len(vocab) - len(base.vocab)


def warm_module(base: ExceiverModule, n_genes: int, n_batches: int, rows: np.ndarray | None = None,
                config: ExceiverConfig | None = None) -> ExceiverModule:
    """A network of the base's architecture (or `config`, the base's with integration settings)
    for `n_genes` genes and `n_batches` batches, with every pretrained weight; rows of new genes
    and new batches start fresh (new batches at zero: the decoder starts as the pretrained one), as
    do heads the base has not (`ADDABLE_HEADS`). `rows`: for a vocabulary of its own, each gene's
    row in the base (-1: a fresh row); without, the base's genes come first, in its order."""
    if rows is None and (n_genes < base.config.n_genes or n_batches < base.config.n_batches):
        raise ValueError("a warm start keeps every gene and batch of the model")
    module = ExceiverModule(dataclasses.replace(config or base.config, n_genes=n_genes, n_batches=n_batches))
    added = tuple(f"{head}." for head in ADDABLE_HEADS if getattr(base, head) is None and getattr(module, head) is not None)
    transfer_weights(base, module, rows=rows, fresh=added)
    return module


def transfer_weights(base: ExceiverModule, module: ExceiverModule, *, rows: np.ndarray | None = None,
                     fresh: tuple[str, ...] = ()) -> None:
    """Copy the base's weights into `module`, a network of the base's architecture with other genes,
    batches or heads (continued pretraining, fine-tuning). Weights of equal shape are copied;
    per-gene tables take the base's rows (its genes first, in its order, or each gene's row in the
    base by `rows`, -1: a fresh row); new batches, and the weights whose names start with a prefix
    in `fresh`, keep their initial values. The base's weights that `module` has not (heads of
    pretraining-only objectives) stay behind; every other weight of `module` comes from the base."""
    n_genes, old_genes = module.config.n_genes, base.config.n_genes
    pretrained, state = base.state_dict(), module.state_dict()
    # A base without batches continued with a batch key: its batch tables are new (zeros: no batch
    # effect until one is learned), like the new rows of a base with batches.
    fresh = (*fresh, *(f"{table}." for table in BATCH_TABLES)) if base.batch_embedding is None else fresh
    missing = [key for key in state if key not in pretrained and not key.startswith(fresh)]
    if missing:
        raise ValueError(f"the pretrained weights do not fit this network (missing {missing})")
    output_layer = f"count_decoder.{len(base.count_decoder) - 1}." if base.count_decoder is not None else None
    for key, target in state.items():
        if key.startswith(fresh) or key not in pretrained:
            continue
        value = pretrained[key]
        if rows is not None and (key in GENE_ROWS or (output_layer and key.startswith(output_layer))):
            known = rows >= 0
            target[:n_genes][known] = value[rows[known]]
            if GENE_ROWS.get(key):
                target[n_genes:] = value[old_genes:]
        elif target.shape == value.shape:
            target.copy_(value)
        elif key in GENE_ROWS:  # genes first, then the special rows
            target[:old_genes] = value[:old_genes]
            if GENE_ROWS[key]:
                target[n_genes:] = value[old_genes:]
        elif key.startswith("count_decoder.") and target.shape[0] == n_genes:  # the output layer
            target[:old_genes] = value
        elif key.removesuffix(".weight") in BATCH_TABLES:  # the base's batches first, new ones after
            target[: len(value)] = value
        else:
            raise ValueError(f"{key}: shapes {tuple(value.shape)} and {tuple(target.shape)} do not match")
    module.load_state_dict(state)


def freeze_all_but_new_batch_rows(module: ExceiverModule, n_known: int) -> dict[str, int]:
    """scArches' query step: freeze every weight of a continued network but its batch tables,
    whose rows of the model's own `n_known` batches stay as they are too, so that only the new
    batches' rows learn: the reference cells' embeddings, and the decoder of every reference batch,
    are exactly the model's. Returns {table weight: rows that do not learn} (`TrainingPlan.frozen_rows`)."""
    tables = [f"{name}.weight" for name in BATCH_TABLES if getattr(module, name) is not None]
    for name, param in module.named_parameters():
        param.requires_grad_(name in tables)
    return dict.fromkeys(tables, n_known)


def base_rows(base, genes: Sequence[str], gene_map: GenePairs | None = None) -> np.ndarray:
    """Each gene's row in the base model: by name, else through gene pairs (model gene, data gene;
    a mouse gene, for a human model: its human ortholog's row); -1 where the model has none."""
    rows = base.vocab.ids(list(genes)).astype(np.int64)
    missing = np.flatnonzero(rows < 0)
    if gene_map is not None and len(missing):
        rows[missing] = base.vocab.ids(gene_map.translate([genes[i] for i in missing]))
    log.info("%s of the %s genes start from the model's embeddings, the others fresh",
             f"{int((rows >= 0).sum()):,}", f"{len(rows):,}")
    return rows


# Heads that a continued network may have and its base lack (they start fresh).
ADDABLE_HEADS = ("bottleneck_log_variance", *BATCH_TABLES)


def check_base(base, model_overrides: dict | None) -> None:
    """A warm start needs a pretrained (not fine-tuned) model and takes its settings whole, but
    for the integration settings (`INIT_SETTINGS`)."""
    if base.classes:
        raise ExceiverInputError(f"{option('init')} needs a pretrained model; this one is a classifier "
                                 f"of {len(base.classes)} classes")
    refused = sorted(set(model_overrides or {}) - set(INIT_SETTINGS))
    if refused:
        raise ExceiverInputError(f"with {option('init')} the architecture, tokenizer and objectives are the "
                                 f"model's: drop the model settings {refused} (a continued run may set only "
                                 f"{', '.join(INIT_SETTINGS)})")


def continued_settings(base, model_overrides: dict | None) -> tuple[ExceiverConfig, ObjectiveConfig]:
    """The base's architecture and objectives with the integration settings of `model_overrides`
    (checked by `check_base`); impossible combinations are refused in one line."""
    overrides = model_overrides or {}
    architecture_fields = {f.name for f in dataclasses.fields(ExceiverConfig)}
    try:
        architecture = dataclasses.replace(base.config, **{k: v for k, v in overrides.items() if k in architecture_fields})
        objectives = dataclasses.replace(base.objectives,
                                         **{k: v for k, v in overrides.items() if k not in architecture_fields})
        check_bottleneck_settings(architecture.bottleneck_variance, objectives)
    except (TypeError, ValueError) as err:
        raise ExceiverInputError(f"invalid model settings: {err}") from err
    return architecture, objectives


def new_gene_offsets(module: ExceiverModule, scaler: GeneScaler, fresh: int | np.ndarray) -> None:
    """Gene biases of new genes (from index `fresh` on, or where `fresh` is True) start at their
    means, as a fresh model's do."""
    if module.gene_bias is None:
        return
    n = module.config.n_genes
    mask = np.arange(n) >= fresh if np.isscalar(fresh) else np.asarray(fresh, dtype=bool)
    if mask.any():
        with torch.no_grad():
            index = torch.from_numpy(np.flatnonzero(mask))
            module.gene_bias[index] = torch.from_numpy(scaler.expressed_mean[mask]).to(module.gene_bias.dtype)
