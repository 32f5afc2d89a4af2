"""The hardware a run asks for: inference devices, Lightning accelerators and precisions, checked
before any data is read, with messages that say what this machine has.

Every command and every API call that takes `device`, `accelerator`, `devices` or `precision`
comes through here, so a typo or a GPU that is not there fails in one line, not in a traceback
halfway through a job.
"""

from __future__ import annotations

import typing

from exceiver.errors import ExceiverInputError, option

if typing.TYPE_CHECKING:
    import torch

# torch and Lightning are imported where they are needed: the command line builds its parser,
# and answers --help, without them.

INFERENCE_DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
# Lightning's precision names, used where its own list cannot be read (it is private there).
PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
              "32-true", "64-true", "64", "32", "16", "bf16")


def machine() -> str:
    """What this machine offers, in words: "this machine has a CPU and 2 CUDA GPUs (cuda:0, cuda:1)"."""
    n_cuda = _cuda_count()
    parts = ["a CPU"]
    if n_cuda:
        parts.append(f"{n_cuda} CUDA GPU{'s' if n_cuda > 1 else ''} ({', '.join(f'cuda:{i}' for i in range(n_cuda))})")
    if _mps_available():
        parts.append("an Apple GPU (mps)")
    return "this machine has " + (" and ".join(parts) if len(parts) > 1 else "only a CPU")


def inference_device(device: str | torch.device | None) -> torch.device:
    """The torch device for inference: `None`/"auto" is the machine's first GPU (`auto_device`);
    anything else must name a device this machine has."""
    import torch

    if device is None or device == "auto":
        return torch.device(auto_device())
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise ExceiverInputError(f"{option('device', str(device))} is not a device: use one of "
                                 f"{', '.join(INFERENCE_DEVICES)}; {machine()}") from None
    n_cuda = _cuda_count()
    if target.type == "cuda" and (not n_cuda or (target.index or 0) >= n_cuda):
        raise ExceiverInputError(f"{option('device', str(device))} is not available: {machine()}")
    if target.type == "mps" and not _mps_available():
        raise ExceiverInputError(f"{option('device', str(device))} is not available: {machine()}")
    if target.type not in ("cpu", "cuda", "mps"):
        raise ExceiverInputError(f"{option('device', str(device))}: exceiver runs on "
                                 f"{', '.join(INFERENCE_DEVICES)}; {machine()}")
    return target


def auto_device() -> str:
    """What "auto" runs on: a CUDA GPU, else an Apple GPU (MPS), else the CPU."""
    if _cuda_count():
        return "cuda"
    return "mps" if _mps_available() else "cpu"


def training_accelerator(accelerator: str) -> str:
    """The accelerator a training run asks for, with "auto" and "gpu" resolved as `auto_device`
    resolves them (Lightning's own names otherwise)."""
    if accelerator == "auto":
        return auto_device()
    if accelerator == "gpu":
        return "cuda" if _cuda_count() or not _mps_available() else "mps"
    return accelerator


def check_training_hardware(accelerator: str, devices: int | str, precision: str | int) -> None:
    """Refuse a Lightning accelerator, device count or precision that Lightning does not know or
    that this machine cannot run, before the data is read."""
    precisions = lightning_precisions()
    if str(precision) not in precisions:
        raise ExceiverInputError(f"{option('precision', precision)} is not a Lightning precision: use one of "
                                 f"{', '.join(precisions)}")
    names = lightning_accelerators()
    if accelerator not in names:
        raise ExceiverInputError(f"{option('accelerator', accelerator)} is not a Lightning accelerator: use one of "
                                 f"{', '.join(names)}; {machine()}")
    if accelerator not in ("auto", "cpu") and not _accelerator_available(accelerator):
        raise ExceiverInputError(f"{option('accelerator', accelerator)} is not available: {machine()}; use "
                                 f"{option('accelerator', 'cpu')} or {option('accelerator', 'auto')}")
    # An unavailable accelerator was refused above; an Apple GPU is one device.
    n_devices = {"cuda": _cuda_count(), "mps": 1}.get(training_accelerator(accelerator))
    if n_devices and isinstance(devices, int) and devices > n_devices:
        raise ExceiverInputError(f"{option('devices', devices)} asks for more GPUs than there are: {machine()}")


def lightning_precisions() -> list[str]:
    """The precision names Lightning accepts (its own list where it can be read)."""
    try:
        from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
    except ImportError:
        return list(PRECISIONS)
    names = [str(value) for kind in typing.get_args(_PRECISION_INPUT) for value in typing.get_args(kind)]
    names = sorted(dict.fromkeys(names), key=lambda name: "-" not in name)  # full names first, then aliases
    return names or list(PRECISIONS)


def lightning_accelerators() -> list[str]:
    """The accelerator names Lightning accepts: "auto", "gpu" and its registry's."""
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return ["auto", "cpu", "gpu", *sorted(set(AcceleratorRegistry.available_accelerators()) - {"cpu"})]


def _accelerator_available(name: str) -> bool:
    # The GPUs `machine()` reports; Lightning's "gpu" is either kind.
    gpus = {"cuda": bool(_cuda_count()), "mps": _mps_available()}
    if name in gpus or name == "gpu":
        return gpus.get(name, any(gpus.values()))
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return bool(AcceleratorRegistry[name]["accelerator"].is_available())


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
