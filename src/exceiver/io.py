"""Model folders on disk, atomic outputs, and results streamed into a copy of an `.h5ad` file.

A model folder holds `config.json`, `model.safetensors`, `genes.txt` (the vocabulary),
`scaler.safetensors` (per-gene statistics) and `metrics.json`. Nothing is pickled, so a shared
model cannot run code on load. Every output is written under a temporary name and renamed into
place, so a failure never leaves a partial output behind.

`config.json` format 2 holds one section per config (`architecture`, `tokenizer`, `objectives`,
`training`, and `data`: the gene key and layer the model was trained with); format 1 (one `model`
section mixing them, before exceiver 0.2) is migrated on load.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from exceiver.data.preprocess import GeneScaler
from exceiver.data.vocab import GeneVocab
from exceiver.errors import ExceiverInputError, ModelFileError, option

FORMAT = "exceiver-model"
FORMAT_VERSION = 2
CONFIG, WEIGHTS, GENES, SCALER, METRICS = (
    "config.json", "model.safetensors", "genes.txt", "scaler.safetensors", "metrics.json",
)
SCALER_ARRAYS = ("mean", "std", "n_cells", "expressed_mean", "n_expressed")


def check_output_dir(path: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse an output folder that would clobber something: a file, or (without `overwrite`) a
    folder that is not empty."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ExceiverInputError(f"{path} is a file; the output must be a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ExceiverInputError(f"{path} already exists and is not empty; choose another output or pass "
                                 f"{option('overwrite', True)}")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it becomes `path` only if the block succeeds."""
    path = check_output_dir(path, overwrite=overwrite)
    with _new_parents(path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
        try:
            yield tmp
            _share(tmp)
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old)
            else:
                tmp.rename(path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


@contextlib.contextmanager
def _new_parents(path: Path) -> Iterator[None]:
    """Create the missing parent folders of `path`, and remove them again if the block fails."""
    missing = [p for p in reversed(path.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in reversed(missing):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        raise


def _share(folder: Path) -> None:
    """Give staged outputs the permissions of normally created files (temp files are private)."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [folder, *folder.rglob("*")]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_file(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; it replaces `path` only if the block succeeds
    (an existing file only with `overwrite`)."""
    path = Path(path)
    if path.is_dir():
        raise ExceiverInputError(f"{path} is a folder; the output must be a file")
    if path.exists() and not overwrite:
        raise ExceiverInputError(f"{path} already exists; choose another output or pass {option('overwrite', True)}")
    with _new_parents(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            _share(Path(tmp))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def write_h5ad(adata: ad.AnnData, path: str | Path, *, overwrite: bool = False) -> None:
    """Write an AnnData to `path` atomically; an existing file is replaced only with `overwrite`."""
    with atomic_file(path, overwrite=overwrite) as tmp:
        adata.write_h5ad(tmp)


def write_csv(table: pd.DataFrame, path: str | Path, *, overwrite: bool = False, index: bool = False) -> None:
    """Write a table to `path` atomically, as write_h5ad does."""
    with atomic_file(path, overwrite=overwrite) as tmp:
        table.to_csv(tmp, index=index)


def write_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def save_model_files(folder: Path, *, config: dict, state_dict: dict[str, torch.Tensor],
                     vocab: GeneVocab, scaler: GeneScaler, metrics: dict) -> None:
    """Write the files of a model folder into an existing folder."""
    write_json({"format": FORMAT, "format_version": FORMAT_VERSION, **config}, folder / CONFIG)
    save_torch({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, folder / WEIGHTS,
               metadata={"format": FORMAT})
    vocab.save(folder / GENES)
    save_numpy(
        {name: np.ascontiguousarray(getattr(scaler, name)) for name in SCALER_ARRAYS},
        str(folder / SCALER),
        metadata={"format": FORMAT, "target_sum": repr(scaler.target_sum),
                  "max_value": repr(scaler.max_value), "standardise": str(int(scaler.standardise))},
    )
    write_json(metrics, folder / METRICS)


def load_model_files(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor], GeneVocab, GeneScaler, dict]:
    """Read and check a model folder: (config, state_dict, vocab, scaler, metrics)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFileError(f"model folder {folder} does not exist or is not a folder")
    for name in (CONFIG, WEIGHTS, GENES, SCALER):
        if not (folder / name).is_file():
            raise ModelFileError(f"model folder {folder} lacks {name}; is it an exceiver model folder?")
    config = _read_json(folder / CONFIG)
    if config.pop("format", None) != FORMAT:
        raise ModelFileError(f"{folder / CONFIG} was not written by exceiver (no 'format': '{FORMAT}')")
    version = config.pop("format_version", None)
    if version == 1:
        config = _migrate_format_1(config, folder / CONFIG)
    elif version != FORMAT_VERSION:
        raise ModelFileError(f"{folder / CONFIG} has format version {version}; this exceiver reads 1 and {FORMAT_VERSION}")
    try:
        state_dict = load_torch(folder / WEIGHTS)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{folder / WEIGHTS} is corrupt or truncated ({err})") from err
    try:
        vocab = GeneVocab.load(folder / GENES)
    except (ExceiverInputError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{folder / GENES} is not a valid gene list: {err}") from err
    scaler = _load_scaler(folder / SCALER)
    if len(scaler) != len(vocab):
        raise ModelFileError(f"{folder / SCALER} has statistics for {len(scaler):,} genes, "
                             f"{folder / GENES} lists {len(vocab):,}")
    metrics = _read_json(folder / METRICS) if (folder / METRICS).is_file() else {}
    return config, state_dict, vocab, scaler, metrics


# Options of format 1 that the embedding study refuted and exceiver 0.2 retired, with the value
# that means "not used" (docs/evaluation.md has their numbers).
RETIRED = {"cell_query": False, "depth_tokens": False, "value_encoding": "zscore"}
_TOKENIZER_1 = ("max_tokens", "mask_fraction", "zero_query_ratio")
_OBJECTIVES_1 = ("detection_weight", "contrastive_weight", "contrastive_keep", "contrastive_temperature")


def _migrate_format_1(config: dict, path: Path) -> dict:
    """Format 1's single `model` section -> the architecture (heads declared by the objectives
    that had them), tokenizer and objectives sections of format 2."""
    model = config.pop("model", None)
    if not isinstance(model, dict):
        raise ModelFileError(f"{path} has no 'model' section")
    used = {k: model[k] for k, off in RETIRED.items() if k in model and model[k] != off}
    if used:
        raise ModelFileError(f"{path}: the model was pretrained with retired options {used} (removed in "
                             "exceiver 0.2 after the embedding study refuted them); load it with exceiver 0.1")
    model = {k: v for k, v in model.items() if k not in RETIRED}
    tokenizer = {k: model.pop(k) for k in _TOKENIZER_1 if k in model}
    objectives = {k: model.pop(k) for k in _OBJECTIVES_1 if k in model}
    tokenizer["all_genes"] = bool(model.get("paper_compatible", False))
    model["detection_head"] = objectives.get("detection_weight", 0) > 0
    model["projection_head"] = objectives.get("contrastive_weight", 0) > 0
    return {**config, "architecture": model, "tokenizer": tokenizer, "objectives": objectives}


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{path} is corrupt: not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise ModelFileError(f"{path} is corrupt: expected a JSON object")
    return value


def _load_scaler(path: Path) -> GeneScaler:
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            missing = [name for name in SCALER_ARRAYS if name not in f.keys()]
            if missing or metadata.get("format") != FORMAT:
                raise ModelFileError(f"{path} is not an exceiver scaler (missing {missing or 'format'})")
            arrays = {name: f.get_tensor(name) for name in SCALER_ARRAYS}
        scaler = GeneScaler(**arrays, target_sum=float(metadata["target_sum"]),
                            max_value=float(metadata["max_value"]),
                            standardise={"1": True, "0": False}[metadata.get("standardise", "1")])  # older: z-scores
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise ModelFileError(f"{path} is corrupt or truncated ({err})") from err
    if len({len(a) for a in arrays.values()}) != 1:
        raise ModelFileError(f"{path} is corrupt: its arrays have different lengths")
    if not all(np.isfinite(a).all() for a in arrays.values()) or (scaler.std <= 0).any():
        raise ModelFileError(f"{path} is corrupt: non-finite values or non-positive standard deviations")
    return scaler


class ObsmWriter:
    """Callable writing rows of an `obsm` array (rows need not arrive in order), and `uns`."""

    def __init__(self, file: h5py.File, key: str, shape: tuple[int, int]):
        self.file, self.key = file, key
        obsm = file.require_group("obsm")
        if key in obsm:
            del obsm[key]
        self.array = obsm.create_dataset(key, shape=shape, dtype=np.float32,
                                         chunks=(max(1, min(shape[0], 4096)), max(1, shape[1])))
        self.array.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        self.written = np.zeros(shape[0], dtype=bool)

    def __call__(self, rows: np.ndarray, values: np.ndarray) -> None:
        order = np.argsort(rows)  # h5py writes selections of increasing rows
        self.array[rows[order]] = values[order]
        self.written[rows] = True

    def uns(self, entry: dict) -> None:
        """Set `uns["exceiver"][key]` (other entries of `uns["exceiver"]` are kept)."""
        uns = self.file.require_group("uns")
        exceiver = ad.io.read_elem(uns["exceiver"]) if "exceiver" in uns else {}
        exceiver[self.key] = entry
        if "exceiver" in uns:
            del uns["exceiver"]
        ad.io.write_elem(uns, "exceiver", exceiver)


@contextlib.contextmanager
def h5ad_copy_with_obsm(source: str | Path, out: str | Path, key: str, shape: tuple[int, int], *,
                        overwrite: bool = False) -> Iterator[ObsmWriter]:
    """Yield a writer of `obsm[key]` into a staged copy of `source` that becomes `out` only if the
    block succeeds and every row was written."""
    with atomic_file(out, overwrite=overwrite) as tmp:
        shutil.copyfile(source, tmp)
        with h5py.File(tmp, "r+") as file:
            writer = ObsmWriter(file, key, shape)
            yield writer
            missing = int((~writer.written).sum())
            if missing:
                raise RuntimeError(f"{missing:,} of {shape[0]:,} cells were not written")
