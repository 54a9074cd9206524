"""Tensor parallelism on one machine: rank 0 is the caller's process, ranks 1…N−1 are worker processes it starts.

The ranks join a torch.distributed process group (gloo on the CPU, NCCL with one GPU a rank) for the decoder's
collectives (model/parallel.py); each holds only its shard (sharding.py) and a KV cache for it. Rank 0 schedules,
encodes media, samples and detokenizes; the workers only run forwards. What a forward needs (the runner's `Step`:
tokens, block tables, positions, media rows) reaches them over a local connection each (authenticated with a key
only the workers get), in the order rank 0 runs them, so every rank enters the same collectives in the same order.
A worker whose parent is gone sees its connection close and exits.
"""

from __future__ import annotations

import itertools
import os
import queue
import secrets
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from multiprocessing.connection import Client, Connection, Listener
from typing import Any, ContextManager

import torch
import torch.distributed as dist

from .engine.paged import PagedKVCache
from .engine.runner import Step, execute
from .errors import QwenError
from .model.parallel import TensorParallel

START_TIMEOUT_S = 120  # joining the group and loading a shard
COLLECTIVE_TIMEOUT = timedelta(seconds=60)  # a rank that stops answering fails the step instead of hanging it
IDLE_TIMEOUT = timedelta(days=30)  # torchrun workers wait this long for rank 0's next message


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def join_group(rank: int, size: int, port: int, device: torch.device) -> TensorParallel:
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=COLLECTIVE_TIMEOUT)
    return TensorParallel(size, rank)


def rank_device(device: torch.device, rank: int) -> torch.device:
    """One GPU a rank (cuda:rank); the CPU for all."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def rank_threads(size: int) -> int:
    """Each rank's share of this machine's cores (ranks on one machine split them rather than contend)."""
    return max(1, len(os.sched_getaffinity(0)) // size)


class _Ranks:
    """Ranks 1…N−1 as rank 0's runners reach them (engine/runner.py's `Ranks`); subclasses say how a message
    travels."""

    def __init__(self) -> None:
        self._ids = itertools.count()
        self._dropped: list[int] = []  # caches whose runner is gone: freed with the next message
        self._closed = False

    def new_cache(self, num_blocks: int, lock: ContextManager) -> int:
        cache_id = next(self._ids)
        with lock:  # messages go in the order forwards run
            self._send(("cache", cache_id, num_blocks))
        return cache_id

    def drop(self, cache_id: int) -> None:
        """A runner's cache is no longer needed (called from its finalizer, any thread: list.append is atomic)."""
        self._dropped.append(cache_id)

    def send(self, cache_id: int | None, step: Step) -> None:
        self._send(("step", cache_id, step))

    def _send(self, message: tuple) -> None:
        dropped, self._dropped = self._dropped, []
        self._deliver((message, dropped))

    def _deliver(self, payload: tuple) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop every worker, once."""
        if self._closed:
            return
        self._closed = True
        try:
            self._deliver((("stop",), []))
        except QwenError:  # a worker already gone
            pass
        self._stopped()
        if dist.is_initialized():
            dist.destroy_process_group()

    @property
    def alive(self) -> bool:
        """Every rank still there, as far as this process can tell."""
        return not self._closed

    def _stopped(self) -> None:
        """After the stop message: wait for the workers where this process owns them."""


class LocalRanks(_Ranks):
    """Workers this process started, one connection each."""

    def __init__(self, processes: list[subprocess.Popen], pipes: list[Connection]) -> None:
        super().__init__()
        self.processes, self.pipes = processes, pipes

    @property
    def alive(self) -> bool:
        return not self._closed and all(process.poll() is None for process in self.processes)

    def _deliver(self, payload: tuple) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(payload)
            except (BrokenPipeError, ConnectionError, OSError):
                raise QwenError(f"tensor-parallel rank {pipe.rank} has stopped (its process exited); load the model "
                                "again") from None

    def _stopped(self) -> None:
        """Politely, then by force after a few seconds."""
        deadline = time.monotonic() + 10
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


class LaunchedRanks(_Ranks):
    """Ranks torchrun started beside this one (possibly on other machines): messages are broadcast over a gloo group
    of their own, whose timeout allows a server's idle hours."""

    def __init__(self, control: Any) -> None:
        super().__init__()
        self.control = control

    def _deliver(self, payload: tuple) -> None:
        try:
            dist.broadcast_object_list([payload], src=0, group=self.control)
        except RuntimeError as err:
            self._closed = True  # a peer is gone: nothing more can run
            raise QwenError(f"a tensor-parallel rank has stopped ({str(err).splitlines()[0][:200]})") from None


