"""Exceiver: a single-cell gene expression language model (Connell, Khan & Keiser, 2022).

Sparse gene tokens (expressed genes only) -> Perceiver IO encoder, latent processor and query
decoder, pretrained on raw counts in AnnData. Layers, in the direction data flows: `exceiver.data`
(vocabulary, counts, tokens, batches) -> `exceiver.nn` (network, objectives) -> `exceiver.train`
(plans, the training driver) -> `exceiver.model` (the user-facing `Exceiver`), `pretrain`,
`finetune`, and the tools of `exceiver.tl`.

The public names below are imported on first use: `import exceiver` (and `exceiver --help`) stays
instant, and torch, Lightning and scanpy load with the first name that needs them.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING

from exceiver.lazy import lazy_exports
from exceiver.version import __version__

if TYPE_CHECKING:
    from exceiver.data.vocab import GeneVocab
    from exceiver.errors import ExceiverInputError, ModelFileError
    from exceiver.finetune import finetune
    from exceiver.model import Exceiver, import_original
    from exceiver.nn.config import ExceiverConfig
    from exceiver.pretrain import pretrain
    from exceiver.train.config import TrainingConfig
    from exceiver import evaluate, tl

_EXPORTS = {
    "Exceiver": "exceiver.model", "ExceiverConfig": "exceiver.nn.config", "ExceiverInputError": "exceiver.errors",
    "GeneVocab": "exceiver.data.vocab", "ModelFileError": "exceiver.errors", "TrainingConfig": "exceiver.train.config",
    "finetune": "exceiver.finetune", "import_original": "exceiver.model", "pretrain": "exceiver.pretrain",
    "tl": "exceiver.tl", "evaluate": "exceiver.evaluate",
}
__all__ = sorted([*_EXPORTS, "__version__"])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


class _Package(types.ModuleType):
    """`exceiver.pretrain` and `exceiver.finetune` are the functions, though modules of the same
    names exist: importing such a module binds it on the package, and this binds its function."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("pretrain", "finetune") and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
