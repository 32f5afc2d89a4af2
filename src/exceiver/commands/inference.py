"""The commands that run a model on cells: `embed`, `predict`, `impute`, `annotate` and `perturb`;
each command's options beside its settings (the Python function's keyword arguments) and handler."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from exceiver.commands.defaults import add, add_command, effective, given, of_function
from exceiver.commands.options import (add_data_options, add_device_options, add_inference_options, add_model,
                                       inference_settings)
from exceiver.errors import ExceiverInputError
from exceiver.outputs import claim

EMBED = "exceiver.model:Exceiver.embed_file"
PREDICT = "exceiver.model:Exceiver.predict"
IMPUTE = "exceiver.tl.imputation:impute"
ANNOTATE = "exceiver.tl.annotation:annotate"
PERTURB = "exceiver.tl.perturbation:perturb"
POOLINGS = ["bottleneck", "mean", "flatten"]
DEFAULT_POOLING = "the bottleneck where the model has one, else the mean"


def add_key(p: argparse.ArgumentParser, function: str, where: str) -> None:
    """--key: where the command writes its result (the function's `key_added`)."""
    add(p, "--key", help=where, shown=of_function(function, "key_added"))


@contextlib.contextmanager
def model_and_data(args: argparse.Namespace):
    """(model, dataset name, AnnData) of MODEL and DATA, read once OUT is claimed: refused now,
    not after the work."""
    from exceiver.data.sources import read_datasets
    from exceiver.model import Exceiver

    with claim(args.out, overwrite=args.overwrite, folder=False):
        model = Exceiver.load(args.model)
        [(name, adata)] = read_datasets(args.data)
        yield model, name, adata


def add_embed(commands) -> None:
    p = add_command(commands, "embed", run_embed, embed_settings, help="write cell embeddings to obsm")
    add_key(p, EMBED, "obsm key of the embedding")
    add(p, "--pooling", choices=POOLINGS, shown=of_function(EMBED, "pooling", none=DEFAULT_POOLING),
        help="the cell bottleneck, the mean of the latents, or all latents flattened (the original's)")
    add(p, "--num-workers", type=int, help="data-loader processes reading cells",
        shown=of_function(EMBED, "num_workers"))
    add_inference_options(p)


def embed_settings(args: argparse.Namespace) -> dict:
    """The keyword arguments of `Exceiver.embed_file`."""
    return {"pooling": args.pooling, "overwrite": args.overwrite,
            **given(args, key_added="key", num_workers="num_workers"), **inference_settings(args)}


def run_embed(args: argparse.Namespace) -> None:
    """Embed the cells of DATA.h5ad with a pretrained model and write the AnnData, with the
    embedding in obsm, to OUT.h5ad."""
    import h5py

    from exceiver.model import Exceiver

    chosen = embed_settings(args)
    with claim(args.out, overwrite=args.overwrite, folder=False):  # refused now, not after the work
        Exceiver.load(args.model).embed_file(args.data, args.out, progress=not args.quiet, **chosen)
    key = effective(chosen, Exceiver.embed_file, "key_added")
    with h5py.File(args.out, "r") as written:
        n_cells, width = written["obsm"][key].shape
    print(f"wrote {args.out}: obsm[{key!r}] of {n_cells:,} cells x {width}")


def add_predict(commands) -> None:
    p = add_command(commands, "predict", run_predict, key_settings,
                    help="predict labels of cells with a fine-tuned classifier")
    add_key(p, PREDICT, "obs column of the predicted labels")
    add_inference_options(p, model="CLF_DIR")


def key_settings(args: argparse.Namespace) -> dict:
    """The keyword arguments of `Exceiver.predict` and `impute`: the key, batches, device, data."""
    return {**given(args, key_added="key"), **inference_settings(args)}


def run_predict(args: argparse.Namespace) -> None:
    """Write DATA.h5ad with obs[KEY], obsm['PREFIX_probabilities'] (PREFIX: KEY without its
    '_prediction' suffix) and the class names in uns['exceiver'][KEY] to OUT.h5ad."""
    from exceiver.io import write_h5ad

    with model_and_data(args) as (model, name, adata):
        if not model.classes:
            raise ExceiverInputError(f"{args.model} is not a classifier (no classes); fine-tune it first")
        prediction = model.predict(adata, name=name, progress=not args.quiet, **key_settings(args))
        write_h5ad(adata, args.out, overwrite=args.overwrite)
    counts = prediction.value_counts()
    print(f"wrote {args.out}: {adata.n_obs:,} cells predicted; most frequent: "
          + ", ".join(f"{k} ({v})" for k, v in counts.head(3).items()))


def add_impute(commands) -> None:
    p = add_command(commands, "impute", run_impute, impute_settings,
                    help="write predicted expression of every gene to a layer")
    add_key(p, IMPUTE, "layer to write")
    add(p, "--method", choices=["counts", "values"], shown=of_function(IMPUTE, "method"),
        help="the count decoder's expected normalised expression, or the masked-value head's level if expressed")
    add(p, "--batch", metavar="NAME", shown=of_function(IMPUTE, "batch", none="the mean over the model's batches"),
        help="a model trained with batches: the batch its count decoder is conditioned on")
    add_inference_options(p)


def impute_settings(args: argparse.Namespace) -> dict:
    """The keyword arguments of `impute` (options not given keep its defaults)."""
    return {**given(args, method="method", batch="batch"), **key_settings(args)}


def run_impute(args: argparse.Namespace) -> None:
    """Predict each cell's log-normalised expression of every gene of DATA.h5ad from its observed
    genes and write the AnnData, with the predictions in a layer, to OUT.h5ad."""
    from exceiver.io import write_h5ad
    from exceiver.tl import impute

    chosen = impute_settings(args)  # every gene of the data: the layer holds all of var
    with model_and_data(args) as (model, name, adata):
        impute(model, adata, name=name, progress=not args.quiet, **chosen)
        write_h5ad(adata, args.out, overwrite=args.overwrite)
    key = effective(chosen, impute, "key_added")
    n_genes = adata.uns["exceiver"][key]["n_imputed_genes"]
    print(f"wrote {args.out}: layers[{key!r}] of {adata.n_obs:,} cells x {n_genes:,} imputed genes")


def add_annotate(commands) -> None:
    p = add_command(commands, "annotate", run_annotate, annotate_settings,
                    help="transfer labels from a labelled reference to query cells")
    add_model(p, data=False)
    p.add_argument("reference", type=Path, metavar="REFERENCE.h5ad")
    p.add_argument("query", type=Path, metavar="QUERY.h5ad")
    p.add_argument("--label-key", required=True, metavar="COL", help="obs column of the reference with the labels")
    p.add_argument("--out", required=True, type=Path, metavar="OUT.h5ad")
    add(p, "--method", choices=["linear", "knn"], shown=of_function(ANNOTATE, "method"),
        help="logistic regression on the embedding, or distance-weighted kNN in it")
    add(p, "--n-neighbors", type=int, metavar="K", help="neighbours of --method knn",
        shown=of_function(ANNOTATE, "n_neighbors"))
    add(p, "--min-confidence", type=float, metavar="P", shown=of_function(ANNOTATE, "min_confidence"),
        help="label cells whose chosen label has a lower probability 'unknown'")
    add_key(p, ANNOTATE, "obs column to write")
    add_data_options(p, model=True)
    add_device_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.h5ad")


def annotate_settings(args: argparse.Namespace) -> dict:
    """The keyword arguments of `annotate` (options not given keep its defaults)."""
    return {**given(args, method="method", n_neighbors="n_neighbors", min_confidence="min_confidence",
                    key_added="key"), **inference_settings(args)}


def run_annotate(args: argparse.Namespace) -> None:
    """Embed REFERENCE.h5ad and QUERY.h5ad with a pretrained model and carry the reference's labels
    to the query through the embedding. Writes QUERY.h5ad with obs[KEY] ('unknown' below --min-
    confidence), obs[KEY_confidence] and the settings in uns['exceiver'][KEY] to OUT.h5ad."""
    from exceiver.data.sources import read_datasets
    from exceiver.io import write_h5ad
    from exceiver.model import Exceiver
    from exceiver.tl import annotate

    chosen = annotate_settings(args)
    with claim(args.out, overwrite=args.overwrite, folder=False):
        model = Exceiver.load(args.model)
        [(_, query)] = read_datasets(args.query)
        result = annotate(model, args.reference, query, args.label_key, progress=not args.quiet, **chosen)
        write_h5ad(query, args.out, overwrite=args.overwrite)
    key = effective(chosen, annotate, "key_added")
    method = query.uns["exceiver"][key]["method"]
    counts = result[key].value_counts()
    print(f"wrote {args.out}: {query.n_obs:,} cells labelled ({method}); most frequent: "
          + ", ".join(f"{k} ({v})" for k, v in counts.head(4).items()))


def add_perturb(commands) -> None:
    p = add_command(commands, "perturb", run_perturb, perturb_settings,
                    help="predict the effects of knocking out or overexpressing genes")
    p.add_argument("--gene", required=True, action="append", metavar="G",
                   help="gene to perturb (repeat for several, each perturbed on its own)")
    add(p, "--mode", metavar="M", help="knockout, overexpress, or a log-normalised expression level",
        shown=of_function(PERTURB, "mode"))
    add(p, "--query-gene", action="append", metavar="G", help="gene whose change to report (repeat for several)",
        shown=of_function(PERTURB, "query_genes", none="every gene of the model that the dataset measures"))
    p.add_argument("--groupby", metavar="COL", help="obs column: effects per group of cells")
    p.add_argument("--group", action="append", metavar="VALUE", help="only this group of --groupby (repeatable)")
    add(p, "--quantile", type=float, metavar="Q", shown=of_function(PERTURB, "quantile"),
        help="overexpress to this quantile of the gene's expression in expressing cells")
    add(p, "--min-shift", type=float, metavar="S", shown=of_function(PERTURB, "min_shift"),
        help="fraction_affected counts the cells whose predicted value moves by more than S (log-normalised units)")
    add_inference_options(p, out="EFFECTS.csv")


def perturb_settings(args: argparse.Namespace) -> dict:
    """The keyword arguments of `perturb` (options not given keep its defaults)."""
    return {"query_genes": args.query_gene, "groupby": args.groupby, "groups": args.group,
            **given(args, mode="mode", quantile="quantile", min_shift="min_shift"), **inference_settings(args)}


def run_perturb(args: argparse.Namespace) -> None:
    """In-silico perturbation: remove a gene's token (knockout) or set its value (overexpress: a
    high quantile of its expression; or a log-normalised level), re-run the model, and write each
    query gene's predicted change to a CSV."""
    from exceiver.io import write_csv
    from exceiver.tl import perturb

    with model_and_data(args) as (model, name, adata):
        effects = perturb(model, adata, args.gene, name=name, inplace=False, progress=not args.quiet,
                          **perturb_settings(args))
        write_csv(effects, args.out, overwrite=args.overwrite)
    top = effects.loc[effects["gene"] != effects["perturbed_gene"]].head(3)
    print(f"wrote {args.out}: {len(effects):,} rows; strongest: "
          + ", ".join(f"{g} {s:+.3f}" for g, s in zip(top["gene"], top["mean_shift"])))
