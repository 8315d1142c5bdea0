"""A plain-NumPy float64 GPT-2 (forward, backward, AdamW), independent of nt's kernels.

Written for clarity, not speed: full T x T attention matrices, explicit loops over layers.
Parameters are a dict of arrays named as in nt.models.gpt2.param_layout.
"""
import numpy as np


def layernorm(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    return xhat * w + b, (xhat, rstd)


def layernorm_back(dy, w, cache):
    xhat, rstd = cache
    dxhat = dy * w
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    return dx, (dy * xhat).reshape(-1, w.size).sum(0), dy.reshape(-1, w.size).sum(0)


def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def gelu_back(dy, x):
    s = np.sqrt(2 / np.pi)
    th = np.tanh(s * (x + 0.044715 * x ** 3))
    return dy * (0.5 * (1 + th) + 0.5 * x * (1 - th ** 2) * s * (1 + 3 * 0.044715 * x ** 2))


def attention(qkv, NH):
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // NH
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, T, NH, hs).transpose(0, 2, 1, 3) for i in range(3))
    att = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hs)
    att = np.where(np.tril(np.ones((T, T), bool)), att, -np.inf)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
    return y, (q, k, v, att)


def attention_back(dy, NH, cache):
    q, k, v, att = cache
    B, _, T, hs = q.shape
    dy = dy.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    datt = dy @ v.transpose(0, 1, 3, 2)
    dv = att.transpose(0, 1, 3, 2) @ dy
    dpre = att * (datt - (datt * att).sum(-1, keepdims=True)) / np.sqrt(hs)
    dq, dk = dpre @ k, dpre.transpose(0, 1, 3, 2) @ q
    return np.concatenate([g.transpose(0, 2, 1, 3).reshape(B, T, NH * hs) for g in (dq, dk, dv)], -1)


def forward_backward(P, idx, targets, L, NH, V):
    """Mean cross-entropy loss and the grads of every parameter."""
    B, T = idx.shape
    caches = []
    x = P["wte"][idx] + P["wpe"][:T]
    for l in range(L):
        h1, c1 = layernorm(x, P["ln1w"][l], P["ln1b"][l])
        qkv = h1 @ P["qkvw"][l].T + P["qkvb"][l]
        a, ca = attention(qkv, NH)
        x = x + a @ P["attprojw"][l].T + P["attprojb"][l]
        h2, c2 = layernorm(x, P["ln2w"][l], P["ln2b"][l])
        f = h2 @ P["fcw"][l].T + P["fcb"][l]
        g = gelu(f)
        x = x + g @ P["fcprojw"][l].T + P["fcprojb"][l]
        caches.append((h1, c1, ca, a, h2, c2, f, g))
    xf, cf = layernorm(x, P["lnfw"], P["lnfb"])
    logits = xf @ P["wte"].T
    z = logits[..., :V]
    z = z - z.max(-1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    valid = targets >= 0
    n = valid.sum()
    loss = -(np.log(np.take_along_axis(prob, np.maximum(targets, 0)[..., None], -1)[..., 0]) * valid).sum() / n

    G = {name: np.zeros_like(p) for name, p in P.items()}
    dlogits = np.zeros_like(logits)
    dz = prob.copy()
    np.put_along_axis(dz, np.maximum(targets, 0)[..., None], np.take_along_axis(dz, np.maximum(targets, 0)[..., None], -1) - 1, -1)
    dlogits[..., :V] = dz * valid[..., None] / n
    G["wte"] += dlogits.reshape(-1, dlogits.shape[-1]).T @ xf.reshape(-1, xf.shape[-1])
    dx, G["lnfw"], G["lnfb"] = layernorm_back(dlogits @ P["wte"], P["lnfw"], cf)
    for l in reversed(range(L)):
        h1, c1, ca, a, h2, c2, f, g = caches[l]
        flat = lambda t: t.reshape(-1, t.shape[-1])
        G["fcprojw"][l] = flat(dx).T @ flat(g)
        G["fcprojb"][l] = flat(dx).sum(0)
        df = gelu_back(dx @ P["fcprojw"][l], f)
        G["fcw"][l] = flat(df).T @ flat(h2)
        G["fcb"][l] = flat(df).sum(0)
        dh2, G["ln2w"][l], G["ln2b"][l] = layernorm_back(df @ P["fcw"][l], P["ln2w"][l], c2)
        dx = dx + dh2
        G["attprojw"][l] = flat(dx).T @ flat(a)
        G["attprojb"][l] = flat(dx).sum(0)
        dqkv = attention_back(dx @ P["attprojw"][l], NH, ca)
        G["qkvw"][l] = flat(dqkv).T @ flat(h1)
        G["qkvb"][l] = flat(dqkv).sum(0)
        dh1, G["ln1w"][l], G["ln1b"][l] = layernorm_back(dqkv @ P["qkvw"][l], P["ln1w"][l], c1)
        dx = dx + dh1
    np.add.at(G["wte"], idx, dx)
    G["wpe"][:T] += dx.sum(0)
    return loss, G


def adamw(P, G, M, Vs, step, lr, beta1, beta2, eps, wd, decay):
    for name in P:
        M[name] = beta1 * M[name] + (1 - beta1) * G[name]
        Vs[name] = beta2 * Vs[name] + (1 - beta2) * G[name] ** 2
        mhat = M[name] / (1 - beta1 ** step)
        vhat = Vs[name] / (1 - beta2 ** step)
        P[name] = P[name] - lr * (mhat / (np.sqrt(vhat) + eps) + (wd * P[name] if decay[name] else 0.0))