def launched() -> tuple[int, int] | None:
    """(rank, world size) when torchrun started this process (its environment says so), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def join_launched(size: int, device: torch.device, load_rank: Any) -> tuple[LaunchedRanks, TensorParallel]:
    """Under torchrun: join its group (env://). Rank 0 returns to serve; every other rank loads its shard and runs
    the steps rank 0 broadcasts until told to stop, then exits the process (it never runs the command itself)."""
    rank, world = launched()
    if world != size:
        raise QwenError(f"torchrun started {world} processes but --tp is {size}; give --tp {world}")
    here = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if device.type == "cuda" else device
    dist.init_process_group("nccl" if here.type == "cuda" else "gloo", init_method="env://", timeout=COLLECTIVE_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    parallel = TensorParallel(size, rank)
    if rank == 0:
        return LaunchedRanks(control), parallel
    decoder = load_rank(parallel, here)

    def receive() -> tuple:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        return box[0]

    try:
        run_steps(decoder, receive)
    finally:
        dist.destroy_process_group()
    sys.exit(0)


def run_steps(decoder: Any, receive: Any) -> None:
    """A worker's loop: allocate and free KV caches, run forwards, as rank 0's messages say, until "stop" or until
    rank 0 is gone (`receive` raises)."""
    caches: dict[int, PagedKVCache] = {}
    while True:
        try:
            message, dropped = receive()
        except (EOFError, ConnectionError, OSError, RuntimeError):  # rank 0 has exited
            return
        for cache_id in dropped:
            caches.pop(cache_id, None)
        if message[0] == "stop":
            return
        if message[0] == "cache":
            caches[message[1]] = PagedKVCache(decoder.shard, message[2], decoder.dtype, decoder.device)
        else:
            with torch.inference_mode():
                execute(decoder, caches.get(message[1]) if message[1] is not None else None, message[2])


def spawn(size: int, device: torch.device, load_rank: Any) -> tuple[LocalRanks, TensorParallel]:
    """Start ranks 1…size−1 as fresh processes (`python -m qwen_engine.distributed`: nothing of the caller's script
    is imported again), each running `load_rank(parallel, device)` for its shard; join them as rank 0. One clear
    error if any fails to start or load within START_TIMEOUT_S."""
    if dist.is_initialized():
        raise QwenError("this process already runs a tensor-parallel model (or another torch.distributed group); "
                        "close() that model before loading another with tensor_parallel")
    authkey = secrets.token_bytes(32)
    listener = Listener(("127.0.0.1", 0), authkey=authkey)
    port = free_port()
    environment = dict(os.environ, QWEN_TP_AUTHKEY=authkey.hex())
    processes = [subprocess.Popen([sys.executable, "-m", "qwen_engine.distributed", str(rank), str(size),
                                   f"{listener.address[0]}:{listener.address[1]}"], env=environment)
                 for rank in range(1, size)]
    ranks = LocalRanks(processes, [])
    try:
        for _ in processes:
            ranks.pipes.append(_accept(listener, processes))
        ranks.pipes.sort(key=lambda pipe: pipe.rank)
        for pipe in ranks.pipes:
            pipe.send((pipe.rank, size, port, device, load_rank))
        joined: list[TensorParallel] = []
        joiner = threading.Thread(target=lambda: joined.append(join_group(0, size, port, device)), daemon=True)
        joiner.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        for pipe, process in zip(ranks.pipes, processes):
            status = _wait(pipe, process, deadline)
            if status != "ready":
                raise QwenError(f"tensor-parallel rank {pipe.rank} could not load its shard: {status}")
        joiner.join(max(1.0, deadline - time.monotonic()))
        if not joined:
            raise QwenError(f"rank 0 could not join the tensor-parallel group within {START_TIMEOUT_S} s")
    except BaseException:
        ranks.close()
        raise
    finally:
        listener.close()
    return ranks, joined[0]


def _accept(listener: Listener, processes: list[subprocess.Popen]) -> Connection:
    """The next worker's connection (it says its rank first); one clear error if none comes in time."""
    accepted: queue.Queue[Connection] = queue.Queue()
    threading.Thread(target=lambda: accepted.put(listener.accept()), daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            pipe = accepted.get(timeout=0.2)
        except queue.Empty:
            dead = [p for p in processes if p.poll() is not None]
            if dead:
                raise QwenError(f"a tensor-parallel worker exited while starting (exit code {dead[0].returncode})") from None
            continue
        pipe.rank = pipe.recv()
        return pipe
    raise QwenError(f"tensor-parallel workers did not connect within {START_TIMEOUT_S} s")


def _wait(pipe: Connection, process: subprocess.Popen, deadline: float) -> str:
    while not pipe.poll(0.2):
        if process.poll() is not None:
            raise QwenError(f"tensor-parallel rank {pipe.rank} exited while starting (exit code {process.returncode})")
        if time.monotonic() > deadline:
            raise QwenError(f"tensor-parallel rank {pipe.rank} did not start within {START_TIMEOUT_S} s")
    return pipe.recv()


def _worker(rank: int, address: str, authkey: bytes) -> None:
    """A worker rank: connect to rank 0, join the group, load the shard, then run every step rank 0 sends until
    told to stop or until rank 0 is gone."""
    host, _, port = address.rpartition(":")
    pipe = Client((host, int(port)), authkey=authkey)
    pipe.send(rank)
    _, size, group_port, device, load_rank = pipe.recv()
    torch.set_num_threads(rank_threads(size))
    here = rank_device(device, rank)
    try:
        parallel = join_group(rank, size, group_port, here)
        decoder = load_rank(parallel, here)
    except QwenError as err:
        pipe.send(str(err))
        return
    except Exception as err:  # a bug: still one line for rank 0 to report
        pipe.send(f"{type(err).__name__}: {err}")
        return
    pipe.send("ready")
    try:
        run_steps(decoder, pipe.recv)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[3], bytes.fromhex(os.environ.pop("QWEN_TP_AUTHKEY")))
