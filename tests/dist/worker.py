"""A data-parallel loop for the failure tests, run under mpiexec:

    mpiexec -n 2 python worker.py RANK HOW     # RANK fails at step 3 by HOW: kill | raise | exit
"""
import os
import signal
import sys

import numpy as np

import nt
from nt import dist
from nt.optim import AdamW

fail_rank, how = int(sys.argv[1]), sys.argv[2]
world = dist.world()
params = nt.Params("cpu", np.float32, [("w", (1000,), True)])
dp = dist.DataParallel(params, lambda p: AdamW(p, lr=1e-3), zero=1)
for step in range(1000):
    if step == 3 and world.rank == fail_rank:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "raise":
            raise RuntimeError("a failure in the step")
        sys.exit("error: this rank gives up")
    params.grad[:] = 1.0
    dp.sync_grads()
    dp.step()
print("all steps done")
