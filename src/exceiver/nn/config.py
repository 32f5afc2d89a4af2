"""What a model is: its architecture (`ExceiverConfig`, heads declared explicitly), the weights of
its pretraining objectives (`ObjectiveConfig`), and the presets that choose both and the
tokenizer's settings in one name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from exceiver.data.tokenizer_config import TokenizerConfig
from exceiver.errors import ModelFileError


CLASS_INPUTS = ("token", "bottleneck", "mean", "flatten")
BOTTLENECK_VARIANCES = ("unit", "learned")
BATCH_INJECTIONS = ("input", "every_layer")


@dataclass(frozen=True)
class ExceiverConfig:
    """The architecture of an Exceiver network: sizes and which heads exist."""

    n_genes: int = 0  # vocabulary size, set from the data
    gene_dim: int = 32  # gene embedding width (also the decoder's width)
    n_latents: int = 32
    latent_dim: int = 64
    n_layers: int = 2  # processor self-attention blocks
    n_heads: int = 4  # processor heads
    cross_heads: int = 4  # encoder and decoder cross-attention heads
    ff_dim: int = 256  # processor feed-forward width
    cross_ff_mult: int = 4  # cross-attention feed-forward width, as a multiple of its input width
    head_hidden: int = 0  # hidden width of the value and detection heads (0: gene_dim)
    gene_bias: bool = False  # a learned per-gene offset on predicted values (starts at gene means)
    dropout: float = 0.0
    n_classes: int = 0  # > 0 adds the class-token head
    class_hidden: int = 0  # hidden width of the class head (0: n_classes, as the original)
    # What the class head reads: "token" (a class-token query decoded from the latents, as the
    # original) or a cell embedding ("bottleneck", "mean", "flatten"), read by one linear layer:
    # the linear probe of a frozen model.
    class_input: str = "token"
    detection_head: bool = False  # says whether a queried gene is expressed (the detection objective)
    projection_head: bool = False  # projects cell embeddings for the contrastive objective
    # The cell bottleneck: the latents pooled by `bottleneck_input` ("mean", or "flatten": every
    # latent, so that each keeps what it attended to) -> LayerNorm -> Linear to this width (0: none;
    # built only with the count head, which trains it). The count decoder must reconstruct the
    # whole cell from it alone, so it is the cell embedding.
    bottleneck_dim: int = 0
    bottleneck_input: str = "mean"
    count_hidden: int = 128  # hidden width of the count decoder (bottleneck -> every gene's rate)
    count_head: bool = False  # decodes the cell's counts from the bottleneck (the count objective)
    # > 0: the count decoder's hidden layer -> this width -> every gene (a factorised output layer:
    # its per-gene table and product are count_rank wide, not count_hidden); 0: hidden -> every gene.
    count_rank: int = 0
    # Batches (a covariate such as assay or donor) whose learned embedding is added to the
    # bottleneck before the count decoder, as scVI conditions its decoder: the decoder explains
    # what the batch does, so the cell embedding (the bottleneck itself) need not carry it.
    n_batches: int = 0
    # Where the batch enters the count decoder: "input" (added to the bottleneck, above) or
    # "every_layer" (also a learned per-batch vector added to the hidden layer's pre-activation,
    # and to the rank code with count_rank, as scVI injects covariates into each decoder layer):
    # batch effects the decoder models non-linearly, that the bottleneck need not carry.
    batch_injection: str = "input"
    # The variance of the bottleneck's posterior where the objectives give it a KL (bottleneck_kl):
    # "unit" (N(mean, 1)) or "learned" (N(mean, sigma^2), a second head on the bottleneck's
    # normalised input gives log sigma^2 per cell and dimension, as scVI's encoder does).
    bottleneck_variance: str = "unit"
    paper_compatible: bool = False  # compute exactly as the original release (imported checkpoints)

    def __post_init__(self) -> None:
        sizes = dict(gene_dim=self.gene_dim, n_latents=self.n_latents, latent_dim=self.latent_dim,
                     n_heads=self.n_heads, cross_heads=self.cross_heads, ff_dim=self.ff_dim,
                     cross_ff_mult=self.cross_ff_mult)
        small = [name for name, value in sizes.items() if value < 1]
        if small or min(self.n_genes, self.n_layers, self.head_hidden, self.n_classes, self.class_hidden,
                        self.bottleneck_dim, self.count_hidden - 1, self.count_rank) < 0:
            raise ValueError(f"model sizes must be positive (got {small or 'a negative size'})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for dim, heads, what in [
            (self.latent_dim, self.n_heads, "latent_dim / n_heads"),
            (self.latent_dim, self.cross_heads, "latent_dim / cross_heads"),
            (self.gene_dim, self.cross_heads, "gene_dim / cross_heads"),
        ]:
            if dim % heads:
                raise ValueError(f"{what} must divide evenly, got {dim} / {heads}")
        if self.bottleneck_input not in ("mean", "flatten"):
            raise ValueError(f"bottleneck_input must be 'mean' or 'flatten', got {self.bottleneck_input!r}")
        if self.class_input not in CLASS_INPUTS:
            raise ValueError(f"class_input must be one of {CLASS_INPUTS}, got {self.class_input!r}")
        if self.class_input == "bottleneck" and not (self.bottleneck_dim and self.count_head):
            raise ValueError("class_input 'bottleneck' needs the cell bottleneck (bottleneck_dim > 0 and the count head)")
        if self.count_head and not self.bottleneck_dim:
            raise ValueError("the count objective decodes from the cell bottleneck: set bottleneck_dim > 0")
        if self.n_batches < 0 or (self.n_batches and not self.count_head):
            raise ValueError("batches condition the count decoder: they need count_head (the count objective)")
        if self.batch_injection not in BATCH_INJECTIONS:
            raise ValueError(f"batch_injection must be one of {BATCH_INJECTIONS}, got {self.batch_injection!r}")
        if self.batch_injection != "input" and not self.count_head:
            raise ValueError("batch_injection conditions the count decoder: it needs count_head (the count objective)")
        if self.bottleneck_variance not in BOTTLENECK_VARIANCES:
            raise ValueError(f"bottleneck_variance must be one of {BOTTLENECK_VARIANCES}, "
                             f"got {self.bottleneck_variance!r}")
        if self.bottleneck_variance != "unit" and not (self.bottleneck_dim and self.count_head):
            raise ValueError("bottleneck_variance 'learned' needs the cell bottleneck (bottleneck_dim > 0 and the "
                             "count head)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ObjectiveConfig:
    """Weights of the pretraining objectives (0 turns one off)."""

    # Masked values: the paper's context task, predicting masked genes' values from the latents.
    value_weight: float = 1.0
    # The value head reads the latents through a stop-gradient: it learns to read the cell state
    # without pulling the encoder toward per-gene interpolation (measured: that pull costs the
    # cell embedding 0.1 kNN macro-F1 once the count objective shapes the latents).
    value_detach: bool = False

    # Detection: a head says whether each queried gene is expressed (masked expressed genes vs
    # sampled zero-count genes); which genes are on is identity, whatever the depth. The value
    # head is then trained on expressed genes only.
    detection_weight: float = 0.0
    # Counts: the whole cell's raw counts are decoded from the cell bottleneck under a negative
    # binomial with mean = library size x predicted share and a learned dispersion per gene. Depth
    # is given, so the bottleneck carries what the cell is, not how deeply it was sequenced.
    count_weight: float = 0.0
    # With batches: the bottleneck as a variational posterior (N(cell, 1), or with a learned
    # variance: `ExceiverConfig.bottleneck_variance`) with a N(0, I) prior, its KL (per cell, divided
    # by the cell's measured genes as the count loss is) weighted by this: what makes scVI's latent
    # drop the batch that its decoder is given; 0 keeps the bottleneck deterministic.
    bottleneck_kl: float = 0.0
    # The KL weight rises linearly from 0 at the first step to bottleneck_kl at this step (scVI's
    # KL warm-up: the decoder learns to read the cells before the prior pulls them together); 0: none.
    kl_warmup_steps: int = 0
    # The count loss's cost in training: 0 sums it over every measured gene (its cost follows the
    # vocabulary); K > 0 takes each cell's expressed genes and about K of its zero-count genes,
    # weighted so that the sum over zeros is estimated without bias (`sampled_count_nll`).
    # Validation always sums over every measured gene.
    count_zero_samples: int = 0
    # With count_zero_samples: the softmax's normaliser from the same sample too, so no unsampled
    # gene's logit is computed (an unbiased normaliser; the log of it is biased, less as K grows).
    count_sampled_share: bool = False
    # Invariance: two random subsets of a cell's tokens must give embeddings that pick each other
    # out of the batch (InfoNCE on projected mean latents).
    contrastive_weight: float = 0.0
    contrastive_keep: float = 0.5  # fraction of a cell's tokens in each view
    contrastive_temperature: float = 0.1

    def __post_init__(self) -> None:
        if self.count_sampled_share and not self.count_zero_samples:
            raise ValueError("count_sampled_share needs count_zero_samples > 0 (the sample it estimates from)")
        if min(self.value_weight, self.detection_weight, self.contrastive_weight, self.count_weight,
               self.bottleneck_kl, self.count_zero_samples) < 0:
            raise ValueError("objective weights and count_zero_samples must be >= 0")
        if self.kl_warmup_steps < 0:
            raise ValueError(f"kl_warmup_steps must be >= 0, got {self.kl_warmup_steps}")
        if self.kl_warmup_steps and not self.bottleneck_kl:
            raise ValueError("kl_warmup_steps needs bottleneck_kl > 0 (the KL weight it warms up to)")
        if not 0 < self.contrastive_keep <= 1 or self.contrastive_temperature <= 0:
            raise ValueError("contrastive_keep must be in (0, 1] and contrastive_temperature > 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Preset:
    """Overrides of each config's defaults."""

    architecture: dict
    tokenizer: dict = dataclasses.field(default_factory=dict)
    objectives: dict = dataclasses.field(default_factory=dict)
    training: dict = dataclasses.field(default_factory=dict)  # TrainingConfig defaults of the preset
    n_top_genes: int = 0  # vocabulary: the most variable genes of the training cells (0: all genes)


