"""Exceiver: a single-cell gene expression language model (Connell, Khan & Keiser, 2022).

Sparse gene tokens (expressed genes only) -> Perceiver IO encoder, latent processor and query
decoder, pretrained by masked-expression prediction on raw counts in AnnData.
"""

__version__ = "0.1.0"

from exceiver.api import Exceiver, pretrain  # noqa: E402
from exceiver.errors import ExceiverInputError, ModelFileError  # noqa: E402
from exceiver.finetune import finetune  # noqa: E402
from exceiver.model import ExceiverConfig  # noqa: E402
from exceiver.original import import_original  # noqa: E402
from exceiver.train import TrainingConfig  # noqa: E402
from exceiver.vocab import GeneVocab  # noqa: E402

__all__ = [
    "Exceiver", "ExceiverConfig", "ExceiverInputError", "GeneVocab", "ModelFileError",
    "TrainingConfig", "__version__", "finetune", "import_original", "pretrain",
]
