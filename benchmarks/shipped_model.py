"""The recipe of the pretrained human+mouse model that ships with exceiver: the `default` preset on
every real dataset of the shared folder, human files as they are and mouse files through the
Ensembl human-mouse ortholog table, on protein-coding genes (the most variable of them).

A long run (hours on a CPU core): it checkpoints every 10 minutes, so an interrupted run (a
session's end, SIGTERM) continues with `--resume` and finishes as the uninterrupted run would.

    EXCEIVER_SHARED=../shared python benchmarks/shipped_model.py --out shipped/human-mouse-small \
        --hours 2 [--resume]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import anndata as ad

from exceiver import pretrain

# pbmc_small is 80 cells of pbmc3k: left out, so that no cell is seen twice.
LEFT_OUT = {"pbmc_small_seuratobject_80"}
N_TOP_GENES = 4000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    shared = Path(os.environ.get("EXCEIVER_SHARED", "../shared"))
    files = sorted(p for p in (shared / "data").glob("*.h5ad") if p.stem not in LEFT_OUT)
    model = pretrain(files, args.out, genes=shared / "genes" / "protein_coding_genes_hgnc.txt",
                     n_top_genes=N_TOP_GENES, gene_key="gene_symbol",
                     gene_map=shared / "genes" / "human_mouse_orthologs_ensembl105.csv",
                     max_minutes=args.hours * 60, max_epochs=100_000, patience=100_000, seed=args.seed,
                     checkpoint_minutes=10, resume=args.resume, progress=False)
    species = {p.stem: str(ad.read_h5ad(p, backed="r").obs["species"].iloc[0]) if "species" in ad.read_h5ad(p, backed="r").obs else "unknown" for p in files}
    (args.out.parent / f"{args.out.name}.recipe.json").write_text(json.dumps(
        {"files": [p.name for p in files], "species": species, "n_top_genes": N_TOP_GENES, "hours": args.hours,
         "seed": args.seed, "metrics": model.metrics}, indent=1) + "\n")
    print(model, model.metrics["val_mse_ratio"])


if __name__ == "__main__":
    main()
