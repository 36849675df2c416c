"""Which device and precision to train on."""

from __future__ import annotations

import importlib.util

import torch

from simclr_kit.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None)
                                     and torch.backends.mps.is_available()):
        raise UserError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default (BatchNorm and the loss stay fp32); fp32 elsewhere."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 autocast (its gradients underflow without one), else None: bf16
    has fp32's exponent range and fp32 needs none."""
    if autocast_dtype(precision, device) != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def compile_by_default(device: torch.device) -> bool:
    """Whether ``torch.compile`` is on when the config leaves it unset: on CUDA with Triton.

    On CUDA, Inductor fuses the BatchNorm/ReLU/add chains that make small-channel convolutions
    at 32 px memory-bound. On CPU the one-off compile costs minutes on a few cores and the
    convolutions dominate the step either way, so it stays off there.
    """
    if device.type != "cuda" or not hasattr(torch, "compile"):
        return False
    return importlib.util.find_spec("triton") is not None


def tune_backends(device: torch.device, deterministic: bool = False) -> None:
    """Let cuDNN time its convolution algorithms once per shape and keep the fastest.

    Pretraining runs one shape at every step (the last partial batch is dropped), so the
    search pays for itself within a few steps; deterministic runs keep cuDNN's fixed choices.
    """
    if device.type == "cuda" and not deterministic:
        torch.backends.cudnn.benchmark = True


# What the allocators say when memory runs out: the CPU's DefaultCPUAllocator, CUDA, MPS.
_OUT_OF_MEMORY = ("can't allocate memory", "out of memory", "Cannot allocate memory")


def out_of_memory_error(err: BaseException, device: torch.device, batch_size: int, world: int,
                        image_size: int, precision: str, channels_last: bool) -> UserError | None:
    """A one-line UserError for a training step that ran out of memory (CUDA's
    ``OutOfMemoryError``, or the RuntimeError of the CPU or MPS allocator), saying what to lower;
    None for any other error. ``batch_size`` is the global batch, split over ``world``."""
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    if not isinstance(err, oom) and not (isinstance(err, RuntimeError) and
                                         any(m in str(err) for m in _OUT_OF_MEMORY)):
        return None
    per_process = f", {batch_size // world} per process" if world > 1 else ""
    advice = [f"lower --batch-size (now {batch_size}{per_process}) or --image-size (now "
              f"{image_size})"]
    if device.type == "cuda" and autocast_dtype(precision, device) is None:
        advice.append("train in --precision bf16 (half the activation memory of fp32)")
    if device.type == "cuda" and not channels_last:
        advice.append("--channels-last true")
    return UserError(f"out of memory on {device} in a training step of "
                     f"{batch_size // world} images of {image_size} px: {'; or '.join(advice)}")
