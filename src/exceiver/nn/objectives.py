"""Pretraining objectives, each a function of the network and a batch: masked-value prediction,
the whole cell's counts through the cell bottleneck, detection of expressed genes, and the
contrastive term; `pretraining_loss` combines them into one
`LossRecord` (the total to optimise and each part, to log)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from exceiver.data.tokenizer import CellBatch
from exceiver.nn.config import ObjectiveConfig
from exceiver.nn.network import ExceiverModule

# Rows of every process's cells (in rank order, gradients flowing back) and this process's offset.
Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


@dataclass
class LossRecord:
    total: torch.Tensor
    parts: dict[str, torch.Tensor]


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    n = mask.sum()
    return ((pred - target) ** 2 * mask).sum() / n.clamp(min=1)


def pretraining_loss(module: ExceiverModule, batch: CellBatch, objectives: ObjectiveConfig, *, salt: int,
                     gather: Gather | None = None, batches: torch.Tensor | None = None,
                     kl_weight: float | None = None) -> LossRecord:
    """Masked values (+ detection) (+ counts) (+ contrastive), weighted by `objectives`. With a
    detection head the value head learns expressed genes only: a zero is the detection head's to
    predict. `batches`: each cell's batch, for a model whose count decoder is conditioned on it.
    `kl_weight`: the bottleneck KL's weight at this step (`kl_weight_at`; None: bottleneck_kl)."""
    latents = module.encode(batch)
    read = latents.detach() if objectives.value_detach else latents  # what the value head reads
    parts = {}
    kl_weight = objectives.bottleneck_kl if kl_weight is None else kl_weight
    if objectives.detection_weight:
        decoded = module.decode(read, batch.query_ids)
        values = module.values_from_decoded(decoded, batch.query_ids)
        parts["masked_values"] = masked_mse(values, batch.targets, batch.query_mask & ~batch.query_is_zero)
        logits = module.detection_head(decoded).squeeze(-1)[batch.query_mask]
        parts["detection"] = F.binary_cross_entropy_with_logits(
            logits, (~batch.query_is_zero[batch.query_mask]).float())
    else:
        values = module.predict_values(read, batch.query_ids)
        parts["masked_values"] = masked_mse(values, batch.targets, batch.query_mask)
    if objectives.count_weight:
        if objectives.bottleneck_kl:  # per measured gene, as the count loss: scVI's weighing of the two
            cell, kl = bottleneck_sample(module, latents)
            parts["bottleneck_kl"] = (kl / batch.measured.sum(-1).clamp(min=1)).mean()
        else:
            cell = module.pool(latents, "bottleneck")
        parts["counts"] = count_nll(module, latents, batch, batches, cell=cell, salt=salt,
                                    zero_samples=objectives.count_zero_samples,
                                    sampled_share=objectives.count_sampled_share).mean()
    if objectives.contrastive_weight:
        parts["contrastive"] = contrastive_loss(module, latents, batch, objectives, salt=salt, gather=gather)
    total = (objectives.value_weight * parts["masked_values"] + objectives.detection_weight * parts.get("detection", 0.0)
             + objectives.count_weight * (parts.get("counts", 0.0) + kl_weight * parts.get("bottleneck_kl", 0.0))
             + objectives.contrastive_weight * parts.get("contrastive", 0.0))
    return LossRecord(total, parts)


def gaussian_kl(mean: torch.Tensor, log_variance: torch.Tensor | None = None) -> torch.Tensor:
    """KL divergence of each cell's posterior N(mean, diag(exp(log_variance))) from N(0, I) [B]:
    0.5 * sum(mean^2 + sigma^2 - 1 - log sigma^2) over the dimensions (None: unit variance, where
    only the mean's term remains)."""
    terms = mean.float().pow(2)
    if log_variance is not None:
        log_variance = log_variance.float()
        terms = terms + log_variance.exp() - 1 - log_variance
    return 0.5 * terms.sum(-1)


