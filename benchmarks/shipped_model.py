"""The recipe of the pretrained human+mouse model that ships with exceiver: the `default` preset on
every real dataset of the shared folder, human files as they are and mouse files through the
Ensembl human-mouse ortholog table, on protein-coding genes (the most variable of them).

A long run (hours on a CPU core): it checkpoints every 10 minutes, so an interrupted run (a
session's end, SIGTERM) continues with `--resume` and finishes as the uninterrupted run would.
`--package` then writes the model into the package (src/exceiver/models/NAME/): weights as
float16, the ortholog pairs of its vocabulary (so mouse data is translated without the table),
checksums; and measures what float16 costs: the embeddings of every training file by the float32
and the float16 weights, compared (`float16` in its metrics.json, quoted by docs/models.md).

    EXCEIVER_SHARED=../shared python benchmarks/shipped_model.py --out shipped/human-mouse-small \
        --hours 2 [--resume]
    EXCEIVER_SHARED=../shared python benchmarks/shipped_model.py --out shipped/human-mouse-small --package

Recipes (`--name`): `human-mouse-small` (the shipped model: 4,000 most variable genes, every file
but pbmc_small) and `human-mouse-base` (its successor, docs/base_model_plan.md: every protein-coding
gene the training files measure, the plan's held-out files never read, the variant chosen by
benchmarks/base_recipe.py, kept weights and stopping following the embedding's cell-type kNN on a
labelled training file).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from common import (BASE_HELD_OUT, ORTHOLOGS, PROTEIN_CODING_GENES, benchmark_parser, read_result, shared_folder,
                    write_result)
from exceiver import Exceiver, pretrain
from exceiver.data.genemap import GenePairs
from exceiver.inference import cell_embedding
from exceiver.shipped import write_checksums


# benchmarks/base_recipe.py, 8 epochs per variant on the training files (docs/base_recipe_results.json),
# mean kNN macro-F1 on the four labelled training files: full vocabulary 0.499; rank tokens 0.627,
# variable 0.598, bottleneck 32 0.540, 64 0.529, dropout 0.520, cheap counts 0.460, 128 tokens 0.479;
# rank + bottleneck 32 0.628 (the best), + dropout 0.609, + cheap counts 0.596.
BASE_MODEL = {"token_selection": "rank", "bottleneck_dim": 32}


@dataclass(frozen=True)
class Recipe:
    """What a shipped model is trained on and with."""

    left_out: frozenset[str]  # files never read
    n_top_genes: int  # 0: every protein-coding gene the training files measure
    model: dict = field(default_factory=dict)  # overrides of the default preset
    monitor: str | None = None  # a labelled training file whose embedding the run follows
    val_every_steps: int | None = None


RECIPES = {
    # pbmc_small is 80 cells of pbmc3k: left out, so that no cell is seen twice.
    "human-mouse-small": Recipe(frozenset({"pbmc_small_seuratobject_80"}), 4000),
    "human-mouse-base": Recipe(frozenset(BASE_HELD_OUT), 0, model=BASE_MODEL,
                               monitor="joost2016_mouse_skin_epidermis_720", val_every_steps=1000),
}


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--package", action="store_true", help="write the trained model into the package")
    parser.add_argument("--name", default="human-mouse-small", choices=list(RECIPES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    shared, recipe = shared_folder(), RECIPES[args.name]
    files = sorted(p for p in (shared / "data").glob("*.h5ad") if p.stem not in recipe.left_out)
    if args.package:
        trained_as = read_result(args.out.parent / f"{args.out.name}.recipe.json", {}).get("name")
        if trained_as != args.name:  # the files read and the folder written follow the name
            raise SystemExit(f"{args.out} was trained as {trained_as!r}, not {args.name!r}: pass --name {trained_as}")
        package(args.out, Path(__file__).resolve().parents[1] / "src" / "exceiver" / "models" / args.name, files,
                shared / ORTHOLOGS)
        return
    monitor = {} if recipe.monitor is None else {
        "monitor_data": shared / "data" / f"{recipe.monitor}.h5ad", "monitor_label_key": "cell_type",
        "monitor": "embedding", "val_every_steps": recipe.val_every_steps}
    model = pretrain(files, args.out, model=recipe.model, genes=shared / PROTEIN_CODING_GENES,
                     n_top_genes=recipe.n_top_genes, gene_key="gene_symbol", gene_map=shared / ORTHOLOGS,
                     max_minutes=args.hours * 60, max_epochs=100_000, patience=100_000, seed=args.seed,
                     checkpoint_minutes=10, resume=args.resume, progress=False, **monitor)
    write_result({"name": args.name, "files": describe(files), "recipe": {**dataclasses.asdict(recipe), "left_out": sorted(recipe.left_out)},
                  "hours": args.hours, "seed": args.seed, "metrics": model.metrics},
                 args.out.parent / f"{args.out.name}.recipe.json")
    print(model, model.metrics["val_mse_ratio"])


def describe(files: list[Path]) -> list[dict]:
    """Each training file: cells, genes, species and the licence and source its provenance states
    (the model card's data table)."""
    rows = []
    for path in files:
        adata = ad.read_h5ad(path, backed="r")
        provenance = adata.uns.get("provenance", "")
        if isinstance(provenance, dict):
            licence, source = provenance.get("license", "none stated"), provenance.get("repo", "")
        else:
            text = str(provenance)
            match = re.search(r"licen[cs]e=([^;]+)", text, flags=re.I) or re.search(r"\((MIT|GPL[^)]*)\)", text)
            licence = match.group(1).strip() if match else "none stated"
            repo = re.search(r"repo=([^;]+)", text) or re.search(r"GitHub (\S+)", text)
            source = repo.group(1).strip() if repo else text.split("(")[0].split(":")[0].strip()
        species = adata.obs["species"].astype(str).value_counts().to_dict() if "species" in adata.obs else {}
        licence = re.sub(r"^licen[cs]e:\s*", "", str(licence), flags=re.I)  # "License: GPL (>= 3)" -> "GPL (>= 3)"
        rows.append({"file": path.name, "cells": adata.n_obs, "genes": adata.n_vars, "species": species,
                     "licence": licence, "source": str(source)})
        adata.file.close()
    return rows


def package(trained: Path, folder: Path, files: list[Path], orthologs: Path) -> None:
    """The trained model as package data: float16 weights, the ortholog pairs of its vocabulary,
    checksums; `float16` in metrics.json: the embeddings of every training file by both weights."""
    model = Exceiver.load(trained)
    model.contract = dataclasses.replace(model.contract, gene_map=GenePairs.of(orthologs).within(model.vocab.genes))
    full = {k: v.clone() for k, v in model.module.state_dict().items()}
    model.module.half()
    half_state = {k: v.clone() for k, v in model.module.state_dict().items()}
    model.module.float()
    comparison = []
    for path in files:
        cells = model.read(ad.read_h5ad(path), empty="drop", name=path.stem)  # the cells the model can read
        model.module.load_state_dict(full)
        x32 = cell_embedding(model, cells, progress=False)
        model.module.load_state_dict(half_state)  # float16 values in the float32 network: what loading does
        x16 = cell_embedding(model, cells, progress=False)
        cosine = (x32 * x16).sum(1) / (np.linalg.norm(x32, axis=1) * np.linalg.norm(x16, axis=1) + 1e-12)
        comparison.append({"file": path.stem, "cells": cells.n_cells, "min_cosine": float(cosine.min()),
                           "max_abs_difference": float(np.abs(x32 - x16).max()),
                           "embedding_scale": float(np.abs(x32).mean())})
        print(comparison[-1], flush=True)
    model.metrics["float16"] = {
        "weights": "stored as float16, computed in float32",
        "min_cosine_float32_vs_float16": min(c["min_cosine"] for c in comparison),
        "max_abs_difference": max(c["max_abs_difference"] for c in comparison), "files": comparison}
    model.metrics["training_files"] = describe(files)
    model.module.half()
    with torch.no_grad():
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists():  # this script's own output: the package's copy of the model
            for p in folder.iterdir():
                p.unlink()
        else:
            folder.mkdir()
        model.write(folder)
    for p in folder.iterdir():  # package data, readable by everyone (safetensors writes private files)
        p.chmod(0o644)
    write_checksums(folder)
    print(f"packaged {folder}: {sum(p.stat().st_size for p in folder.iterdir()) / 1e6:.1f} MB; "
          f"min cosine float32 vs float16 {model.metrics['float16']['min_cosine_float32_vs_float16']:.6f}")


if __name__ == "__main__":
    main()
