"""Data-parallel training across processes: the one place that knows about ranks.

    mpiexec -n 2 python train/train_gpt2.py -B 4 ...            # each rank: B=4, same model
    mpiexec -n 2 python train/train_gpt2.py -B 4 --zero 1 ...   # optimizer state sharded

Every rank builds the same model (rank 0's weights are then broadcast, so a resumed or
randomly initialised model is the same everywhere), reads its own share of every batch
(DataLoader(rank=, world_size=)), runs forward and backward on it, and then:

    plain data parallel     grads all-reduced (summed, in buckets) and averaged; every
                            rank runs the same optimizer step on the whole buffer.
    ZeRO-1 (--zero 1)       grads reduce-scattered: rank r receives the averaged slice r
                            of the flat grad buffer (its `Shard`), keeps the optimizer's
                            moments for that slice only (1/N of the memory), updates that
                            slice of the parameters, and the slices are all-gathered.

Clipping uses the global norm: under ZeRO one float64 all-reduce of the shards' sums of
squares. The training loop (nt.train_utils.train) calls this module at a few points:
`world()` at start-up (which ranks exist; `check_same` refuses ranks whose settings or
data differ), `DataParallel` around the optimizer (sync_grads, clip_factor, step,
checkpoint state), `World.mean` for the losses it logs, and `World.is_main` for I/O:
rank 0 alone prints, logs, samples and writes checkpoints.

Communicators: `SelfComm` (one process; mpi4py not needed), `MPIComm` (mpi4py, host
buffers) and `NCCLComm` (CuPy's NCCL binding on device buffers, MPI for the rest). A rank
that raises makes every rank stop (MPI_Abort) with a message naming it; a rank that dies
is noticed by mpiexec, which ends the others.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import socket
import sys
from typing import Any, Callable, Iterator, Optional

import numpy as np

# environment variables that MPI launchers set in every process they start
_LAUNCHER_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")

DEFAULT_BUCKET = 1 << 22  # elements per all-reduce bucket (16 MiB of float32)


def _pointer(buf) -> int:
    """The address of an array's first element: a device pointer for a GPU array."""
    iface = getattr(buf, "__cuda_array_interface__", None) or buf.__array_interface__
    return int(iface["data"][0])


