"""Atomic counters for threads that cooperate inside one parallel region.

Numba has no CPU atomics, so these are small LLVM intrinsics: a sequentially consistent
fetch-and-add, an acquire load, the spin-wait hint and sched_yield. The fused decoder
(decode.py) runs a whole token in one parallel region and uses two counters: the units of
every phase of the token are numbered in order; a thread claims the next unit with
`fetch_add` on the claim counter, waits (`wait_at_least`) until the done counter reaches the
first unit of the unit's phase (every unit of the earlier phases done), runs it, and adds it
to the done counter. Every unit numbered before a claimed one was claimed before it, so it
is being run by a live thread and the wait always ends, however many threads the threading
layer actually runs (one thread, or iterations run one after another, simply runs every
unit itself): unlike a barrier that waits for a number of threads to arrive, it cannot
deadlock.

Counters live in an int64 array; callers give each counter its own 64-byte line (index a
multiple of LINE) so threads bumping one do not invalidate the line another spins on.
"""
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
