"""Exceiver: a single-cell gene expression language model (Connell, Khan & Keiser, 2022).

Sparse gene tokens (expressed genes only) -> Perceiver IO encoder, latent processor and query
decoder, pretrained on raw counts in AnnData. Layers, in the direction data flows: `exceiver.data`
(vocabulary, counts, tokens, batches) -> `exceiver.nn` (network, objectives) -> `exceiver.train`
(plans, the training driver) -> `exceiver.model` (the user-facing `Exceiver`), `pretrain`,
`finetune`, and the tools of `exceiver.tl`.
"""

from exceiver.data.vocab import GeneVocab
from exceiver.errors import ExceiverInputError, ModelFileError
from exceiver.finetune import finetune
from exceiver.model import Exceiver, import_original
from exceiver.nn.config import ExceiverConfig
from exceiver.pretrain import pretrain
from exceiver.train.config import TrainingConfig
from exceiver.version import __version__

__all__ = [
    "Exceiver", "ExceiverConfig", "ExceiverInputError", "GeneVocab", "ModelFileError",
    "TrainingConfig", "__version__", "finetune", "import_original", "pretrain",
]
