"""GPT-2 in PyTorch, the same architecture as nt.models.GPT2, loading nt's flat weights.

Used only by the benchmarks, as a careful PyTorch user would write it: fused QKV,
scaled_dot_product_attention, tied classifier, AdamW(fused=True) with no decay on
biases and norms.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def flat_views(layout, flat: np.ndarray) -> dict:
    """{name: torch tensor} copied out of nt's flat parameter buffer, in `layout`'s order."""
    views, offset = {}, 0
    for name, shape, _ in layout:
        size = int(np.prod(shape))
        views[name] = torch.from_numpy(flat[offset:offset + size].reshape(shape).copy())
        offset += size
    return views


class Block(nn.Module):
    def __init__(self, C, NH):
        super().__init__()
        self.NH = NH
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.c_attn, self.attn_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (z.view(B, T, self.NH, C // self.NH).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class TorchGPT2(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-1)

    @torch.no_grad()
    def load_nt_flat(self, flat: np.ndarray):
        """Copy weights from nt's flat buffer (llm.c order; padded vocabulary rows dropped)."""
        from nt.models.gpt2 import param_layout
        cfg, views = self.cfg, flat_views(param_layout(self.cfg), flat)
        self.wte.weight.copy_(views["wte"][:cfg.vocab_size])
        self.wpe.weight.copy_(views["wpe"])
        for l, b in enumerate(self.h):
            for mod, w, bias in [(b.ln_1, "ln1w", "ln1b"), (b.c_attn, "qkvw", "qkvb"),
                                 (b.attn_proj, "attprojw", "attprojb"), (b.ln_2, "ln2w", "ln2b"),
                                 (b.c_fc, "fcw", "fcb"), (b.mlp_proj, "fcprojw", "fcprojb")]:
                mod.weight.copy_(views[w][l])
                mod.bias.copy_(views[bias][l])
        self.ln_f.weight.copy_(views["lnfw"])
        self.ln_f.bias.copy_(views["lnfb"])

    def adamw(self, lr, weight_decay):
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
