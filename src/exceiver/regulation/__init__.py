"""Gene regulation from a pretrained model: imputation, in-silico perturbation, gene-gene dependencies.

Every output is on the log-normalised scale (log1p of counts scaled to 1e4 per cell): model values
are mapped back through the scaler (value - 1 -> z-score -> log1p).
"""

from exceiver.regulation.dependency import GeneDependencies, attention_routes, gene_dependencies, plot_dependencies
from exceiver.regulation.imputation import impute
from exceiver.regulation.perturbation import perturb

__all__ = ["GeneDependencies", "attention_routes", "gene_dependencies", "impute", "perturb", "plot_dependencies"]
