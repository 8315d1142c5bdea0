"""Atomic counters for threads that cooperate inside one parallel region.

Numba has no CPU atomics, so these are small LLVM intrinsics: a sequentially consistent
fetch-and-add, an acquire load, and the spin-wait hint. The fused decoder (decode.py) runs a
whole token in one parallel region and uses them as work counters: a thread claims the
chunks of a phase with `fetch_add` on the phase's claim counter until none is left, adds
each finished chunk to the phase's done counter, and waits (`wait_at_least`) only for the
done counter to reach the phase's chunk count. A chunk once claimed is being run by a live
thread, so the wait always ends, however many threads the threading layer actually runs
(one thread, or iterations run one after another, simply runs every chunk itself): unlike a
barrier that waits for a number of threads to arrive, it cannot deadlock.

Counters live in an int64 array; callers give each counter its own 64-byte line (index a
multiple of LINE) so threads bumping one do not invalidate the line another spins on.
"""
import numba
from llvmlite import binding as llvm_binding, ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LINE = 8   # int64s per cache line

_X86 = llvm_binding.get_process_triple().startswith(("x86_64", "i686", "i386"))
_SPINS = 4000   # pause hints before a waiting thread starts yielding its core (see wait_at_least)


def _slot(context, builder, sig, args):
    ary = context.make_array(sig.args[0])(context, builder, args[0])
    return builder.gep(ary.data, [context.cast(builder, args[1], sig.args[1], types.intp)])


def _int64_array(a):
    return isinstance(a, types.Array) and a.dtype == types.int64 and a.ndim == 1


@intrinsic
def fetch_add(typingctx, a, i, v):
    """a[i] += v atomically (sequentially consistent); returns a[i] before the add."""
    if not (_int64_array(a) and isinstance(i, types.Integer) and isinstance(v, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.atomic_rmw("add", _slot(context, builder, sig, args),
                                  context.cast(builder, args[2], sig.args[2], types.int64), "seq_cst")
    return types.int64(a, i, v), codegen


@intrinsic
def load_acquire(typingctx, a, i):
    """a[i], read atomically with acquire order: what the writer stored before its
    (seq_cst) fetch_add on a[i] is visible after this load sees that add."""
    if not (_int64_array(a) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_slot(context, builder, sig, args), "acquire", 8)
    return types.int64(a, i), codegen


@intrinsic
def spin_pause(typingctx):
    """The spin-wait hint (x86 `pause`: the waiting hyperthread yields its pipeline, and the
    loop's exit does not pay a memory-order flush); nothing on other targets."""
    def codegen(context, builder, sig, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def yield_core(typingctx):
    """sched_yield(2): let another runnable thread have this core (a waiting thread whose
    partner was descheduled by another process would otherwise spin through its time slice)."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


@njit(cache=True)
def wait_at_least(a, i, n):
    """Return once a[i] >= n: spin with the pause hint for a few microseconds (the usual
    wait, for the other thread's last chunk), then yield the core between looks."""
    spins = 0
    while load_acquire(a, i) < n:
        if spins < _SPINS:
            spin_pause()
            spins += 1
        else:
            yield_core()