def bottleneck_sample(module: ExceiverModule, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A reparameterised sample of each cell's bottleneck posterior [B, bottleneck_dim] (mean +
    sigma x standard normal noise; sigma 1 without a learned variance), and the posterior's KL
    divergence from N(0, I) [B]: what the count decoder reads in training, and its cost."""
    mean, log_variance = module.bottleneck_posterior(latents)
    noise = torch.randn_like(mean)
    sample = mean + (noise if log_variance is None else noise * (0.5 * log_variance).exp())
    return sample, gaussian_kl(mean, log_variance)


def kl_weight_at(objectives: ObjectiveConfig, step: int) -> float:
    """The bottleneck KL's weight at training step `step` (counted from 0): bottleneck_kl x
    step / kl_warmup_steps during the warm-up, bottleneck_kl after it."""
    if step >= objectives.kl_warmup_steps:
        return objectives.bottleneck_kl
    return objectives.bottleneck_kl * step / objectives.kl_warmup_steps


def count_nll(module: ExceiverModule, latents: torch.Tensor, batch: CellBatch,
              batches: torch.Tensor | None = None, cell: torch.Tensor | None = None, *,
              zero_samples: int = 0, sampled_share: bool = False, salt: int = 0) -> torch.Tensor:
    """Negative-binomial negative log-likelihood of each cell's whole count vector [B], per
    measured gene, decoded from the cell bottleneck: mean = library x softmax share over the genes
    the cell's dataset measured, dispersion learned per gene.

    The likelihood of a zero count, theta * (log theta - log(theta + mu)), is summed densely over
    the measured genes (it needs no counts); expressed genes then add the difference between their
    count's likelihood and a zero's. No dense counts matrix is ever built.

    With `zero_samples` K > 0 (training on a large vocabulary) the likelihood's terms are taken
    on each cell's expressed genes and about K of its zeros (`sampled_count_nll`; `salt` draws
    the sample): only the decoder's matrix product still covers every gene."""
    cell = module.pool(latents, "bottleneck") if cell is None else cell  # `cell`: a sample of it, in training
    if zero_samples:
        return sampled_count_nll(module, cell, batch, batches, zero_samples=zero_samples,
                                 sampled_share=sampled_share, salt=salt)
    logits = module.count_logits(cell, batches).float()
    measured = batch.measured
    log_share = torch.log_softmax(logits.masked_fill(~measured, float("-inf")), dim=-1)
    log_mu = log_share + batch.library.clamp(min=1).log()[:, None]
    log_theta = module.gene_log_dispersion.float()
    theta = log_theta.exp()
    log_theta_mu = torch.logaddexp(log_theta.expand_as(log_mu), log_mu)  # log(theta + mu)
    zero_ll = (theta * (log_theta - log_theta_mu)).masked_fill(~measured, 0.0).sum(-1)
    n_genes = log_mu.shape[1]
    genes = batch.count_genes.clamp(max=n_genes - 1)  # padding entries have count 0 and add nothing
    x = batch.counts
    theta_x, log_mu_x, log_theta_mu_x = theta[genes], log_mu.gather(1, genes), log_theta_mu.gather(1, genes)
    extra = (torch.lgamma(x + theta_x) - torch.lgamma(theta_x) - torch.lgamma(x + 1)
             + x * (log_mu_x - log_theta_mu_x))
    extra = extra.masked_fill(x == 0, 0.0).sum(-1)
    return -(zero_ll + extra) / measured.sum(-1).clamp(min=1)


def sampled_count_nll(module: ExceiverModule, cell: torch.Tensor, batch: CellBatch,
                      batches: torch.Tensor | None = None, *, zero_samples: int, sampled_share: bool = False,
                      salt: int = 0) -> torch.Tensor:
    """`count_nll` of bottleneck vectors `cell` [B] from each cell's expressed genes and a sample
    of its zeros (`sampled_zero_genes`), each sampled zero weighted by 1 / its inclusion
    probability.

    What is estimated: the expressed genes' terms are exact; the sum of the zero-count measured
    genes' terms, theta * (log theta - log(theta + mu)), is replaced by its Horvitz-Thompson
    estimate from the sample, unbiased given mu. With `sampled_share`, mu's softmax normaliser
    (the sum of exp(logit) over the measured genes) is also that estimate (the expressed genes'
    exact part plus the weighted sampled zeros), so that no logit of an unsampled gene is
    computed: the normaliser is then unbiased, its log (and so the loss) is not, exactly (its
    bias shrinks with K). Either way the result is `count_nll` itself, up to rounding, once K
    reaches a cell's number of zeros."""
    n_genes = module.config.n_genes
    expressed = batch.count_genes.clamp(max=n_genes - 1)  # padding entries have count 0 and no term
    n_measured = batch.measured.sum(-1, dtype=torch.int32)  # (an int64 sum of booleans is slow)
    zero_genes, zero_weights = sampled_zero_genes(batch, n_measured, n_genes, zero_samples, salt)
    genes = torch.cat([expressed, zero_genes], dim=1)
    weights = torch.cat([(batch.counts > 0).float(), zero_weights], dim=1)  # 0: no term
    empty = weights == 0
    # Every gene's logit is one matrix product (cheaper than gathering each cell's output rows);
    # all that follows reads the sampled genes' only, or, for an exact normaliser, one pass of exp.
    all_logits = module.count_logits(cell, batches).float()
    logits = all_logits.gather(1, genes)
    if sampled_share:
        log_norm = sampled_log_normaliser(logits, weights)
    else:
        log_norm = torch.logsumexp(all_logits.masked_fill(~batch.measured, float("-inf")), dim=-1)
    log_mu = (logits - log_norm[:, None]).masked_fill(empty, 0.0) + batch.library.clamp(min=1).log()[:, None]
    log_theta = module.gene_log_dispersion.float().index_select(0, genes.flatten()).view_as(genes)
    theta = log_theta.exp()
    log_theta_mu = torch.logaddexp(log_theta, log_mu)  # log(theta + mu)
    ll = weights * theta * (log_theta - log_theta_mu)  # a zero count's log-likelihood, weighted
    n, x = expressed.shape[1], batch.counts  # the expressed genes add their count's difference from a zero's
    extra = (torch.lgamma(x + theta[:, :n]) - torch.lgamma(theta[:, :n]) - torch.lgamma(x + 1)
             + x * (log_mu[:, :n] - log_theta_mu[:, :n]))
    return -(ll.sum(-1) + extra.masked_fill(x == 0, 0.0).sum(-1)) / n_measured.clamp(min=1)


