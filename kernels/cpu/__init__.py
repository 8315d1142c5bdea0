"""CPU kernels: Numba `@njit(parallel=True, cache=True)` functions on flat NumPy arrays.

`nt.backend("cpu")` returns this module; every name here has a twin in `nt.kernels.cuda`.
"""
from .activations import gelu_backward, gelu_forward
from .attention import attention_backward, attention_forward
from .elementwise import add_backward, add_forward
from .embedding import embedding_backward, embedding_forward
from .layernorm import layernorm_backward, layernorm_forward
from .matmul import matmul_backward, matmul_forward
from .memory import DEVICE, copy_, empty, fill_, to_device, to_host
from .optim import adamw_update, scale_, sum_squares, sum_squares_blocks
from .softmax_xent import softmax_xent_backward, softmax_xent_forward
