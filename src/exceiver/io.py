"""Model folders on disk, and results written into `.h5ad` and CSV outputs (atomically and
safely: `exceiver.outputs`).

A model folder holds `config.json`, `model.safetensors`, `genes.txt` (the vocabulary),
`scaler.safetensors` (per-gene statistics), `metrics.json` and, for a model pretrained through a
gene map, `gene_map.csv` (its pairs for the vocabulary's genes). Nothing is pickled, so a shared
model cannot run code on load. Weights may be stored as float16 (shipped models); they load into
the float32 network.

`config.json` format 2 holds one section per config (`architecture`, `tokenizer`, `objectives`,
`training`, and `data`: the gene key and layer the model was trained with); format 1 (one `model`
section mixing them, before exceiver 0.2) is migrated on load.
"""

from __future__ import annotations

import contextlib
import json
import shutil
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

from exceiver.data.genemap import read_gene_map
from exceiver.data.preprocess import GeneScaler
from exceiver.data.vocab import GeneVocab
from exceiver.errors import ExceiverInputError, ModelFileError
from exceiver.outputs import atomic_file

FORMAT = "exceiver-model"
FORMAT_VERSION = 2
CONFIG, WEIGHTS, GENES, SCALER, METRICS, GENE_MAP = (
    "config.json", "model.safetensors", "genes.txt", "scaler.safetensors", "metrics.json", "gene_map.csv",
)
SCALER_ARRAYS = ("mean", "std", "n_cells", "expressed_mean", "n_expressed")
# Statistics a scaler may lack (fitted by an older exceiver, or imported): what needs them says so.
OPTIONAL_SCALER_ARRAYS = ("expressed_median",)


def write_h5ad(adata: ad.AnnData, path: str | Path, *, overwrite: bool = False) -> None:
    """Write an AnnData to `path` atomically; an existing file is replaced only with `overwrite`."""
    with atomic_file(path, overwrite=overwrite) as tmp:
        adata.write_h5ad(tmp)


def write_csv(table: pd.DataFrame, path: str | Path, *, overwrite: bool = False, index: bool = False) -> None:
    """Write a table to `path` atomically, as write_h5ad does; an existing file is replaced
    only if it is a table with the same columns (an earlier result of the same kind)."""
    header = ",".join(map(str, ([table.index.name or ""] if index else []) + list(table.columns)))

    def same_table(existing: Path) -> bool:
        with open(existing, encoding="utf-8", errors="replace") as f:
            return f.readline().rstrip("\r\n") == header

    with atomic_file(path, overwrite=overwrite, recognise=same_table) as tmp:
        table.to_csv(tmp, index=index)


def write_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def save_model_files(folder: Path, *, config: dict, state_dict: dict[str, torch.Tensor],
                     vocab: GeneVocab, scaler: GeneScaler, metrics: dict, gene_map: pd.DataFrame | None = None) -> None:
    """Write the files of a model folder into an existing folder."""
    write_json({"format": FORMAT, "format_version": FORMAT_VERSION, **config}, folder / CONFIG)
    save_torch({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, folder / WEIGHTS,
               metadata={"format": FORMAT})
    vocab.save(folder / GENES)
    save_numpy(
        {name: np.ascontiguousarray(getattr(scaler, name)) for name in SCALER_ARRAYS + OPTIONAL_SCALER_ARRAYS
         if getattr(scaler, name) is not None},
        str(folder / SCALER),
        metadata={"format": FORMAT, "target_sum": repr(scaler.target_sum),
                  "max_value": repr(scaler.max_value), "standardise": str(int(scaler.standardise))},
    )
    write_json(metrics, folder / METRICS)
    if gene_map is not None:
        gene_map.iloc[:, :2].to_csv(folder / GENE_MAP, index=False, header=False)


def load_model_files(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor], GeneVocab, GeneScaler, dict,
                                                  pd.DataFrame | None]:
    """Read and check a model folder: (config, state_dict, vocab, scaler, metrics, gene map or None)."""
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
    gene_map = None
    if (folder / GENE_MAP).is_file():
        try:
            gene_map = read_gene_map(folder / GENE_MAP)
        except ExceiverInputError as err:
            raise ModelFileError(f"{folder / GENE_MAP} is not a valid gene map: {err}") from err
    return config, state_dict, vocab, scaler, metrics, gene_map


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
            arrays = {name: f.get_tensor(name) for name in SCALER_ARRAYS + OPTIONAL_SCALER_ARRAYS if name in f.keys()}
        scaler = GeneScaler(**arrays, target_sum=float(metadata["target_sum"]),
                            max_value=float(metadata["max_value"]),
                            standardise={"1": True, "0": False}[metadata.get("standardise", "1")])  # older: z-scores
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise ModelFileError(f"{path} is corrupt or truncated ({err})") from err
    if len({len(a) for a in arrays.values()}) != 1:
        raise ModelFileError(f"{path} is corrupt: its arrays have different lengths")
    if not all(np.isfinite(a).all() for a in arrays.values()) or (scaler.std <= 0).any():
        raise ModelFileError(f"{path} is corrupt: non-finite values or non-positive standard deviations")
    if scaler.expressed_median is not None and (scaler.expressed_median <= 0).any():
        raise ModelFileError(f"{path} is corrupt: non-positive median expression")
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


def check_weights(module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Name what is missing, extra or misshapen in a weight file, in one readable line."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshapen = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
                 for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = [f"{len(items)} {what} (e.g. {', '.join(items[:3])})"
                for items, what in [(missing, "weights missing"), (unexpected, "unexpected weights"),
                                    (misshapen, "weights of the wrong shape (file vs config)")] if items]
    if problems:
        raise ModelFileError(f"{path} does not match config.json: {'; '.join(problems)}")
