"""The `exceiver` command line: pretrain, embed, finetune, predict, annotate, evaluate, impute,
perturb, demo, import-original, build-corpus. Each command's options and handler are in its module
of `exceiver.commands`; here: logging, signals, and errors in one line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from exceiver.cli_parser import build_parser, data_options, run_options, training_options
from exceiver.devices import inference_device
from exceiver.errors import ExceiverInputError, Interrupted, ModelFileError, TrainingError, speaking

__all__ = ["build_parser", "data_options", "main", "run_options", "training_options"]


def check_up_front(args: argparse.Namespace) -> None:
    """What every command can refuse before reading a file: a device this machine lacks (outputs
    are claimed, and training options checked by TrainingConfig, also before any work)."""
    if hasattr(args, "device"):
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
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, _stop) if main_thread else None
    try:
        with speaking("cli"):
            check_up_front(args)
            args.run(args)
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
