"""Training on several processes with PyTorch's own engine: torchrun's elastic agent and DistributedDataParallel.

`train.nproc: N` on one machine: `python -m stages.train` starts N copies of itself through
`torch.distributed.elastic`, which is what `torchrun --standalone --nproc-per-node N -m stages.train` does, run
in-process so that a failure reads as one line (torchrun reports one traceback per process). Several nodes: run
torchrun yourself (README, "Several GPUs and several machines"); each copy reads RANK, LOCAL_RANK and WORLD_SIZE
from the environment torchrun sets, and `train.nproc` is not consulted.

Same result as one process: every rank walks the same global batches (`train.batch_size` is global), takes its
contiguous slice of each (`share`), and draws the whole batch's augmentation before keeping its slice; DDP
averages the gradients of equal slices, which is the gradient of one process's mean loss over the batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from cxr14.runtime.devices import cpu_count
from cxr14.runtime.errors import PipelineError
from cxr14.runtime.signals import Terminated

LAUNCHER = "CXR14_LAUNCHER"  # set for the workers `launch` starts: the launcher's pid
TIMEOUT = datetime.timedelta(minutes=10)  # a collective waiting longer than this ends the run
QUIET_EXIT = 3  # a launched worker that stopped because another rank did: the launcher says why, once

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class World:
    """Where this process stands: `rank` of `size` processes, `local_rank` on its node (its GPU index)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 alone writes the resume point, model.pt, dvclive/ and metrics/train.json."""
        return self.rank == 0

    @property
    def launched(self) -> bool:
        """Started by `launch` (not by a user's torchrun): its launcher reports failures."""
        return os.environ.get(LAUNCHER) is not None


def world_from_env() -> World:
    """The torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE), or one process when it is absent."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise PipelineError(f"torchrun environment: {exc}; expected integers in RANK, LOCAL_RANK and WORLD_SIZE"
                            ) from None
    return World(rank, local, size)


class PeerLost(PipelineError):
    """A collective failed because another rank stopped (died, was killed, or failed first)."""


# How gloo and NCCL word another rank's death (DDP's gradient all-reduce raises plain RuntimeErrors).
PEER_SIGNS = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out", "timeout",
              "nccl", "gloo")


def collective(fn: Callable[..., T], *args: Any) -> T:
    """Run a collective; another rank's death (a closed connection, a timeout) becomes one line, not a traceback."""
    with peers_watched():
        return fn(*args)


@contextlib.contextmanager
def peers_watched(world: World | None = None) -> Iterator[None]:
    """Around work that talks to the other ranks (a DDP step, a gather): their loss becomes `PeerLost`, one line;
    any other error (a bug, out of memory) goes on as it was. One process (`world` of size 1): nothing to watch."""
    if world is not None and world.size == 1:
        yield
        return
    try:
        yield
    except (RuntimeError, torch.distributed.DistError) as exc:
        text = str(exc).strip()
        if isinstance(exc, torch.OutOfMemoryError) or not (isinstance(exc, torch.distributed.DistError)
                                                           or any(sign in text.lower() for sign in PEER_SIGNS)):
            raise
        first = text.splitlines()[0] if text else type(exc).__name__
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else "?"
        raise PeerLost(f"train: rank {rank} lost the other ranks ({first[:200]})") from None


def start(world: World, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, one GPU per local rank; gloo on the CPU); returns this rank's device."""
    if device.type == "cuda":
        if device.index is not None:
            raise PipelineError(f"train.device: {device}, with {world.size} processes; use cuda (each process takes "
                                "the GPU of its local rank) and CUDA_VISIBLE_DEVICES to choose the GPUs")
        if world.local_rank >= torch.cuda.device_count():
            raise PipelineError(f"train: local rank {world.local_rank} but {torch.cuda.device_count()} CUDA device(s) "
                                "visible here; start at most one process per GPU")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise PipelineError(f"train.device: {device.type} with {world.size} processes; expected cuda or cpu")
    if os.environ.get(LAUNCHER) and sys.platform.startswith("linux"):
        from cxr14.runtime.processes import die_with_parent

        die_with_parent(int(os.environ[LAUNCHER]))  # a SIGKILLed launcher leaves no worker behind
    try:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                                             rank=world.rank, world_size=world.size)
    except (RuntimeError, torch.distributed.DistError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"train: rank {world.rank} could not join the other {world.size - 1} ({first[:200]})"
                            ) from None
    return device


def same_buffers(model: torch.nn.Module, world: World) -> None:
    """Rank 0's BatchNorm statistics on every rank before validation: DDP sends them at the next forward only,
    and without SyncBatchNorm (the CPU) each rank's last step left its own, so each val block would be scored
    by a slightly different model than the one rank 0 saves."""
    if world.size > 1:
        for buffer in model.buffers():
            collective(torch.distributed.broadcast, buffer, 0)


def agree(what: str, value: Any, world: World) -> None:
    """Every rank must see what rank 0 sees (where a resume starts, the data's MD5s): ranks on other nodes read
    their own files, and one that resumed elsewhere or read other data would train on other batches."""
    if world.size == 1:
        return
    values: list[Any] = [None] * world.size
    collective(torch.distributed.all_gather_object, values, value)
    for rank, other in enumerate(values):
        if other != values[0]:
            raise PipelineError(f"train: rank {rank} and rank 0 disagree on the {what} ({str(other)[:80]} against "
                                f"{str(values[0])[:80]}); every node needs the same data/prepared, data/split and "
                                "models/resume/last.pt (a shared file system, or copies)")


def stop() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def share(rows: Sequence[int], world: World) -> list[int]:
    """This rank's contiguous slice of a global batch (equal slices: the caller checks the batch divides)."""
    n = len(rows) // world.size
    return list(rows[world.rank * n:(world.rank + 1) * n])


