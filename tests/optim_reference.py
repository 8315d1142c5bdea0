"""Plain-NumPy / plain-Python references for nt.optim: written from the documented rules,
sharing no code with the implementation."""
from __future__ import annotations

import math

import numpy as np

M64 = (1 << 64) - 1


def splitmix64_ref(x: int) -> int:
    """SplitMix64's output function of x + golden gamma, in Python integers mod 2**64."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def gauss_ref(seed: int, counter: int, n: int) -> np.ndarray:
    """The n standard normals of noise event `counter` under `seed` (Box-Muller)."""
    key = splitmix64_ref((splitmix64_ref(seed) + counter) & M64)
    out = np.empty(n)
    for i in range(n):
        u1 = ((splitmix64_ref((key + 2 * i) & M64) >> 11) + 0.5) * 2.0 ** -53
        u2 = ((splitmix64_ref((key + 2 * i + 1) & M64) >> 11) + 0.5) * 2.0 ** -53
        out[i] = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
    return out


class SGDRef:
    def __init__(self, p, mask, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        self.p, self.mask = p.copy(), mask.astype(np.float64)
        self.lr, self.mu, self.damp, self.wd, self.nesterov = lr, momentum, dampening, weight_decay, nesterov
        self.buf = np.zeros_like(p)
        self.t = 0

    def step(self, grad):
        self.t += 1
        g = grad + self.wd * self.p * self.mask
        if self.mu:
            self.buf = g.copy() if self.t == 1 else self.mu * self.buf + (1 - self.damp) * g
            g = g + self.mu * self.buf if self.nesterov else self.buf
        self.p = self.p - self.lr * g


def adam_segment(p, m, v, grad, mask, t, lr, b1, b2, eps, l2, decay):
    """One Adam step on one segment (arrays updated in place)."""
    g = grad + l2 * p * mask
    m[:] = b1 * m + (1 - b1) * g
    v[:] = b2 * v + (1 - b2) * g * g
    upd = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps) + decay * p * mask
    p[:] = p - lr * upd


class AdamRef:
    def __init__(self, p, mask, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
        self.p, self.mask = p.copy(), mask.astype(np.float64)
        self.lr, (self.b1, self.b2), self.eps = lr, betas, eps
        self.l2, self.decay = (0.0, weight_decay) if decoupled else (weight_decay, 0.0)
        self.m, self.v = np.zeros_like(p), np.zeros_like(p)
        self.t = 0

    def step(self, grad):
        self.t += 1
        adam_segment(self.p, self.m, self.v, grad, self.mask, self.t, self.lr, self.b1, self.b2,
                     self.eps, self.l2, self.decay)


class ChuckRef:
    """Chuck's five mechanisms as documented, tensor by tensor in plain NumPy."""

    def __init__(self, p, mask, sizes, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 loss_beta=0.9, trend_window=16, trend_tol=1e-3, trend_osc=0.7, damp_down=0.9, damp_up=1.05,
                 damp_min=0.1, gnorm_beta=0.99, gnorm_ratio=2.0, noise_patience=100, noise_scale=1.0,
                 seed=0, freeze_threshold=1e-8, freeze_patience=20, patience=300, lr_decay=0.5,
                 lr_floor=0.01, improve_tol=1e-3):
        self.p, self.mask = p.copy(), mask.astype(np.float64)
        self.off = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        S = len(sizes)
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.hp = dict(beta=loss_beta, W=trend_window, tol=trend_tol, osc=trend_osc, down=damp_down, up=damp_up,
                       dmin=damp_min, gbeta=gnorm_beta, R=gnorm_ratio, N=noise_patience,
                       nscale=noise_scale, seed=seed, thr=freeze_threshold, M=freeze_patience,
                       P=patience, decay=lr_decay, floor=lr_floor, itol=improve_tol)
        self.m, self.v = np.zeros_like(p), np.zeros_like(p)
        self.losses, self.raw = [], []
        self.damp, self.lr_mult, self.best, self.since = 1.0, 1.0, None, 0
        self.avg, self.tiny, self.tsteps = np.zeros(S), np.zeros(S, int), np.zeros(S, int)
        self.events, self.t = 0, 0
        self.scale = np.ones(S)

    def seg(self, x, s):
        return x[self.off[s]:self.off[s + 1]]

    def step(self, grad, loss):
        h = self.hp
        S = len(self.off) - 1
        # loss bookkeeping on the bias-corrected EMA: improvement, patience (e), trend (a), noise (c)
        self.raw.append(loss)
        w = h["beta"] ** np.arange(len(self.raw))[::-1] * (1 - h["beta"])
        loss = float(np.dot(w, self.raw) / (1 - h["beta"] ** len(self.raw)))
        if self.best is None or loss < self.best - h["itol"] * abs(self.best):
            self.best, self.since = loss, 0
        else:
            self.since += 1
        if h["P"] and self.since and self.since % h["P"] == 0:
            self.lr_mult = max(h["floor"], self.lr_mult * h["decay"])
        if h["W"]:
            self.losses.append(loss)
            if len(self.losses) >= h["W"]:
                y = np.array(self.losses[-h["W"]:])
                slope = np.polyfit(np.arange(y.size), y, 1)[0] / np.mean(np.abs(y))
                signs = np.sign(np.diff(y))
                osc = sum(1 for a, b in zip(signs[:-1], signs[1:]) if a * b < 0) / (y.size - 2)
                if slope > h["tol"] or osc > h["osc"]:
                    self.damp = max(h["dmin"], self.damp * h["down"])
                else:
                    self.damp = min(1.0, self.damp * h["up"])
        noise_due = h["N"] and self.since and self.since % h["N"] == 0
        # per-tensor grad norms: scaling (b) and freezing (d)
        for s in range(S):
            n = np.linalg.norm(self.seg(grad, s))
            self.scale[s] = 1.0
            if h["R"] and self.avg[s] > 0 and n > h["R"] * self.avg[s]:
                self.scale[s] = h["R"] * self.avg[s] / n
            self.avg[s] = n if self.t == 0 else h["gbeta"] * self.avg[s] + (1 - h["gbeta"]) * n
            if h["M"]:
                rms = n / math.sqrt(max(self.off[s + 1] - self.off[s], 1))
                self.tiny[s] = self.tiny[s] + 1 if rms < h["thr"] else 0
                if self.tiny[s] >= h["M"]:
                    self.scale[s] = 0.0
        self.t += 1
        lr_eff = self.lr * self.lr_mult * self.damp
        for s in range(S):
            if self.scale[s] == 0:
                continue
            self.tsteps[s] += 1
            adam_segment(self.seg(self.p, s), self.seg(self.m, s), self.seg(self.v, s), self.seg(grad, s),
                         self.seg(self.mask, s), self.tsteps[s], lr_eff * self.scale[s], self.b1, self.b2,
                         self.eps, 0.0, self.wd)
        if noise_due:
            z = gauss_ref(h["seed"], self.events, self.p.size)
            for s in range(S):
                if self.scale[s] == 0:
                    continue
                ps = self.seg(self.p, s)
                sigma = h["nscale"] * lr_eff * np.linalg.norm(ps) / math.sqrt(max(ps.size, 1))
                ps += sigma * self.seg(z, s)
            self.events += 1
