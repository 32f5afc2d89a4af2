"""How cells become tokens and queries (`TokenizerConfig`): plain settings, apart from the
tokenizer itself so that reading them (the command line's `--set`) does not import torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Which of a cell's expressed genes become tokens when it has more than the cap (see `token_selection`).
TOKEN_SELECTIONS = ("random", "rank", "variable")


@dataclass(frozen=True)
class TokenizerConfig:
    """How cells become tokens and queries; saved with a model, since inference must tokenize as
    training did."""

    max_tokens: int = 4096  # expressed genes per cell beyond this are subsampled
    # Tokens a cell contributes to one training step (0: max_tokens): a fresh random subset each
    # step when it expresses more. Training cost follows it; inference keeps max_tokens.
    train_tokens: int = 0
    mask_fraction: float = 0.15  # fraction of a cell's expressed genes masked in pretraining
    zero_query_ratio: float = 0.0  # zero-count genes queried per masked gene (0: off)
    all_genes: bool = False  # every measured gene is a token, as in the original release
    count_targets: bool = False  # training batches carry each cell's raw counts (the count objective)
    # Token values: "zscore" (the paper's: log-normalised expression z-scored per gene, clipped at
    # 10, plus 1) or "log" (log-normalised expression itself: a rare gene's token does not outweigh
    # a common one's by up to 10x). The fitted GeneScaler carries it to inference.
    values: str = "zscore"
    # Which expressed genes a cell keeps when it has more than the cap (masks are then drawn among
    # them): "random" (uniformly), "rank" (Geneformer's: its highest expression relative to the
    # gene's median over the training cells that express it, so that housekeeping genes yield to
    # the cell's distinctive ones) or "variable" (training: drawn with weights of the genes'
    # normalised dispersion; inference: the most variable). The fitted GeneScaler has the statistics.
    # The choice binds only above a cap: `train_tokens` in training, `max_tokens` (4,096) at inference,
    # where most cells keep every expressed gene, low-ranked ones included.
    token_selection: str = "random"

    def __post_init__(self) -> None:
        if self.values not in ("zscore", "log"):
            raise ValueError(f"values must be 'zscore' or 'log', got {self.values!r}")
        if self.token_selection not in TOKEN_SELECTIONS:
            raise ValueError(f"token_selection must be one of {TOKEN_SELECTIONS}, got {self.token_selection!r}")
        if self.all_genes and self.token_selection != "random":  # no cap there: every measured gene is a token
            raise ValueError("token_selection applies to capped tokens; paper mode makes every measured gene a token")
        if self.max_tokens < 1 or self.train_tokens < 0:
            raise ValueError(f"max_tokens must be >= 1 and train_tokens >= 0, got {self.max_tokens}, "
                             f"{self.train_tokens}")
        if not 0.0 <= self.mask_fraction < 1.0:
            raise ValueError(f"mask_fraction must be in [0, 1), got {self.mask_fraction}")
        if self.zero_query_ratio < 0:
            raise ValueError(f"zero_query_ratio must be >= 0, got {self.zero_query_ratio}")
        if self.all_genes and self.zero_query_ratio > 0:  # zero genes are tokens there: no leak allowed
            raise ValueError("zero-gene queries are not available when every measured gene is a token (paper mode)")

    def to_dict(self) -> dict:
        return asdict(self)

    def token_cap(self, masked: bool) -> int:
        """Tokens per cell: `train_tokens` in training steps (masked batches), else `max_tokens`."""
        return (self.train_tokens or self.max_tokens) if masked else self.max_tokens