def gather_rows(local: torch.Tensor, total: int, world: World) -> torch.Tensor:
    """Every rank's rows, in rank order, on every rank: each holds a contiguous block of at most
    ceil(total / size) rows (`block`), padded to that length for the collective and trimmed after."""
    if world.size == 1:
        return local
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else "cpu"
    size = -(-total // world.size)
    padded = torch.zeros((size, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[:len(local)] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    collective(torch.distributed.all_gather, parts, padded)
    return torch.cat([p[:len(r)] for p, r in zip(parts, blocks(total, world.size), strict=True)]).cpu()


def blocks(total: int, size: int) -> list[range]:
    """Row ranges of `total` rows over `size` ranks: contiguous, in rank order, the last ones shorter."""
    step = -(-total // size)
    return [range(min(r * step, total), min((r + 1) * step, total)) for r in range(size)]


def all_sum(values: Sequence[float], world: World) -> list[float]:
    """The sum over ranks of each value (float64), on every rank."""
    if world.size == 1:
        return list(values)
    backend_cuda = torch.distributed.get_backend() == "nccl"
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if backend_cuda else "cpu")
    collective(torch.distributed.all_reduce, t)
    return t.cpu().tolist()


def launch(nproc: int, module: str, args: Sequence[str], cuda: bool) -> None:
    """Start `nproc` copies of `python -m module args` on this machine and wait for them (torchrun --standalone).

    Threads: each copy gets OMP_NUM_THREADS = cores // nproc unless the variable is set. Port: a free one, or
    MASTER_PORT when set. A failure is one line: a rank's own error (it printed it), a rank killed by a signal,
    or a busy port; SIGTERM and Ctrl-C stop every rank.
    """
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not os.environ.get("LOGLEVEL"):  # the agent's own log lines: one per event and process
        quiet = logging.getLogger("torch.distributed.elastic")
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
        logging.getLogger("torch.distributed.launcher").propagate = False
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count() // nproc)))
    os.environ[LAUNCHER] = str(os.getpid())
    port = os.environ.get("MASTER_PORT", "0")
    if port != "0":
        check_port(int(port) if port.isdigit() else -1)
    logs = tempfile.mkdtemp(prefix="cxr14-torchelastic-")  # the agent's scratch, removed when the run ends
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint=f"localhost:{port}", max_restarts=0,
                          monitor_interval=0.1, logs_specs=DefaultLogsSpecs(log_dir=logs), start_method="spawn")
    print(f"train: {nproc} processes ({'NCCL, one GPU each' if cuda else 'gloo on the CPU'}, "
          f"{os.environ['OMP_NUM_THREADS']} thread(s) each)", flush=True)
    try:
        elastic_launch(config, sys.executable)("-m", module, *args)
    except ChildFailedError as exc:
        report_failure(exc.failures, nproc)
    except SignalException as exc:
        raise (KeyboardInterrupt() if exc.sigval == signal.SIGINT else Terminated()) from None
    except (RuntimeError, torch.distributed.DistError) as exc:  # the rendezvous itself
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"train: could not start {nproc} processes ({first[:200]})") from None
    finally:
        os.environ.pop(LAUNCHER, None)
        shutil.rmtree(logs, ignore_errors=True)


def check_port(port: int) -> None:
    """MASTER_PORT must be a port nobody listens on: a busy one is one line here, not a rendezvous timeout."""
    if not 0 < port < 65536:
        raise PipelineError(f"MASTER_PORT: {os.environ['MASTER_PORT']!r}; expected a port number (1-65535), "
                            "or unset it for a free one")
    with socket.socket() as s:
        try:
            s.bind(("localhost", port))
        except OSError:
            raise PipelineError(f"MASTER_PORT: port {port} is in use on this machine; choose another, or unset "
                                "MASTER_PORT for a free one") from None


def report_failure(failures: dict[int, Any], nproc: int) -> None:
    """The root cause among the failed ranks, once. The agent stops the surviving ranks before it reports, so
    `failures` also holds them (SIGTERM, or SIGKILL after its grace period when a rank is stuck in a CUDA call,
    as NCCL ranks are when a peer dies), and it does not say who failed first. In order: a rank that printed
    its own error (it exits with its status: nothing to add); ranks killed by another signal (all named,
    since a SIGKILL may be the agent's); else the ranks lost each other, or were stopped."""
    def signal_name(code: int) -> str:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"

    ranked = sorted(failures.items())
    for _, failure in ranked:
        if failure.exitcode > 0 and failure.exitcode not in (QUIET_EXIT, 130, 143):
            raise SystemExit(failure.exitcode)  # that rank printed its one-line error already
    killed = [(rank, f) for rank, f in ranked if f.exitcode < 0 and -f.exitcode not in (signal.SIGTERM, signal.SIGINT)]
    if killed:
        names = sorted({signal_name(f.exitcode) for _, f in killed})
        hint = " (out of memory?)" if names == ["SIGKILL"] else ""
        ranks = ", ".join(str(rank) for rank, _ in killed)
        raise PipelineError(f"train: rank{'s' if len(killed) > 1 else ''} {ranks} of {nproc} "
                            f"{'were' if len(killed) > 1 else 'was'} killed by {' or '.join(names)}{hint}; "
                            "the other ranks were stopped")
    if all(f.exitcode == QUIET_EXIT for _, f in ranked):
        raise PipelineError(f"train: the {nproc} processes lost each other (a collective failed or timed out after "
                            f"{TIMEOUT.seconds // 60} minutes)")
    rank, failure = ranked[0]
    raise PipelineError(f"train: rank {rank} of {nproc} stopped (exit status {failure.exitcode}); the other ranks "
                        "were stopped")
