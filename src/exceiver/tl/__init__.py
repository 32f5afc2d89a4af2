"""Tools that take a trained model explicitly (scanpy's `tl` style): imputation, in-silico
perturbation, gene-gene dependencies, and evaluation against baselines.

Imputed values and effects are on the log-normalised scale (log1p of counts scaled to 1e4 per
cell): model values are mapped back through the scaler (value - 1 -> z-score -> log1p).
"""

from exceiver.evaluate.report import evaluate
from exceiver.tl.dependency import (
           GeneDependencies,
           attention_routes,
           gene_dependencies,
           plot_dependencies,
)
from exceiver.tl.imputation import impute
from exceiver.tl.perturbation import perturb

__all__ = ["GeneDependencies", "attention_routes", "evaluate", "gene_dependencies", "impute", "perturb",
           "plot_dependencies"]
