"""Pretrained models that ship inside the package, opened by name (`Exceiver.pretrained`, and
every command that takes MODEL_DIR): nothing is ever downloaded.

A shipped model is an ordinary model folder under `exceiver/models/NAME/` (weights stored as
float16 where docs/models.md shows that the loss of precision does not matter; they are float32
once loaded) with `checksums.json`: the SHA-256 of each of its files, checked at every load, so a
damaged installation is refused in one line instead of giving wrong embeddings. The recipe that
trained each model is `benchmarks/shipped_model.py`; its card is docs/models.md.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

from exceiver.errors import ExceiverInputError, ModelFileError

CHECKSUMS = "checksums.json"
# The model `Exceiver.pretrained()` opens when no name is given: the best cell embedding that ships
# (human-mouse-base knows every gene, but embeds cells less well: docs/models.md).
DEFAULT_MODEL = "human-mouse-small"
# Retired shipped models and the name of their successor (named in the refusal).
RETIRED: dict[str, str] = {}


def _models_root() -> Path:
    return Path(str(resources.files("exceiver") / "models"))


def shipped_names() -> list[str]:
    """The names of the models that ship with this installation."""
    root = _models_root()
    return sorted(p.name for p in root.iterdir() if (p / CHECKSUMS).is_file()) if root.is_dir() else []


def is_shipped_name(reference: str | Path) -> bool:
    """Whether `reference` names a shipped (or retired) model rather than a folder (an existing
    folder of that name wins: a user's own `human-mouse-small/` is theirs)."""
    text = str(reference)
    return (text in shipped_names() or text in RETIRED) and not Path(text).exists()


def shipped_folder(name: str) -> Path:
    """The folder of the shipped model `name`, its files checked against their checksums."""
    names = shipped_names()
    if name in RETIRED and name not in names:
        raise ExceiverInputError(f"the shipped model {name!r} was retired: use its successor {RETIRED[name]!r} "
                                 f"(Exceiver.pretrained({RETIRED[name]!r}), or that name wherever a model is taken)")
    if name not in names:
        raise ExceiverInputError(f"no shipped model is named {name!r}; shipped: {', '.join(names) or 'none'}")
    folder = _models_root() / name
    try:
        expected = json.loads((folder / CHECKSUMS).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelFileError(f"shipped model {name}: {CHECKSUMS} is unreadable ({err}); reinstall exceiver") from err
    for file, digest in expected.items():
        path = folder / file
        if not path.is_file() or sha256(path) != digest:
            raise ModelFileError(f"shipped model {name}: {file} is missing or fails its checksum "
                                 "(a damaged installation); reinstall exceiver")
    return folder


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path) -> dict[str, str]:
    """Record the SHA-256 of every file of a model folder (what `shipped_folder` checks)."""
    digests = {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    (folder / CHECKSUMS).write_text(json.dumps(digests, indent=1) + "\n", encoding="utf-8")
    return digests