PRESETS: dict[str, Preset] = {
    # The released configuration of the original Exceiver (Connell et al. 2022).
    "paper": Preset(architecture=dict(gene_dim=4, n_latents=128, latent_dim=4, n_layers=8, n_heads=4, cross_heads=4,
                                      ff_dim=2048, cross_ff_mult=1, head_hidden=1)),
    # Chosen per CPU-minute against scVI and PCA (docs/presets.md, benchmarks/efficiency.py): the
    # 2,000 most variable genes, log-normalised token values, at most 256 tokens per cell in a
    # training step, and the whole cell's counts decoded from a 16-wide cell bottleneck that reads
    # every latent; the masked-value head reads detached latents.
    "default": Preset(
        architecture=dict(gene_dim=32, n_latents=16, latent_dim=64, n_layers=2, n_heads=4, cross_heads=4, ff_dim=128,
                          cross_ff_mult=4, gene_bias=True, class_hidden=64, bottleneck_dim=16,
                          bottleneck_input="flatten", count_hidden=128),
        tokenizer=dict(train_tokens=256, values="log"),
        objectives=dict(count_weight=1.0, value_detach=True),
        training=dict(learning_rate=2e-3, weight_decay=1e-4, warmup_steps=50),
        n_top_genes=2000,
    ),
}

