"""N ranks as threads of one process, for testing nt.dist without MPI or GPUs.

`Group(N)` is the rendezvous; `FakeHost(group, rank)` is the host communicator NCCLComm
expects (sum, allgather_object, barrier); `FakeNCCL(group)` stands in for
`cupy.cuda.nccl`: the same names and raw-pointer calls, on host memory (an array's
"device pointer" is its host address), so NCCLComm's pointer arithmetic and grouping run
unchanged. Every collective sums in rank order.
"""
import ctypes
import threading

import numpy as np

_CTYPES = {0: (ctypes.c_float, np.float32), 1: (ctypes.c_double, np.float64)}


class Group:
    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots = [None] * size

    def exchange(self, rank: int, value) -> list:
        """Every rank's value, in rank order (a collective: all ranks must call it)."""
        self.slots[rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()
        return values


def run_ranks(size: int, fn):
    """fn(rank, group) on `size` threads; returns their results in rank order, raising
    the first exception any of them raised."""
    group = Group(size)
    results, errors = [None] * size, []

    def body(rank):
        try:
            results[rank] = fn(rank, group)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


class FakeHost:
    def __init__(self, group: Group, rank: int):
        self.group, self.rank, self.size = group, rank, group.size

    def sum(self, x: float) -> float:
        return float(sum(self.group.exchange(self.rank, float(x))))

    def allgather_object(self, obj) -> list:
        return self.group.exchange(self.rank, obj)

    def barrier(self) -> None:
        self.group.exchange(self.rank, None)

    def allgather_(self, buf, offsets) -> None:
        parts = self.group.exchange(self.rank, buf[offsets[self.rank]:offsets[self.rank + 1]].copy())
        for r, part in enumerate(parts):
            buf[offsets[r]:offsets[r + 1]] = part

    def abort(self, code: int = 1) -> None:
        raise SystemExit(code)


def _view(ptr: int, count: int, dtype: int) -> np.ndarray:
    ctype, _ = _CTYPES[dtype]
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctype)), shape=(count,))


class FakeNCCL:
    """The part of cupy.cuda.nccl that nt.dist.NCCLComm uses."""
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 0, 1, 0

    def __init__(self, group: Group):
        self.group = group
        self.calls = []   # (rank, name) of every collective, to check what was used
        outer = self

        class NcclCommunicator:
            def __init__(self, ndev, uid, rank):
                assert ndev == outer.group.size and uid == "uid"
                self.rank = rank

            def _sync(self, name, *args):
                outer.calls.append((self.rank, name))
                return outer.group.exchange(self.rank, args)

            def allReduce(self, send, recv, count, dtype, op, stream):
                everyone = self._sync("allReduce", send, count, dtype)
                total = sum(_view(p, c, d).copy() for p, c, d in everyone)
                outer.group.barrier.wait()           # all have read before anyone writes in place
                _view(recv, count, dtype)[:] = total

            def reduce(self, send, recv, count, dtype, op, root, stream):
                everyone = self._sync("reduce", send, count, dtype, root)
                total = sum(_view(p, c, d).copy() for p, c, d, _ in everyone)
                outer.group.barrier.wait()
                if self.rank == root:
                    _view(recv, count, dtype)[:] = total

            def broadcast(self, send, recv, count, dtype, root, stream):
                everyone = self._sync("broadcast", send, count, dtype, root)
                p, c, d, _ = everyone[root]
                data = _view(p, c, d).copy()
                outer.group.barrier.wait()
                _view(recv, count, dtype)[:] = data

        self.NcclCommunicator = NcclCommunicator

    def get_unique_id(self):
        return "uid"

    def groupStart(self):
        pass

    def groupEnd(self):
        pass
