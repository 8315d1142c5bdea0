"""A LLaMA-family decoder in PyTorch, the same architecture as nt.models.Llama, loading nt's flat weights.

Used only by the benchmarks, written as a careful PyTorch user would: RMSNorm (F.rms_norm),
fused qkv and gate_up linears without biases, RoPE with the half-split pairing (HF
transformers') and optionally Llama-3's frequency scaling, grouped-query attention through
scaled_dot_product_attention(enable_gqa=True), SwiGLU, tied classifier, AdamW(fused=True)
with no decay on the norms. Covers the plain shapes only (no qkv bias, qk-norm, post-norms,
sliding window or GeGLU): those of the benchmark.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def rope_inv_freq(hs: int, theta: float, scaling=None) -> torch.Tensor:
    """theta^(-2i/hs) for i < hs/2; with scaling = (factor, low, high, original_context),
    Llama-3's rule: long wavelengths divided by factor, short ones kept, smooth between."""
    inv_freq = theta ** -(torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    if scaling is not None:
        factor, low, high, context = scaling
        smooth = ((context * inv_freq / (2 * math.pi) - low) / (high - low)).clamp(0.0, 1.0)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + hs/2) of x (B, heads, T, hs) by the angles in cos/sin (T, hs/2)."""
    x0, x1 = x.chunk(2, dim=-1)
    return torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, H, self.NH, self.NKV, self.hs, self.eps = cfg.dim, cfg.ffn_hidden, cfg.n_heads, cfg.n_kv_heads, cfg.hs, cfg.norm_eps
        self.attn_norm, self.ffn_norm = nn.Parameter(torch.ones(C)), nn.Parameter(torch.ones(C))
        self.qkv = nn.Linear(C, cfg.qkv_width, bias=False)
        self.attn_out = nn.Linear(self.NH * self.hs, C, bias=False)
        self.gate_up = nn.Linear(C, 2 * H, bias=False)
        self.down = nn.Linear(H, C, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        NH, NKV, hs = self.NH, self.NKV, self.hs
        qkv = self.qkv(F.rms_norm(x, (C,), self.attn_norm, self.eps))
        q, k, v = qkv.split([NH * hs, NKV * hs, NKV * hs], dim=2)
        q = rotate_half(q.view(B, T, NH, hs).transpose(1, 2), cos, sin)
        k = rotate_half(k.view(B, T, NKV, hs).transpose(1, 2), cos, sin)
        v = v.view(B, T, NKV, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=NKV != NH)
        x = x + self.attn_out(y.transpose(1, 2).reshape(B, T, NH * hs))
        gate, up = self.gate_up(F.rms_norm(x, (C,), self.ffn_norm, self.eps)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class TorchLlama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = nn.Parameter(torch.ones(cfg.dim))
        self.register_buffer("inv_freq", rope_inv_freq(cfg.hs, cfg.rope_theta, cfg.rope_scaling), persistent=False)

    def forward(self, idx, targets):
        T = idx.shape[1]
        angles = torch.arange(T, dtype=torch.float64)[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos().float(), angles.sin().float()
        x = self.wte(idx)
        for block in self.h:
            x = block(x, cos, sin)
        logits = F.rms_norm(x, (self.cfg.dim,), self.norm_f, self.cfg.norm_eps) @ self.wte.weight.T
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-1)

    @torch.no_grad()
    def load_nt_flat(self, flat: np.ndarray):
        """Copy weights from nt's flat buffer (nt.models.llama.param_layout order; padded vocabulary rows dropped)."""
        from nt.models.llama import param_layout
        from torch_gpt2 import flat_views
        cfg, views = self.cfg, flat_views(param_layout(self.cfg), flat)
        self.wte.weight.copy_(views["wte"][:cfg.vocab_size])
        for l, b in enumerate(self.h):
            b.attn_norm.copy_(views["attn_norm"][l])
            b.ffn_norm.copy_(views["ffn_norm"][l])
            for mod, name in [(b.qkv, "qkvw"), (b.attn_out, "attn_out"), (b.gate_up, "gate_up"), (b.down, "down")]:
                mod.weight.copy_(views[name][l])
        self.norm_f.copy_(views["norm_f"])

    def adamw(self, lr, weight_decay):
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