def partition(n: int, size: int) -> np.ndarray:
    """(size+1,) int64 offsets cutting n elements into `size` contiguous parts: rank r owns
    [offsets[r], offsets[r+1]), n // size elements each, the last rank also the n % size
    left over. Equal blocks let MPI use its block collectives (Reduce_scatter_block,
    Allgather: measured 2-5x faster than their variable-count forms here), plus a tail of
    fewer than `size` elements."""
    offsets = np.arange(size + 1, dtype=np.int64) * (n // size)
    offsets[-1] = n
    return offsets


# ============================================================================ communicators


class SelfComm:
    """A world of one process: every collective is the identity."""

    rank, size = 0, 1

    @property
    def host(self):
        """The communicator for host (NumPy) buffers: this one."""
        return self

    def allreduce_(self, buf, bucket: int = DEFAULT_BUCKET) -> None:
        pass

    def reduce_scatter(self, buf, out, offsets: np.ndarray) -> None:
        out[:] = buf[offsets[0]:offsets[1]]

    def allgather_(self, buf, offsets: np.ndarray) -> None:
        pass

    def bcast_(self, buf, root: int = 0) -> None:
        pass

    def sum(self, x: float) -> float:
        return float(x)

    def allgather_object(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        os._exit(code)


class MPIComm:
    """Collectives on host (NumPy) buffers through mpi4py."""

    def __init__(self, comm=None):
        import mpi4py
        # No MPI_Finalize at exit: it waits for every rank, so a rank leaving early (sys.exit
        # with an error) would hang in it while the others wait in a collective. Without
        # it the rank's exit status reaches mpiexec, which ends the others.
        mpi4py.rc.finalize = False
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    @property
    def host(self):
        """The communicator for host (NumPy) buffers: this one."""
        return self

    def allreduce_(self, buf, bucket: int = DEFAULT_BUCKET) -> None:
        """buf = the sum of every rank's buf, in place, as non-blocking all-reduces of
        `bucket` elements each (all in flight at once)."""
        MPI = self.MPI
        requests = [self.comm.Iallreduce(MPI.IN_PLACE, buf[i:i + bucket], MPI.SUM)
                    for i in range(0, buf.shape[0], bucket)]
        MPI.Request.Waitall(requests)

    def reduce_scatter(self, buf, out, offsets: np.ndarray) -> None:
        """out = the sum over ranks of buf[offsets[rank]:offsets[rank+1]] (a partition()):
        the equal blocks in one Reduce_scatter_block, the last rank's tail by a Reduce."""
        MPI, block = self.MPI, int(offsets[1])
        tail = block * self.size
        self.comm.Reduce_scatter_block(buf[:tail], out[:block], op=MPI.SUM)
        if offsets[-1] > tail:
            self.comm.Reduce(buf[tail:], out[block:] if self.rank == self.size - 1 else None,
                             op=MPI.SUM, root=self.size - 1)

    def allgather_(self, buf, offsets: np.ndarray) -> None:
        """Every rank's part buf[offsets[r]:offsets[r+1]] (a partition()) copied to every
        rank, in place: the equal blocks in one Allgather, the last rank's tail by Bcast."""
        tail = int(offsets[1]) * self.size
        self.comm.Allgather(self.MPI.IN_PLACE, buf[:tail])
        if offsets[-1] > tail:
            self.comm.Bcast(buf[tail:], root=self.size - 1)

    def bcast_(self, buf, root: int = 0) -> None:
        self.comm.Bcast(buf, root=root)

    def sum(self, x: float) -> float:
        return float(self.comm.allreduce(float(x), op=self.MPI.SUM))

    def allgather_object(self, obj) -> list:
        return self.comm.allgather(obj)

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)


class NCCLComm:
    """Collectives on device buffers through NCCL (CuPy's binding `cupy.cuda.nccl`, or any
    module with its functions), one process per GPU; host values and objects go through
    `host` (an MPIComm), which also hands NCCL's unique id from rank 0 to the others.

    Uneven shards (ZeRO) are N reduces / broadcasts in one NCCL group, one rooted at each
    rank, since NCCL's reduce-scatter and all-gather need equal parts."""

    def __init__(self, host, nccl=None):
        if nccl is None:
            from cupy.cuda import nccl
        self.nccl, self.host = nccl, host
        self.rank, self.size = host.rank, host.size
        uid = nccl.get_unique_id() if host.rank == 0 else None
        uid = host.allgather_object(uid)[0]
        self.comm = nccl.NcclCommunicator(host.size, uid, host.rank)
        self.stream = 0  # the default stream: the kernels that made the grads ran there

    def _dtype(self, buf) -> int:
        n = self.nccl
        return {np.dtype(np.float32): n.NCCL_FLOAT32, np.dtype(np.float64): n.NCCL_FLOAT64}[np.dtype(buf.dtype)]

    def allreduce_(self, buf, bucket: int = DEFAULT_BUCKET) -> None:
        n, p, t = self.nccl, _pointer(buf), self._dtype(buf)
        item = buf.dtype.itemsize
        n.groupStart()
        for i in range(0, buf.shape[0], bucket):
            count = min(bucket, buf.shape[0] - i)
            self.comm.allReduce(p + i * item, p + i * item, count, t, n.NCCL_SUM, self.stream)
        n.groupEnd()

    def reduce_scatter(self, buf, out, offsets: np.ndarray) -> None:
        n, p, t, item = self.nccl, _pointer(buf), self._dtype(buf), buf.dtype.itemsize
        n.groupStart()
        for r in range(self.size):
            lo, hi = int(offsets[r]), int(offsets[r + 1])
            # the root receives into `out`; elsewhere recvbuf is ignored
            self.comm.reduce(p + lo * item, _pointer(out), hi - lo, t, n.NCCL_SUM, r, self.stream)
        n.groupEnd()

    def allgather_(self, buf, offsets: np.ndarray) -> None:
        n, p, t, item = self.nccl, _pointer(buf), self._dtype(buf), buf.dtype.itemsize
        n.groupStart()
        for r in range(self.size):
            lo, hi = int(offsets[r]), int(offsets[r + 1])
            self.comm.broadcast(p + lo * item, p + lo * item, hi - lo, t, r, self.stream)
        n.groupEnd()

    def bcast_(self, buf, root: int = 0) -> None:
        self.comm.broadcast(_pointer(buf), _pointer(buf), buf.shape[0], self._dtype(buf), root, self.stream)

    def sum(self, x: float) -> float:
        return self.host.sum(x)

    def allgather_object(self, obj) -> list:
        return self.host.allgather_object(obj)

    def barrier(self) -> None:
        self.host.barrier()

    def abort(self, code: int = 1) -> None:
        self.host.abort(code)


# ============================================================================ the world


class World:
    """This process's place among the ranks: `rank`, `size`, `is_main`, and `comm`."""

    def __init__(self, comm):
        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        self.wait_at_exit = False   # see collectives_done()

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, logs, samples and writes checkpoints."""
        return self.rank == 0

    def mean(self, x: float) -> float:
        """The mean of a float over ranks (e.g. the step's loss, a validation loss)."""
        return self.comm.sum(x) / self.size if self.size > 1 else float(x)

    def barrier(self) -> None:
        self.comm.barrier()

    def collectives_done(self) -> None:
        """Say that this rank takes part in no more collectives (training is over; what is
        left is rank 0's writing and sampling): at exit it then waits for every rank, since
        mpiexec ends all ranks when one leaves early. A rank that fails before this exits
        at once, and mpiexec ends the others, which are waiting in a collective."""
        self.wait_at_exit = True

    @contextlib.contextmanager
    def rank0_first(self) -> Iterator[None]:
        """Run the block on rank 0, then on the others (e.g. building caches on disk that
        the others then read instead of writing the same files at once)."""
        if not self.is_main:
            self.comm.barrier()
        yield
        if self.is_main:
            self.comm.barrier()

    def check_same(self, what: str, *values) -> None:
        """Refuse to go on (ValueError on every rank) unless every rank passes equal
        `values` (JSON-able objects and NumPy arrays), compared by their SHA-256."""
        digest = fingerprint(*values)
        digests = self.comm.allgather_object(digest)
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise ValueError(f"{what} differ between ranks: rank(s) {differ} do not match rank 0 "
                             "(every rank must run the same command on the same data)")

    def broadcast_params(self, params) -> None:
        """Every rank's parameters (trainable and frozen) become rank 0's."""
        for buf in (params.flat, params.frozen.buf[:params.frozen.top]):
            if buf.shape[0]:
                self.comm.bcast_(buf, 0)


def fingerprint(*values) -> str:
    """SHA-256 of values: NumPy arrays by dtype, shape and bytes (arrays over 64 MiB by
    64 evenly spaced 1 MiB pieces), anything else by its sorted JSON."""
    h = hashlib.sha256()
    for v in values:
        if isinstance(v, np.ndarray):
            a = np.ascontiguousarray(v).reshape(-1).view(np.uint8)
            h.update(f"{v.dtype.str}{v.shape}".encode())
            if a.size <= 1 << 26:
                h.update(a.tobytes())
            else:
                for start in np.linspace(0, a.size - (1 << 20), 64).astype(np.int64):
                    h.update(a[start:start + (1 << 20)].tobytes())
        else:
            h.update(json.dumps(v, sort_keys=True, default=str).encode())
    return h.hexdigest()


_WORLD: Optional[World] = None


def launched_by_mpi() -> bool:
    """Whether an MPI launcher (mpiexec) started this process as one of several."""
    return any(int(os.environ.get(name, "1") or "1") > 1 for name in _LAUNCHER_SIZE)


def world(device: str = "cpu") -> World:
    """This process's World, set up on first call: one rank unless an MPI launcher started
    several (then mpi4py is imported; `pip install 'nt[mpi]'`). Other ranks' stdout goes
    to /dev/null; each rank's threads become the cores / ranks on its machine unless
    NUMBA_NUM_THREADS is set; an uncaught exception on any rank aborts them all.

    device "cuda": rank r uses its machine's GPU (local rank) and the grads travel by NCCL
    (NCCLComm); call it before anything touches the GPU (prepare_run does)."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    if not launched_by_mpi():
        _WORLD = World(SelfComm())
        return _WORLD
    try:
        host = MPIComm()
    except ImportError:
        raise RuntimeError("started by mpiexec with several ranks, but mpi4py is not installed: "
                           "pip install 'nt[mpi]'") from None
    _abort_on_exception(host)
    node = host.comm.Split_type(host.MPI.COMM_TYPE_SHARED)
    comm = host if device != "cuda" else _nccl_on_local_gpu(host, node.Get_rank())
    _WORLD = w = World(comm)
    atexit.register(lambda: w.wait_at_exit and host.barrier())
    if "NUMBA_NUM_THREADS" not in os.environ:
        set_threads(max(1, (os.cpu_count() or 1) // node.Get_size()))
    # mpiexec reports a rank that dies by its PID: this table names the rank
    where = comm.allgather_object(f"{comm.rank}:{os.getpid()}@{socket.gethostname()}")
    if comm.rank == 0:
        print(f"nt.dist: {comm.size} ranks (rank:pid@host) {' '.join(where)}", file=sys.stderr, flush=True)
    else:
        sys.stdout = open(os.devnull, "w")
    return _WORLD


def _nccl_on_local_gpu(host: MPIComm, local_rank: int) -> NCCLComm:
    """Select this rank's GPU (for Numba and CuPy alike), then open NCCL on it."""
    from numba import cuda
    import cupy
    cuda.select_device(local_rank)
    cupy.cuda.Device(local_rank).use()
    return NCCLComm(host)


def use(w: Optional[World]) -> None:
    """Make `w` this process's World (None: set it up again on the next world())."""
    global _WORLD
    _WORLD = w


def set_threads(n: int) -> None:
    """Numba's and OpenBLAS's thread counts for this process."""
    import ctypes
    import numba
    from nt.kernels.cpu import blas
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    ctypes.CFUNCTYPE(None, ctypes.c_int)(blas._set_threads)(n)


def _abort_on_exception(comm) -> None:
    """An uncaught exception on any rank stops every rank, naming it (otherwise the others
    would wait forever in their next collective). A rank that exits with an error status
    (sys.exit("error: ...")) or dies is seen by mpiexec, which ends the others."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        print(f"nt.dist: rank {comm.rank} of {comm.size} failed ({kind.__name__}: {value}); aborting all ranks",
              file=sys.stderr, flush=True)
        comm.abort(1)

    sys.excepthook = hook


# ============================================================================ data parallel step


class Shard:
    """Rank r's slice [lo, hi) of a Params' flat buffer, shaped like a Params for the
    optimizers: `flat` is a view of the parameters, `grad` its own buffer (where the
    reduce-scatter delivers the averaged grads), `decay_mask()` the slice of the mask."""

    def __init__(self, params, lo: int, hi: int):
        self.full, self.lo, self.hi = params, lo, hi
        self.size = hi - lo
        self.flat = params.flat[lo:hi]
        self.grad = params.k.empty(self.size, params.dtype)
        params.k.fill_(self.grad, 0.0)
        self.norm_partials = None
        self.tensors = {}  # per-tensor optimizers (Chuck) cannot run on a slice

    @property
    def k(self):
        return self.full.k

    @property
    def dtype(self):
        return self.full.dtype

    @property
    def device(self) -> str:
        return self.full.device

    def decay_mask(self) -> np.ndarray:
        return self.full.decay_mask()[self.lo:self.hi]

    def zero_grad(self) -> None:
        self.k.fill_(self.grad, 0.0)


class DataParallel:
    """The optimizer of a data-parallel run: it averages the grads over ranks and steps
    the optimizer `make_optimizer(params)` builds (over this rank's Shard with zero=1).

        dp = DataParallel(params, lambda p: AdamW(p, lr=...), zero=1)
        ...backward on this rank's batch...
        dp.sync_grads()                         # grads averaged over ranks
        norm, clip = dp.clip_factor(1.0)        # global norm
        dp.step(lr=lr, grad_scale=clip, loss=world.mean(loss))

    It is the optimizer to checkpoint: `state_dict()` (collective under ZeRO: every rank
    must call it) is the whole optimizer's state in the single-process format, and
    `load_state_dict()` takes such a state and keeps this rank's slice, so a checkpoint
    resumes on any number of ranks. With one rank it is the plain optimizer."""

    def __init__(self, params, make_optimizer: Callable[[Any], Any], zero: int = 0,
                 w: Optional[World] = None, bucket: int = DEFAULT_BUCKET):
        from .optim import Chuck
        if zero not in (0, 1):
            raise ValueError(f"zero must be 0 or 1, got {zero}")
        self.world = w or world()
        N = self.world.size
        # one rank owns everything: ZeRO is the plain optimizer there
        self.params, self.zero, self.bucket = params, int(zero and N > 1), bucket
        self.offsets = partition(params.size, N)
        if self.zero:
            self.shard = Shard(params, int(self.offsets[self.world.rank]), int(self.offsets[self.world.rank + 1]))
            self.optimizer = make_optimizer(self.shard)
        else:
            self.shard = None
            self.optimizer = make_optimizer(params)
        if zero and isinstance(self.optimizer, Chuck):
            raise ValueError("Chuck keeps per-tensor statistics, which a ZeRO shard (a slice of the flat buffer) "
                             "does not have: use --zero 0 with --optimizer chuck, or another optimizer")
        self.bytes_sent = 0  # per step, as the collectives' send sizes (for benchmarks)

    @property
    def k(self):
        return self.params.k

    @property
    def step_count(self) -> int:
        return self.optimizer.step_count

    def sync_grads(self) -> None:
        """Average the grads over ranks: all-reduced into params.grad, or under ZeRO
        reduce-scattered into this rank's shard.grad."""
        N = self.world.size
        if N == 1:
            return
        grad = self.params.grad
        if self.zero:
            self.world.comm.reduce_scatter(grad, self.shard.grad, self.offsets)
            self.k.scale_(self.shard.grad, 1.0 / N)
        else:
            self.world.comm.allreduce_(grad, self.bucket)
            self.k.scale_(grad, 1.0 / N)

    def clip_factor(self, max_norm: float) -> tuple[float, float]:
        """(global grad norm, the factor that clips it to max_norm) of the averaged
        grads; under ZeRO one scalar all-reduce of the shards' sums of squares."""
        from .optim import _partials, clip_factor
        if not self.zero:
            return clip_factor(self.params, max_norm)
        local = self.k.sum_squares(self.shard.grad, _partials(self.shard))
        norm = float(np.sqrt(self.world.comm.sum(local)))
        if np.isfinite(norm) and norm > max_norm > 0:
            return norm, max_norm / (norm + 1e-6)
        return norm, 1.0

    def step(self, **kwargs) -> None:
        """The optimizer's step (same arguments); under ZeRO the updated slices are then
        all-gathered so every rank holds all parameters."""
        self.optimizer.step(**kwargs)
        if self.zero:
            self.world.comm.allgather_(self.params.flat, self.offsets)

    def state_dict(self) -> dict:
        """The whole optimizer's state (under ZeRO gathered from every rank: call it on all)."""
        state = self.optimizer.state_dict()
        if not self.zero:
            return state
        for name in self.optimizer._device:
            part = np.ascontiguousarray(state[name])
            full = np.empty(self.params.size, dtype=part.dtype)
            full[self.shard.lo:self.shard.hi] = part
            self.world.comm.host.allgather_(full, self.offsets)   # host copies: through MPI under NCCL
            state[name] = full
        return state

    def load_state_dict(self, state: dict) -> None:
        """Take a whole optimizer's state (any rank count's checkpoint); keep this rank's slice."""
        if self.zero:
            state = dict(state)
            for name in self.optimizer._device:
                full = np.asarray(state[name])
                if full.shape != (self.params.size,):
                    raise ValueError(f"optimizer state {name!r} has shape {full.shape}, expected ({self.params.size},)")
                state[name] = full[self.shard.lo:self.shard.hi]
        self.optimizer.load_state_dict(state)

    def state_bytes(self) -> int:
        """Bytes of optimizer state (moments, momentum) this rank holds."""
        return sum(int(getattr(self.optimizer, name).nbytes) for name in self.optimizer._device)

    def bytes_per_step(self) -> int:
        """Bytes one rank sends per step in a ring implementation: 2 (N-1)/N x the grad
        buffer for an all-reduce, the same for reduce-scatter + all-gather (ZeRO)."""
        N = self.world.size
        return int(2 * (N - 1) * self.params.size * self.params.dtype.itemsize // N)


class Gathered:
    """An optimizer state already gathered (DataParallel.state_dict() on every rank),
    in the form save_checkpoint takes an optimizer (rank 0 writes it)."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


class SplitBatches:
    """A batch source whose batches are the whole world's ((N*B, ...) arrays, the same on
    every rank): each rank keeps its own B rows. Its position is already global, so
    checkpoints resume on any rank count whose global batch is the same. For sources that
    are not rank-aware themselves (e.g. nt.sft.ChatBatches built with B * ranks)."""

    def __init__(self, source, w: Optional[World] = None):
        self.source, self.world = source, w or world()

    def next_batch(self):
        batch = self.source.next_batch()
        r, N = self.world.rank, self.world.size
        rows = lambda a: a[r * (a.shape[0] // N):(r + 1) * (a.shape[0] // N)]  # noqa: E731
        if isinstance(batch, dict):
            return {key: rows(value) for key, value in batch.items()}
        return tuple(rows(a) for a in batch)

    def state(self) -> dict:
        return self.source.state()

    def set_state(self, state: dict) -> None:
        self.source.set_state(state)


def split_source(source, w: Optional[World] = None):
    """`source` as this rank's share of every batch: a SplitBatches as it is, a rank-aware
    DataLoader in a RankedSource; a source that is neither is refused (ValueError)."""
    w = w or world()
    if w.size == 1 or isinstance(source, (SplitBatches, RankedSource)):
        return source
    return RankedSource(source, w)


class RankedSource:
    """A rank-aware DataLoader whose checkpointed position counts windows of the whole
    world (the rank's position x ranks), so a checkpoint resumes on any number of ranks
    whose global batch divides it."""

    def __init__(self, loader, w: Optional[World] = None):
        self.loader, self.world = loader, w or world()
        if getattr(loader, "world_size", None) != self.world.size or getattr(loader, "rank", None) != self.world.rank:
            raise ValueError(f"the batch source is not split across the {self.world.size} ranks "
                             f"(it needs rank={self.world.rank}, world_size={self.world.size})")

    def next_batch(self):
        return self.loader.next_batch()

    def state(self) -> dict:
        state = self.loader.state()
        state["position"] = state["position"] * self.world.size
        return state

    def set_state(self, state: dict) -> None:
        position = state["position"]
        N = self.world.size
        if not isinstance(position, (int, np.integer)) or isinstance(position, bool) or position % N:
            raise ValueError(f"the checkpoint's data position ({position!r} windows) cannot be split over {N} ranks")
        self.loader.set_state({**state, "position": int(position) // N})


__all__ = ["World", "world", "use", "DataParallel", "Shard", "Gathered", "RankedSource", "SplitBatches", "split_source", "SelfComm", "MPIComm",
           "NCCLComm", "partition", "fingerprint", "launched_by_mpi", "set_threads"]
