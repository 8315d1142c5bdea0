"""Vision: patch unfolding, CLS token + positions, token pooling, and batch image transforms.

Ops (forward beside backward; backwards accumulate):
- unfold: images (N, Ch, H, W) -> patches (N, P, Ch*p*p), P = (H/p) * (W/p) in row-major
  patch order, each patch flattened channel-major (c, ky, kx) like a PyTorch Conv2d weight
  (OC, Ch, p, p), so the patch embedding is one linear over the last axis. Patches do not
  overlap: every pixel lands in exactly one place, and the backward has one writer per pixel.
- cls_pos: [cls; x] + pos, (N, P, C) -> (N, 1+P, C): the CLS token prepended and learned
  positions added in one pass.
- pool: (N, T, C) -> (N, C), the mean over tokens or the first (CLS) token.

Transforms (data preparation, no backward) take (N, H, W, C) batches of any numeric type
and write into an output the caller allocated: bilinear resize, crop (+ horizontal flip),
grayscale, and normalise to float CHW. An output of an integer type gets values rounded
half up by `rounding` = 0.5 (0.0 for float outputs): the kernels store by truncation.
"""
from numba import njit, prange


# ----------------------------------------------------------------------------- unfold

@njit(parallel=True, cache=True)
def unfold_forward(out, x, patch):
    """out (N, P, Ch*p*p) = the p x p patches of x (N, Ch, H, W); H and W multiples of p."""
    N, Ch, H, W = x.shape
    p = patch
    PW = W // p
    P = (H // p) * PW
    for task in prange(N * P):
        n = task // P
        i = task - n * P
        y0 = (i // PW) * p
        x0 = (i % PW) * p
        row = out[n, i]
        for c in range(Ch):
            for ky in range(p):
                src = x[n, c, y0 + ky]
                base = (c * p + ky) * p
                for kx in range(p):
                    row[base + kx] = src[x0 + kx]


@njit(parallel=True, cache=True)
def unfold_backward(dx, dout, patch):
    """dx (N, Ch, H, W) += dout (N, P, Ch*p*p) put back where each patch element came from."""
    N, Ch, H, W = dx.shape
    p = patch
    PW = W // p
    P = (H // p) * PW
    for task in prange(N * P):
        n = task // P
        i = task - n * P
        y0 = (i // PW) * p
        x0 = (i % PW) * p
        row = dout[n, i]
        for c in range(Ch):
            for ky in range(p):
                dst = dx[n, c, y0 + ky]
                base = (c * p + ky) * p
                for kx in range(p):
                    dst[x0 + kx] += row[base + kx]


# ----------------------------------------------------------------------------- CLS token + positions

@njit(parallel=True, cache=True)
def cls_pos_forward(out, x, cls, pos):
    """out (N, 1+P, C): out[n, 0] = cls + pos[0], out[n, 1+i] = x[n, i] + pos[1+i]."""
    N, P, C = x.shape
    for task in prange(N * (P + 1)):
        n = task // (P + 1)
        i = task - n * (P + 1)
        o, q = out[n, i], pos[i]
        if i == 0:
            for c in range(C):
                o[c] = cls[c] + q[c]
        else:
            s = x[n, i - 1]
            for c in range(C):
                o[c] = s[c] + q[c]


@njit(parallel=True, cache=True)
def cls_pos_backward(dx, dcls, dpos, dout):
    """dx += dout[:, 1:]; dcls += sum_n dout[n, 0]; dpos += sum_n dout[n]. An empty dcls
    or dpos (a frozen parameter) is skipped. Tasks own one token row of dpos: one writer."""
    N, T, C = dout.shape
    for i in prange(T):
        if i > 0:
            for n in range(N):
                d, g = dx[n, i - 1], dout[n, i]
                for c in range(C):
                    d[c] += g[c]
        if dpos.shape[0] > 0 or (i == 0 and dcls.shape[0] > 0):
            for n in range(N):
                g = dout[n, i]
                if dpos.shape[0] > 0:
                    for c in range(C):
                        dpos[i, c] += g[c]
                if i == 0 and dcls.shape[0] > 0:
                    for c in range(C):
                        dcls[c] += g[c]


# ----------------------------------------------------------------------------- pooling

@njit(parallel=True, cache=True)
def pool_forward(out, x, mean):
    """out (N, C) = the mean of x (N, T, C) over its tokens (mean) or its first token."""
    N, T, C = x.shape
    for n in prange(N):
        o = out[n]
        o[:] = x[n, 0]
        if mean:
            for t in range(1, T):
                s = x[n, t]
                for c in range(C):
                    o[c] += s[c]
            for c in range(C):
                o[c] = o[c] / T


@njit(parallel=True, cache=True)
def pool_backward(dx, dout, mean):
    """dx (N, T, C) += dout (N, C) / T at every token (mean), or at the first token."""
    N, T, C = dx.shape
    for n in prange(N):
        g = dout[n]
        if mean:
            for t in range(T):
                d = dx[n, t]
                for c in range(C):
                    d[c] += g[c] / T
        else:
            d = dx[n, 0]
            for c in range(C):
                d[c] += g[c]


# ----------------------------------------------------------------------------- transforms

@njit(inline="always")
def _source(o, scale, size):
    """Bilinear source of output index o: half-pixel centres (align_corners=False), the
    coordinate clamped at 0 below, the upper neighbour at the last pixel. Returns (i0, i1, w1)."""
    s = (o + 0.5) * scale - 0.5
    if s < 0.0:
        s = 0.0
    i0 = min(int(s), size - 1)
    return i0, min(i0 + 1, size - 1), s - i0


@njit(parallel=True, cache=True)
def resize_bilinear(out, img, rounding):
    """out (N, OH, OW, C) = img (N, H, W, C) resized bilinearly without antialiasing, as
    torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False)
    computes it (in float64 here, then stored in out's type: + rounding before truncation)."""
    N, H, W, C = img.shape
    OH, OW = out.shape[1], out.shape[2]
    sy, sx = H / OH, W / OW
    for task in prange(N * OH):
        n = task // OH
        oy = task - n * OH
        y0, y1, wy = _source(oy, sy, H)
        r0, r1 = img[n, y0], img[n, y1]
        for ox in range(OW):
            x0, x1, wx = _source(ox, sx, W)
            for c in range(C):
                top = r0[x0, c] * (1.0 - wx) + r0[x1, c] * wx
                bottom = r1[x0, c] * (1.0 - wx) + r1[x1, c] * wx
                out[n, oy, ox, c] = top * (1.0 - wy) + bottom * wy + rounding


@njit(parallel=True, cache=True)
def crop_flip(out, img, boxes, fill):
    """out (N, OH, OW, C) = the window of img (N, H, W, C) at rows boxes[n, 0].., columns
    boxes[n, 1].. (int32, may reach outside the image: those pixels get `fill`), mirrored
    left-right when boxes[n, 2] != 0."""
    N, H, W, C = img.shape
    OH, OW = out.shape[1], out.shape[2]
    for task in prange(N * OH):
        n = task // OH
        oy = task - n * OH
        y = boxes[n, 0] + oy
        flip = boxes[n, 2] != 0
        for ox in range(OW):
            x = boxes[n, 1] + (OW - 1 - ox if flip else ox)
            inside = 0 <= y < H and 0 <= x < W
            for c in range(C):
                out[n, oy, ox, c] = img[n, y, x, c] if inside else fill


@njit(parallel=True, cache=True)
def grayscale(out, img, rounding):
    """out (N, H, W, 1) = ITU-R 601 luma 0.299 R + 0.587 G + 0.114 B of img (N, H, W, 3)."""
    N, H, W, _ = img.shape
    for task in prange(N * H):
        n = task // H
        y = task - n * H
        for x in range(W):
            px = img[n, y, x]
            out[n, y, x, 0] = 0.299 * px[0] + 0.587 * px[1] + 0.114 * px[2] + rounding


@njit(parallel=True, cache=True)
def to_chw(out, img, scale, mean, std):
    """out (N, C, H, W) float = (img (N, H, W, C) * scale - mean[c]) / std[c]."""
    N, H, W, C = img.shape
    for task in prange(N * H):
        n = task // H
        y = task - n * H
        for c in range(C):
            m, inv = mean[c], 1.0 / std[c]
            o = out[n, c, y]
            for x in range(W):
                o[x] = (img[n, y, x, c] * scale - m) * inv