# Settings a continued run (`init`) may change: how the cell bottleneck is regularised and how
# batches condition the count decoder (integrating a pretrained model's cells with scVI's
# objective). Switched on, each adds a head that starts fresh (the log-variance head, batch tables)
# or reweighs the loss, and every pretrained weight is carried; switched off, the base's head for
# it is left behind.
INIT_SETTINGS = ("bottleneck_variance", "bottleneck_kl", "kl_warmup_steps", "batch_injection")

# Fields a user may set (`--set FIELD=VALUE`): derived ones (sizes from the data, heads from the
# objectives, the original's computation) are not theirs to set.
DERIVED = ("n_genes", "n_classes", "class_input", "detection_head", "projection_head", "count_head", "all_genes", "count_targets")
CONFIGS = (ExceiverConfig, TokenizerConfig, ObjectiveConfig)


def settable_fields() -> dict[str, type]:
    """Every settable field of the three configs, with its type (the names are distinct)."""
    return {f.name: type(getattr(cls(), f.name)) for cls in CONFIGS for f in dataclasses.fields(cls)
            if f.name not in DERIVED}


def pretraining_configs(preset: str = "default", n_genes: int = 0,
                        **overrides) -> tuple[ExceiverConfig, TokenizerConfig, ObjectiveConfig]:
    """The three configs of a pretraining run: a preset with overrides of any settable field; the
    heads follow the objectives that train them. Raises ValueError on anything impossible."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if overrides.get("n_classes"):
        raise ValueError("pretraining has no labels: leave n_classes at 0 and use finetune() for a classifier")
    unknown = sorted(set(overrides) - set(settable_fields()))
    if unknown:
        raise ValueError(f"unknown or derived fields {unknown}; settable: {sorted(settable_fields())}")
    chosen = PRESETS[preset]
    parts = []
    for cls, defaults in zip(CONFIGS, (chosen.architecture, chosen.tokenizer, chosen.objectives)):
        names = {f.name for f in dataclasses.fields(cls)}
        parts.append({**defaults, **{k: v for k, v in overrides.items() if k in names}})
    # Paper-compatible models see every measured gene as a token, as the original release did.
    objectives = ObjectiveConfig(**parts[2])
    tokenizer = TokenizerConfig(**parts[1], all_genes=bool(parts[0].get("paper_compatible")),
                                count_targets=objectives.count_weight > 0)
    check_bottleneck_settings(parts[0].get("bottleneck_variance", "unit"), objectives)
    if objectives.detection_weight and not tokenizer.zero_query_ratio:
        raise ValueError("detection_weight > 0 needs zero_query_ratio > 0 (zero genes to detect)")
    architecture = ExceiverConfig(**parts[0], n_genes=n_genes, detection_head=objectives.detection_weight > 0,
                                  projection_head=objectives.contrastive_weight > 0,
                                  count_head=objectives.count_weight > 0)
    return architecture, tokenizer, objectives


def check_bottleneck_settings(bottleneck_variance: str, objectives: ObjectiveConfig) -> None:
    """The bottleneck's variance and the objectives that train it, checked together (fresh and
    continued runs); raises ValueError."""
    if bottleneck_variance == "learned" and not objectives.bottleneck_kl:
        raise ValueError("bottleneck_variance 'learned' needs bottleneck_kl > 0 (without its KL the variance "
                         "would shrink to nothing)")


def from_dict(cls, values: dict, where: str):
    """A config from a model folder's JSON, refusing unknown fields with a ModelFileError."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ModelFileError(f"{where}: unknown {cls.__name__} fields {unknown}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ModelFileError(f"{where}: invalid {cls.__name__} ({err})") from err
