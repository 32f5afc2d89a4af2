"""Progress bars that nothing else writes into: while a bar runs, log records are written above it
(through tqdm) and Python warnings, of exceiver or of the libraries under it (Lightning,
torchmetrics), become records of the `exceiver.warnings` logger, so they are written there too."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("exceiver.warnings")


@contextlib.contextmanager
def messages_above_bars() -> Iterator[None]:
    """Inside the block, warnings are logged and logging goes through tqdm (for bars that others
    draw, such as Lightning's)."""
    with logging_redirect_tqdm(), warnings.catch_warnings():
        warnings.showwarning = _log_warning
        yield


@contextlib.contextmanager
def progress_bar(**options) -> Iterator[tqdm]:
    """A tqdm bar (`options` are tqdm's) with `messages_above_bars` for as long as it runs."""
    with messages_above_bars(), tqdm(**options) as bar:
        yield bar


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    log.warning("%s", message)