def sampled_log_normaliser(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The log of each cell's Horvitz-Thompson estimate [B] of the softmax normaliser, the sum of
    exp(logit) over its measured genes, from the logits [B, K] of its expressed genes (weight 1)
    and sampled zeros (weight 1 / inclusion probability); weight 0: no term. The estimate is
    unbiased; its log is biased low (Jensen), by about half its relative variance."""
    no_terms = (weights == 0).all(-1, keepdim=True)  # (a cell without terms: 0, not NaN)
    return torch.logsumexp((logits + weights.log()).masked_fill(no_terms, 0.0), dim=-1)


def sampled_zero_genes(batch: CellBatch, n_measured: torch.Tensor, n_genes: int, zero_samples: int,
                       salt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """About `zero_samples` (K) of each cell's zeros (measured genes it did not express): genes
    [B, C] and weights [B, C] (1 / inclusion probability; 0 where an entry is no zero).

    Every vocabulary gene is a candidate with probability exactly p = min(1, K / the cell's
    zeros): systematic sampling along the vocabulary, every (1 / p)-th gene from an offset drawn
    from a hash of (cell, salt), so a cell gets the same sample whichever process or batch
    position it has, and p = 1 takes every gene once. The candidates that are the cell's zeros
    are kept."""
    padded = torch.zeros(len(batch), n_genes + 1, dtype=torch.bool, device=batch.counts.device)
    expressed = padded.scatter_(1, batch.count_genes, batch.counts > 0)[:, :n_genes]  # padding: column n_genes
    n_zeros = n_measured - (batch.counts > 0).sum(-1)  # expressed genes are measured ones
    p = (zero_samples / n_zeros.clamp(min=1).double()).clamp(max=1.0)
    salt = (salt * 6_364_136_223_846_793_005 + 1_442_695_040_888_963_407) % (1 << 62)  # apart from subset_tokens' draws
    offset = _uniform_hash(batch.cells.long() * 1_000_003 + salt)
    steps = torch.arange(math.ceil(n_genes * float(p.max())) if len(batch) else 0, device=p.device)
    genes = ((steps[None, :] + offset[:, None]) / p[:, None]).long()
    inside = genes < n_genes
    genes = genes.clamp(max=n_genes - 1)
    kept = inside & batch.measured.gather(1, genes) & ~expressed.gather(1, genes)
    return genes, kept / p.float()[:, None]


def contrastive_loss(module: ExceiverModule, latents: torch.Tensor, batch: CellBatch, objectives: ObjectiveConfig,
                     *, salt: int, gather: Gather | None = None) -> torch.Tensor:
    """InfoNCE between each cell's embedding from its tokens and from a random subset of them: the
    other cells of the global batch (`gather`ed from every process) are the negatives, so the
    embedding must say which cell this is from any part of its genes (identity), not how many
    genes it has (depth)."""
    subset = subset_tokens(batch.token_mask, objectives.contrastive_keep, batch.cells, salt=salt)
    other = module.encode(batch, subset)
    z = [F.normalize(module.projection(module.pool(x)), dim=-1) for x in (latents, other)]
    gather = gather or (lambda x: (x, 0))
    (everyone_full, offset), (everyone_part, _) = (gather(x) for x in z)
    cells = offset + torch.arange(len(latents), device=latents.device)
    temperature = objectives.contrastive_temperature
    return (F.cross_entropy(z[0] @ everyone_part.T / temperature, cells)
            + F.cross_entropy(z[1] @ everyone_full.T / temperature, cells)) / 2


def subset_tokens(token_mask: torch.Tensor, keep: float, cells: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """A random `keep` fraction of each cell's real tokens (at least one). The draw is a hash of
    (cell, token slot, salt), not of the global random state: a cell gets the same subset whichever
    process or batch position it has (distributed runs then compute what one process would)."""
    slots = torch.arange(token_mask.shape[1], device=token_mask.device)
    salt = (salt * 7_919_000_000_017) % (1 << 62)
    draw = _uniform_hash(cells[:, None].long() * 1_000_003 + slots[None, :] + salt)
    subset = token_mask & (draw < keep)
    empty = ~subset.any(dim=1) & token_mask.any(dim=1)
    subset[empty, token_mask[empty].float().argmax(dim=1)] = True
    return subset


def _uniform_hash(keys: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) floats from int64 keys (splitmix64-style mixing, wrapping arithmetic)."""
    x = keys + 0x3C6EF372FE94F82A
    for shift, multiplier in ((30, -4658895280553007687), (27, -7723592293110705685)):
        x = (x ^ ((x >> shift) & ((1 << (64 - shift)) - 1))) * multiplier
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    return ((x >> 11) & ((1 << 53) - 1)).double() / float(1 << 53)
