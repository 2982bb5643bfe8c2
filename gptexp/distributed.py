"""One training run over several processes: torch.distributed (torchrun, DDP) behind one small object.

A process started by torchrun (or by `gptexp train --nproc N`, which runs torchrun's own engine)
finds its place in the environment (RANK, WORLD_SIZE, LOCAL_RANK, ...), joins the process group
(`joined`) and gets a `World`. Everything the runner needs from the other processes goes through it:

- `shard(loader)`: this rank's share of each of the book's batches. The shuffle is the book's
  seeded one, drawn on rank 0 from the same random stream as in a single-process run and broadcast,
  and every batch is cut into contiguous shares by rank, so the union of the shares at step k is
  the single-process batch k (and rank r's share is micro-batch r of `grad_accum_steps` = size).
- `replicate(module)`: DistributedDataParallel, which averages gradients over the ranks;
  `no_sync` for the micro-batches of gradient accumulation before the last.
- `step_loss`, `sum`, `check_stop`: losses summed over the ranks, so every logged number is the
  global one, and stop requests (Ctrl-C, SIGTERM) agreed, so every rank stops at the same step.
- `lead`/`follow`, `share`, `all_gather`: rank 0 alone opens the MLflow run and tells the others.

A process on its own gets `SINGLE`, whose methods do nothing, so one code path serves both.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import socket
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, RandomSampler

from . import interrupts
from .config import ConfigError
from .errors import INTERRUPTS, GptexpError, RunFailed

# How long a process waits for the others to join (torchrun's agents have met already by then,
# so this only covers process start-up, or an unreachable MASTER_ADDR:MASTER_PORT).
JOIN_TIMEOUT = 300.0
# How long a collective waits for a slow rank once joined: rank 0 alone samples, logs and writes
# checkpoints at each epoch's end while the others wait in their next step.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
# Set by `gptexp train --nproc` for its workers: it says itself why a job stopped (gptexp.launch).
LAUNCHER_ENV = "GPTEXP_LAUNCHER"


class JoinError(GptexpError):
    """This process could not join the others (wrong address or port, a rank that never came)."""


class MainFailed(GptexpError):
    """Rank 0 could not start the job (its own output says why); the other ranks stop too."""


class PeerLost(RunFailed):
    """A collective failed because another process of the job died or left."""


@dataclass(frozen=True)
class LaunchEnv:
    """Where torchrun (or any env:// launcher) put this process."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    address: str  # MASTER_ADDR:MASTER_PORT, the rendezvous store


def launch_env(environ=None) -> LaunchEnv | None:
    """This process's place from RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE; None when it runs
    alone (no launcher, or a world of one)."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ and "RANK" not in environ:
        return None
    try:
        size, rank = int(environ.get("WORLD_SIZE", "1")), int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
        local_size = int(environ.get("LOCAL_WORLD_SIZE", str(size)))
    except ValueError:
        raise GptexpError(
            "RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers: start the "
            "processes with torchrun (or gptexp train --nproc N)"
        ) from None
    if not (size >= 1 and 0 <= rank < size and 0 <= local_rank < local_size <= size):
        raise GptexpError(
            f"RANK {rank} / WORLD_SIZE {size} (LOCAL_RANK {local_rank} of {local_size}) is not a "
            "place in a job: start the processes with torchrun (or gptexp train --nproc N)"
        )
    if size == 1:
        return None
    address = f"{environ.get('MASTER_ADDR', '?')}:{environ.get('MASTER_PORT', '?')}"
    return LaunchEnv(rank, size, local_rank, local_size, address)


def check_batch(train, world_size: int) -> None:
    """`train.batch_size` is the global batch: it must split into world_size x grad_accum_steps equal parts."""
    parts = world_size * train.grad_accum_steps
    if train.batch_size % parts:
        raise ConfigError(
            f"train.batch_size {train.batch_size} does not split over {world_size} process(es) x "
            f"train.grad_accum_steps {train.grad_accum_steps}: make it a multiple of {parts} (it is the global "
            f"batch; each process takes batch_size / {world_size} windows a step)"
        )


@dataclass(frozen=True)
class Placement:
    """Where a job computes: recorded in its run's tags."""

    world_size: int
    backend: str  # gloo | nccl | none (one process)
    nodes: int
    devices: tuple[str, ...]  # one per rank

    def devices_summary(self) -> str:
        """'cpu x2', 'cuda:0 x2, cuda:1 x2': each device with the number of ranks on one."""
        return ", ".join(f"{device} x{n}" for device, n in Counter(self.devices).items())


@dataclass(frozen=True)
class World:
    """The processes of one job, as this rank sees them. `World()` is one process alone."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    group: Any = field(default=None, compare=False, repr=False)  # the training process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives: each rank calls them at the same point of the same code --------------------

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        if self.size == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group, device=torch.device("cpu"))
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, by rank, on every rank."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def sum(self, values: list[float]) -> list[float]:
        """The element-wise sum of `values` over the ranks (float64)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def step_loss(self, loss: float) -> float:
        """The global batch's loss from this rank's share's (the shares are equal), and a stop that
        any rank was asked for, raised on all of them at this same step."""
        if self.size == 1:
            return loss
        total, *requests = self.sum([loss, *_requests()])
        _honour(*requests)
        return total / self.size

    def check_stop(self) -> None:
        """Raise, on every rank, a stop that any rank was asked for (an evaluation batch's safe point)."""
        if self.size > 1:
            _honour(*self.sum(_requests()))

    # -- training ---------------------------------------------------------------------------------

    def shard(self, loader):
        """This rank's share of `loader` (a book loader: make_loader / create_dataloader_v1)."""
        return loader if self.size == 1 else ShardedLoader(loader, self)

    def replicate(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """`module` under DDP: gradients averaged over the ranks in backward. DDP broadcasts rank 0's
        parameters and buffers when it is built, so every rank starts from rank 0's weights (a
        resumed run's too: only rank 0 loads them)."""
        if self.size == 1:
            return module
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # Buffers (the book's causal masks) never change: no broadcast before each forward. The
        # keyword for that was renamed in torch 2.13 (the init-time sync stays either way).
        keyword = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers"
        )
        options: dict[str, Any] = {keyword: False}
        return DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, process_group=self.group, **options
        )

    def no_sync(self, module: torch.nn.Module, last: bool):
        """The context for one micro-batch: gradients are averaged over the ranks on the last only."""
        if self.size == 1 or last:
            return contextlib.nullcontext()
        return module.no_sync()  # type: ignore[operator]  # DDP's context, which nn.Module does not declare

    def placement(self, device: torch.device) -> Placement:
        """Where every rank computes (collective)."""
        if self.size == 1:
            return Placement(1, "none", 1, (str(device),))
        where = self.all_gather((socket.gethostname(), str(device)))
        backend = "nccl" if device.type == "cuda" else "gloo"
        return Placement(self.size, backend, len({host for host, _ in where}), tuple(d for _, d in where))

    # -- starting a job ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def lead(self) -> Iterator[Callable[[str, Any], None]]:
        """Rank 0's start of a job: the function it yields tells the other ranks (`follow`) the run id
        and config; an exception before that tells them rank 0 failed, so they stop at once."""
        told: list[bool] = []

        def start(run_id: str, config: Any) -> None:
            self.share((run_id, config))
            told.append(True)

        try:
            yield start
        except BaseException:
            if self.size > 1 and not told:
                with contextlib.suppress(Exception):
                    self.share(None)
            raise

    def follow(self) -> tuple[str, Any]:
        """The other ranks' start of a job: rank 0's run id and config."""
        job = self.share(None)
        if job is None:
            raise MainFailed("rank 0 could not start the job: its output says why")
        return job

    @contextlib.contextmanager
    def peer_errors(self):
        """A collective that fails because another process died or left becomes PeerLost."""
        try:
            yield
        except RuntimeError as exc:
            if self.size == 1 or not _is_peer_loss(exc):
                raise
            raise PeerLost(
                f"lost contact with another process of the job ({_gist(exc)}): the launcher's "
                "output names the process that stopped"
            ) from None


