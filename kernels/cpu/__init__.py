"""CPU kernels: Numba `@njit(parallel=True, cache=True)` functions on flat NumPy arrays.

`nt.backend("cpu")` returns this module; every name here has a twin in `nt.kernels.cuda`.
"""
from .activations import (GELU, GELU_TANH, SIGMOID, SILU, act_backward, act_forward, gelu_backward,
                          gelu_forward, glu_backward, glu_forward)
from .align import dpo_backward, dpo_forward, grpo_backward, grpo_forward
from .bitnet import (act_quant, act_quant_int8, bitlinear_backward, bitlinear_forward, dequantize_tq2_0,
                     matmul_t2, pack_t2, pack_tq2_0, unpack_t2, weight_quant)
from .attention import attention_backward, attention_forward, attention_work_shape
from .dropout import dropout_backward, dropout_forward
from .elementwise import (add_backward, add_forward, bias_act_backward, bias_act_forward, concat_backward,
                          concat_forward, mul_backward, mul_forward, scale_backward, scale_forward, sum_rows_backward,
                          sum_rows_forward)
from .embedding import embedding_backward, embedding_forward
from .layernorm import layernorm_backward, layernorm_forward, residual_layernorm_backward, residual_layernorm_forward
from .lora import lora_backward, lora_forward
from .matmul import matmul_backward, matmul_forward
from .quant import F16_TABLE, dequantize_q4_0, dequantize_q8_0, matmul_q4_0, matmul_q8_0
from .memory import DEVICE, copy_, empty, fill_, synchronize, to_device, to_host
from .optim import (adam_update, add_noise_, clip_scale_, scale_, segment_sum_squares, sgd_update, sum_squares,
                    sum_squares_blocks, unscale_check_)
from .rmsnorm import qk_norm_backward, qk_norm_forward, rmsnorm_backward, rmsnorm_forward
from .rope import rope_backward, rope_forward
from .softmax_xent import (kl_div_backward, kl_div_forward, logprobs_backward, logprobs_forward, softmax_backward,
                           softmax_forward, softmax_xent_backward, softmax_xent_forward,
                           softmax_xent_grad_, xent_mean, xent_rows_grad_)
from .hebbian import hebbian_update
from .vision import (cls_pos_backward, cls_pos_forward, crop_flip, grayscale, pool_backward, pool_forward,
                     resize_bilinear, to_chw, unfold_backward, unfold_forward)
