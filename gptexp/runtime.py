"""Where and how a job computes: device, precision (autocast), threads, and with which other processes."""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch

from .distributed import SINGLE, World
from .errors import GptexpError


def resolve_device(name: str, world: World = SINGLE) -> torch.device:
    """'auto' -> cuda > mps > cpu; an explicit device must exist. In a job of several processes
    'auto' and 'cuda' mean this process's GPU, cuda:LOCAL_RANK."""
    if world.size > 1:
        return _rank_device(name, world)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GptexpError(f"train.device is {name} but CUDA is not available here: use train.device=auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise GptexpError("train.device is mps but MPS is not available here: use train.device=auto or cpu")
    return torch.device(name)


def _rank_device(name: str, world: World) -> torch.device:
    if name == "mps" or name.startswith("cuda:"):
        raise GptexpError(
            f"train.device is {name} but the job has {world.size} processes: use auto, cuda (each "
            "process takes cuda:LOCAL_RANK) or cpu"
        )
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise GptexpError(f"train.device is {name} but CUDA is not available here: use train.device=auto or cpu")
    count = torch.cuda.device_count()
    if world.local_size > count:
        raise GptexpError(
            f"{world.local_size} processes on this machine but {count} GPU(s): start at most {count} "
            "per machine (torchrun --nproc-per-node, gptexp train --nproc) or use train.device=cpu"
        )
    return torch.device("cuda", world.local_rank)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run in hardware here (CPUs without it emulate bf16 ~100x slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise GptexpError(f"train.precision fp16 needs CUDA (device is {device.type}): use bf16, fp32 or auto")
    if name == "bf16" and device.type == "cpu" and not native_bf16(device):
        # Allowed (numerics can be studied anywhere), but it is the slow path here, never a speedup.
        warnings.warn(
            "train.precision bf16 on a CPU without bf16 hardware (no AMX or AVX512-BF16): its matmuls "
            "are emulated and several times slower than fp32 here; precision auto picks fp32",
            RuntimeWarning,
            stacklevel=2,
        )
    return name


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def physical_cores() -> int:
    """Cores this process may use, counting SMT siblings once where the topology says so."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:
        allowed = set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_cpus_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # resolved: fp32 | bf16 | fp16
    threads: int  # torch intra-op threads
    world: World = SINGLE  # the processes of the job (gptexp.distributed)

    def autocast(self):
        return autocast(self.device, self.precision)

    def use_threads(self) -> None:
        """Give torch this runtime's thread count (a process-wide setting, so set where the job computes)."""
        torch.set_num_threads(self.threads)


def use_deterministic_algorithms(on: bool, device: torch.device) -> None:
    """Set torch's deterministic-algorithms switch for a run (process-wide, like the thread count,
    so each run sets it to its own config's value rather than inherit the previous run's).

    cuBLAS needs CUBLAS_WORKSPACE_CONFIG before its first use in the process to be deterministic;
    it is set here when missing, which is in time when this run is the process's first CUDA job.
    """
    if on and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on)


def resolve_runtime(device: str, precision: str, threads: int, world: World = SINGLE) -> Runtime:
    """A config's train.device, train.precision and train.threads, checked. Threads 0: the physical
    cores shared among the job's processes on this machine.

    Sets nothing: jobs resolve once, before a run exists, and the runner applies it (use_threads)."""
    dev = resolve_device(device, world)
    return Runtime(
        dev, resolve_precision(precision, dev), threads or max(1, physical_cores() // world.local_size), world
    )
