"""The `exceiver` command line: pretrain, embed, finetune, predict, annotate, evaluate, impute,
perturb, demo, import-original, build-corpus (the options: `cli_parser`)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from exceiver.cli_parser import build_parser, data_options, run_options, training_options
from exceiver.devices import inference_device
from exceiver.errors import ExceiverInputError, Interrupted, ModelFileError, TrainingError, speaking
from exceiver.outputs import claim


def run_pretrain(args: argparse.Namespace) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from exceiver.pretrain import pretrain

    model = pretrain(args.data, args.out, preset=args.preset, model=dict(args.model_options), genes=args.genes,
                     n_top_genes=args.n_top_genes, gene_map=args.gene_map, init=args.init,
                     extend_genes=args.extend_genes, own_genes=args.own_genes, batch_key=args.batch_key, overwrite=args.overwrite,
                     progress=not args.quiet, **data_options(args), **run_options(args), **training_options(args))
    if rank_zero_only.rank == 0:  # distributed runs execute this in every process
        print(f"wrote {args.out}: {model}")


def run_embed(args: argparse.Namespace) -> None:
    import h5py

    from exceiver.model import Exceiver

    with claim(args.out, overwrite=args.overwrite, folder=False):  # refused now, not after the work
        model = Exceiver.load(args.model)
        model.embed_file(args.data, args.out, key_added=args.key, pooling=args.pooling, batch_size=args.batch_size,
                         device=args.device, num_workers=args.num_workers, gene_map=args.gene_map,
                         overwrite=args.overwrite, progress=not args.quiet, **data_options(args))
    with h5py.File(args.out, "r") as written:
        n_cells, width = written["obsm"][args.key].shape
    print(f"wrote {args.out}: obsm[{args.key!r}] of {n_cells:,} cells x {width}")


def run_build_corpus(args: argparse.Namespace) -> None:
    from exceiver.data.corpus import build_corpus

    corpus = build_corpus(args.data, args.out, genes=args.genes, shard_cells=args.shard_cells,
                          overwrite=args.overwrite, progress=not args.quiet, **data_options(args))
    print(f"wrote {args.out}: {corpus.n_cells:,} cells, {len(corpus.vocab):,} genes, {len(corpus.shards)} shard(s)")


def run_finetune(args: argparse.Namespace) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from exceiver.finetune import finetune

    mode = "freeze" if args.freeze else "scratch" if args.from_scratch else "full"
    chosen = {} if args.pretrained_lr_mult is None else {"pretrained_lr_mult": args.pretrained_lr_mult}
    model = finetune(args.model, args.data, args.label_key, args.out, mode=mode,
                     expression_loss_weight=args.expression_weight, overwrite=args.overwrite, progress=not args.quiet,
                     **chosen, **data_options(args), **run_options(args), **training_options(args))
    if rank_zero_only.rank == 0:
        m = model.metrics
        print(f"wrote {args.out}: {len(model.classes)} classes, validation accuracy {m['val_accuracy']:.3f}, "
              f"macro-F1 {m['val_macro_f1']:.3f} ({mode})")


def run_predict(args: argparse.Namespace) -> None:
    from exceiver.data.sources import read_datasets
    from exceiver.io import write_h5ad
    from exceiver.model import Exceiver

    with claim(args.out, overwrite=args.overwrite, folder=False):  # refused now, not after the work
        model = Exceiver.load(args.model)
        if not model.classes:
            raise ExceiverInputError(f"{args.model} is not a classifier (no classes); fine-tune it first")
        [(name, adata)] = read_datasets(args.data)
        prediction = model.predict(adata, batch_size=args.batch_size, device=args.device, name=name,
                                   progress=not args.quiet, **data_options(args))
        write_h5ad(adata, args.out, overwrite=args.overwrite)
    counts = prediction.value_counts()
    print(f"wrote {args.out}: {adata.n_obs:,} cells predicted; most frequent: "
          + ", ".join(f"{k} ({v})" for k, v in counts.head(3).items()))


def run_annotate(args: argparse.Namespace) -> None:
    from exceiver.data.sources import read_datasets
    from exceiver.io import write_h5ad
    from exceiver.model import Exceiver

    with claim(args.out, overwrite=args.overwrite, folder=False):
        model = Exceiver.load(args.model)
        [(_, query)] = read_datasets(args.query)
        chosen = {name: getattr(args, name) for name in ("method", "n_neighbors", "min_confidence")
                  if getattr(args, name) is not None}  # the others keep annotate's defaults
        result = model.annotate(args.reference, query, args.label_key, key_added=args.key, batch_size=args.batch_size,
                                device=args.device, progress=not args.quiet, **chosen, **data_options(args))
        write_h5ad(query, args.out, overwrite=args.overwrite)
    settings = query.uns["exceiver"][args.key]
    counts = result[args.key].value_counts()
    print(f"wrote {args.out}: {query.n_obs:,} cells labelled ({settings['method']}); most frequent: "
          + ", ".join(f"{k} ({v})" for k, v in counts.head(4).items()))


def run_impute(args: argparse.Namespace) -> None:
    from exceiver.data.sources import read_datasets
    from exceiver.io import write_h5ad
    from exceiver.model import Exceiver
    from exceiver.tl import impute

    with claim(args.out, overwrite=args.overwrite, folder=False):  # refused now, not after the work
        model = Exceiver.load(args.model)
        [(name, adata)] = read_datasets(args.data)
        impute(model, adata, key_added=args.key, batch_size=args.batch_size, device=args.device, name=name,
               progress=not args.quiet, **data_options(args))
        write_h5ad(adata, args.out, overwrite=args.overwrite)
    n_genes = adata.uns["exceiver"][args.key]["n_imputed_genes"]
    print(f"wrote {args.out}: layers[{args.key!r}] of {adata.n_obs:,} cells x {n_genes:,} imputed genes")


def run_perturb(args: argparse.Namespace) -> None:
    from exceiver.data.sources import read_datasets
    from exceiver.io import write_csv
    from exceiver.model import Exceiver
    from exceiver.tl import perturb

    with claim(args.out, overwrite=args.overwrite, folder=False):  # refused now, not after the work
        model = Exceiver.load(args.model)
        [(name, adata)] = read_datasets(args.data)
        effects = perturb(model, adata, args.gene, args.mode, groupby=args.groupby, groups=args.group,
                          quantile=args.quantile, batch_size=args.batch_size, device=args.device, name=name,
                          progress=not args.quiet, **data_options(args))
        write_csv(effects, args.out, overwrite=args.overwrite)
    top = effects.loc[effects["gene"] != effects["perturbed_gene"]].head(3)
    print(f"wrote {args.out}: {len(effects):,} rows; strongest: "
          + ", ".join(f"{g} {s:+.3f}" for g, s in zip(top["gene"], top["mean_shift"])))


def run_evaluate(args: argparse.Namespace) -> None:
    from exceiver.evaluate.report import best_pca, evaluate
    from exceiver.model import Exceiver

    with claim(args.out, overwrite=args.overwrite, folder=True):  # refused now, not after the work
        metrics = evaluate(Exceiver.load(args.model), args.data, args.out, label_keys=args.label_key,
                           batch_key=args.batch_key, annotations=args.annotations, sources=args.source,
                           pooling=args.pooling, max_cells=args.max_cells, device=args.device, seed=args.seed,
                           overwrite=args.overwrite, progress=not args.quiet, gene_map=args.gene_map,
                           **data_options(args))
    rec = metrics["reconstruction"]["model"]
    summary = [f"masked MSE {rec['mse']:.4f} ({rec['mse_ratio']:.3f} x gene mean)"]
    for key, cell in metrics["cells"].items():
        reps = cell["representations"]
        best = best_pca(reps)
        summary.append(f"{key}: kNN macro-F1 {reps['exceiver']['knn_macro_f1']:.3f} vs {best} "
                       f"{reps[best]['knn_macro_f1']:.3f}")
    print(f"wrote {args.out}/report.md: " + "; ".join(summary))


def run_demo(args: argparse.Namespace) -> None:
    from exceiver.demo import run_demo as demo

    print(demo(args.out, max_minutes=args.max_minutes, seed=args.seed, overwrite=args.overwrite,
               progress=not args.quiet))


def run_import_original(args: argparse.Namespace) -> None:
    from exceiver.model import import_original

    with claim(args.out, overwrite=args.overwrite, folder=True):  # refused now, not after the work
        model = import_original(args.checkpoint, genes=args.genes, scaler=args.scaler)
        model.save(args.out, overwrite=args.overwrite)
    kind = f"classifier of {len(model.classes)} classes" if model.classes else "masked-expression model"
    print(f"wrote {args.out}: {model} ({kind}, paper-compatible)")


def check_up_front(args: argparse.Namespace) -> None:
    """What every command can refuse before reading a file: a device this machine lacks (outputs
    are claimed, and training options checked by TrainingConfig, also before any work)."""
    if getattr(args, "device", None) is not None:
        inference_device(args.device)


def _stop(signum: int, frame) -> None:
    """SIGTERM outside training (where it saves a checkpoint first): stop, leaving no partial output."""
    raise Interrupted(signum, "stopped; nothing was written")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.command in ("pretrain", "finetune", "demo"):
        import lightning  # noqa: F401  (its import sets its loggers' levels: set ours after it)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(level)
    logging.getLogger("lightning").propagate = False  # it prints its lines itself: not twice
    runners = {"pretrain": run_pretrain, "embed": run_embed, "finetune": run_finetune, "predict": run_predict,
               "annotate": run_annotate, "evaluate": run_evaluate, "impute": run_impute, "perturb": run_perturb,
               "demo": run_demo, "import-original": run_import_original, "build-corpus": run_build_corpus}
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, _stop) if main_thread else None
    try:
        with speaking("cli"):
            check_up_front(args)
            runners[args.command](args)
    except (ExceiverInputError, ModelFileError, TrainingError) as err:
        print(f"exceiver {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"exceiver {args.command}: {signal.Signals(err.signum).name}: {err}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print(f"exceiver {args.command}: SIGINT: stopped; nothing was written", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
