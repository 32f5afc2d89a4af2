"""Outputs that never clobber, race or lie.

Every output path is *claimed* before any work: its folder must be writable, no other process
may be writing it (a lock file beside it, `.NAME.lock`, held until the output is complete), and
an existing output is replaced only with `overwrite` and only if exceiver wrote it. Outputs are
staged beside their place (`.NAME.partial-*`) and renamed in only when complete, so a failure,
a signal or a second writer never leaves half an output.

What exceiver wrote is recognised by a mark it leaves in its outputs: folders carry a manifest
of their files (`.exceiver-output.json`; a folder holding any file outside it is someone else's
work and is never replaced), `.h5ad` files an HDF5 attribute, tables the columns they had.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from exceiver.errors import ExceiverInputError
from exceiver.version import __version__

MANIFEST = ".exceiver-output.json"
H5AD_MARK = "exceiver_output"  # root attribute of the .h5ad files exceiver writes
# Model folders written before manifests existed (exceiver < 0.3): recognised by their files.
_MODEL_FOLDER_FILES = {"config.json", "model.safetensors", "genes.txt", "scaler.safetensors", "metrics.json",
                       "logs/metrics.csv", "logs/hparams.yaml"}

_claims: dict[Path, list] = {}  # path -> [lock file descriptor, depth]: claims held by this process


def _key(path: Path) -> Path:
    return path.parent.resolve() / path.name


def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def claim(path: str | Path, *, overwrite: bool = False, folder: bool,
          recognise: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Hold `path` as this process's output for the block: refuse it at once if it cannot be
    written, if another process holds it, or if it exists and may not be replaced (`overwrite`
    not given, or it was not written by exceiver). Re-entrant within a process, so a command
    claims its output first and the writer inside claims it again for free."""
    path = Path(path)
    key = _key(path)
    if key in _claims:
        _claims[key][1] += 1
        try:
            yield path
        finally:
            _claims[key][1] -= 1
        return
    _check_kind(path, folder)
    with _new_parents(path):
        fd = _acquire(path)
        _claims[key] = [fd, 1]
        try:
            _remove_stale_stages(path)
            check_replaceable(path, overwrite=overwrite, recognise=recognise)
            yield path
        finally:
            del _claims[key]
            _release(path, fd)


def _check_kind(path: Path, folder: bool) -> None:
    if folder and path.exists() and not path.is_dir():
        raise ExceiverInputError(f"{path} is a file; the output must be a folder")
    if not folder and path.is_dir():
        raise ExceiverInputError(f"{path} is a folder; the output must be a file")


def _acquire(path: Path) -> int:
    """An exclusive lock on `.NAME.lock` beside `path` (created here, so this also proves the
    folder writable). The lock dies with its process, even on SIGKILL."""
    lock = _lock_path(path)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ExceiverInputError(f"cannot write {path}: {path.parent} is not writable "
                                     f"({err.strerror.lower()})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ExceiverInputError(
                f"{path} is being written by another exceiver process ({holder}); wait for it to finish "
                "or choose another output") from None
        # The holder before us may have removed the file between our open and our lock.
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
            return fd
        os.close(fd)


def _release(path: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(_lock_path(path))  # while still holding it: see _acquire
    os.close(fd)


def _remove_stale_stages(path: Path) -> None:
    """Staging folders and files of this output left by a process that died (SIGKILL, power):
    nobody else can be using them, since we hold the output's lock."""
    for stale in path.parent.glob(f".{path.name}.partial-*"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


def check_replaceable(path: Path, *, overwrite: bool, recognise: Callable[[Path], bool] | None = None) -> None:
    """Refuse an existing output unless `overwrite` is given and exceiver wrote it (an empty
    folder may always be used)."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if not overwrite:
        raise ExceiverInputError(f"{path} already exists; choose another output or pass overwrite")
    foreign = foreign_files(path) if path.is_dir() else ([] if _is_exceiver_file(path, recognise) else [path.name])
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        what = "holds files exceiver did not write" if path.is_dir() else "was not written by exceiver"
        raise ExceiverInputError(f"{path} {what} ({shown}); overwrite replaces only exceiver's own outputs: "
                                 "move them away or choose another output")


def foreign_files(folder: Path) -> list[str]:
    """Files in `folder` that exceiver did not write there (all of them, without a manifest)."""
    present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())
    written = _manifest_files(folder)
    if written is None:
        legacy = (folder / "config.json").is_file() and set(present) <= _MODEL_FOLDER_FILES
        written = set(present) if legacy else set()
    return [name for name in present if name not in written and name != MANIFEST]


def _manifest_files(folder: Path) -> set[str] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        return set(manifest["files"]) if manifest.get("written_by") == "exceiver" else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_exceiver_file(path: Path, recognise: Callable[[Path], bool] | None) -> bool:
    if recognise is not None:
        return recognise(path)
    if path.suffix == ".h5ad":
        import h5py  # here: the command line imports this module before it knows it needs h5py

        try:
            with h5py.File(path, "r") as file:
                return H5AD_MARK in file.attrs or "exceiver" in file.get("uns", {})
        except OSError:
            return False
    return False


def check_output_dir(path: str | Path, *, overwrite: bool = False) -> Path:
    """Check, without claiming, that `path` may become an output folder (for checks before work
    in a process that claims it later)."""
    path = Path(path)
    _check_kind(path, folder=True)
    check_replaceable(path, overwrite=overwrite)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder beside `path`; it becomes `path`, with a manifest of its files,
    only if the block succeeds."""
    path = Path(path)
    with claim(path, overwrite=overwrite, folder=True):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
        try:
            yield tmp
            files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if not p.is_dir())
            (tmp / MANIFEST).write_text(json.dumps({"written_by": "exceiver", "version": __version__,
                                                    "files": files}, indent=1) + "\n", encoding="utf-8")
            _share(tmp)
            check_replaceable(path, overwrite=overwrite)  # again: someone may have added a file meanwhile
            if path.exists():
                old = path.with_name(f".{path.name}.partial-old-{os.getpid()}")
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old)
            else:
                tmp.rename(path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


@contextlib.contextmanager
def atomic_file(path: str | Path, *, overwrite: bool = False,
                recognise: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a staging file path beside `path`; it replaces `path` only if the block succeeds
    (an existing file only with `overwrite`, and only if exceiver wrote it). A staged `.h5ad`
    gets exceiver's mark."""
    path = Path(path)
    with claim(path, overwrite=overwrite, folder=False, recognise=recognise):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            if path.suffix == ".h5ad":
                import h5py

                with h5py.File(tmp, "r+") as file:
                    file.attrs[H5AD_MARK] = __version__
            _share(Path(tmp))
            check_replaceable(path, overwrite=overwrite, recognise=recognise)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


@contextlib.contextmanager
def _new_parents(path: Path) -> Iterator[None]:
    """Create the missing parent folders of `path`, and remove them again if the block fails."""
    missing = [p for p in reversed(path.parents) if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        raise ExceiverInputError(f"cannot write {path}: cannot create {path.parent} ({err.strerror.lower()})") from None
    try:
        yield
    except BaseException:
        for folder in reversed(missing):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        raise


def _share(staged: Path) -> None:
    """Give staged outputs the permissions of normally created files (temp files are private)."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [staged, *staged.rglob("*")]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)
