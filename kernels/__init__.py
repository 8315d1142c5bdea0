"""nt's numeric kernels: one module per op family, forward beside backward.

`nt.kernels.cpu` holds Numba `@njit(parallel=True)` kernels; `nt.kernels.cuda` holds their
`numba.cuda` twins with the same names and signatures. Kernels see only flat arrays and
integers: every shape, dtype and range check happens before them, in `nt.ops`.
"""