SINGLE = World()


def _requests() -> list[float]:
    signum = interrupts.requested()
    return [float(signum == signal.SIGINT), float(signum == signal.SIGTERM)]


def _honour(sigint: float, sigterm: float) -> None:
    if sigterm:
        interrupts.raise_agreed(signal.SIGTERM)
    if sigint:
        interrupts.raise_agreed(signal.SIGINT)


def _is_peer_loss(exc: BaseException) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo", "NCCL")
    )


def _gist(exc: BaseException) -> str:
    """gloo's one-line message without its source path and advice."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ")[0].rstrip(".")[:200]


class ShardedLoader:
    """One rank's view of a book loader: the same batches in the same order, each cut into `size`
    contiguous shares (a loader that keeps its last, short batch may give some ranks an empty share).

    Iterating it draws from the global random stream what iterating the DataLoader draws (its base
    seed, then RandomSampler's seed), on rank 0 only, whose stream is the single-process run's (the
    other ranks seed theirs apart, for their own dropout masks); the permutation's seed is
    broadcast, so all ranks cut the same batches.
    """

    def __init__(self, loader: DataLoader, world: World):
        self.dataset: Any = loader.dataset  # a GPTDatasetV1 (sized, with max_length)
        self.batch_size: int = loader.batch_size or 1
        self.drop_last = loader.drop_last
        self.shuffle = isinstance(loader.sampler, RandomSampler)
        self.world = world

    def __len__(self) -> int:
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self):
        order, b, w = self._order(), self.batch_size, self.world
        for k in range(len(self)):
            batch = order[k * b : (k + 1) * b]
            yield self._collate(batch[w.rank * len(batch) // w.size : (w.rank + 1) * len(batch) // w.size])

    def _order(self) -> list[int]:
        seed = None
        if self.world.is_main:
            torch.empty((), dtype=torch.int64).random_()  # the DataLoader iterator's base seed
            if self.shuffle:
                seed = int(torch.empty((), dtype=torch.int64).random_().item())  # RandomSampler's
        if not self.shuffle:
            return list(range(len(self.dataset)))
        generator = torch.Generator()
        generator.manual_seed(self.world.share(seed))
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    def _collate(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if not indices:
            empty = torch.empty((0, self.dataset.max_length), dtype=torch.long)
            return empty, empty.clone()
        inputs, targets = zip(*(self.dataset[i] for i in indices), strict=True)
        return torch.stack(inputs), torch.stack(targets)


def speaks(exc: BaseException) -> bool:
    """Whether this process prints the one line for `exc` that ends a command.

    The ranks of a job meet the same errors (the same config, corpus and store), so one process
    per machine says it: local rank 0. A process that could not join says so itself. Under
    `gptexp train --nproc` the launcher, which the user signalled, says that the job was interrupted.
    """
    env = os.environ
    if env.get("WORLD_SIZE", "1") in ("", "1") or isinstance(exc, JoinError):
        return True
    if env.get(LAUNCHER_ENV) and isinstance(exc, INTERRUPTS):
        return False
    return env.get("LOCAL_RANK", "0") == "0"


@contextlib.contextmanager
def joined(env: LaunchEnv | None, timeout: float = JOIN_TIMEOUT) -> Iterator[World]:
    """This process's World for the length of one job: SINGLE alone; else the process group,
    joined within `timeout` seconds and left at the end. Meanwhile signals only record a stop,
    which the ranks agree on at each step (see gptexp.interrupts); after it they can no longer
    cut the process's last line."""
    if env is None:
        yield SINGLE
        return
    with interrupts.deferred(honour=env.rank == 0), interrupts.collective():
        world = _join(env, timeout)
        try:
            yield world
        finally:
            # Left explicitly: a process whose peer died would otherwise abort at exit in gloo's
            # destructor ("terminate called without an active exception").
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            interrupts.ending()


def _join(env: LaunchEnv, timeout: float) -> World:
    cuda = torch.cuda.is_available()
    if cuda and env.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(env.local_rank)
    # Tensors on the CPU (losses, objects) go through gloo; CUDA gradients through NCCL.
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    try:
        with _stderr_hidden():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
            # The training group waits far longer for a slow rank than a process waits to join.
            group = dist.new_group(timeout=COLLECTIVE_TIMEOUT)
    except Exception as exc:  # c10d raises DistNetworkError, DistStoreError, RuntimeError, ValueError...
        raise JoinError(
            f"process {env.rank} of {env.size} could not join the job at {env.address} within "
            f"{timeout:g} s ({_gist(exc)}): check MASTER_ADDR/MASTER_PORT (torchrun --rdzv-endpoint), "
            "that every process can reach it and has started, or raise --join-timeout"
        ) from None
    return World(env.rank, env.size, env.local_rank, env.local_size, group)


@contextlib.contextmanager
def _stderr_hidden():
    """c10d's C++ client logs each failed connection attempt with a stack trace on stderr (fd 2);
    a failed join is said in one line instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
