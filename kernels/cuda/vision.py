"""Vision kernels (see the CPU twin): patch unfolding, CLS token + positions, pooling, and
batch image transforms. One thread per output element, grid-stride loops; the backwards
give every grad element a single writer (patches do not overlap; sums over the batch run
inside one thread), so no atomics."""
import math

from numba import cuda

from .launch import THREADS, blocks
from .memory import ids_to_device


@cuda.jit(cache=True)
def _unfold(patches, x, patch, backward):
    """forward: patches[n, i, k] = x[n, c, y, x']; backward: dx[...] += dpatches[n, i, k]."""
    N, Ch, H, W = x.shape
    p = patch
    PW = W // p
    P = (H // p) * PW
    K = Ch * p * p
    for e in range(cuda.grid(1), N * P * K, cuda.gridsize(1)):
        n = e // (P * K)
        i = e // K % P
        k = e % K
        c = k // (p * p)
        yy = (i // PW) * p + k // p % p
        xx = (i % PW) * p + k % p
        if backward:
            x[n, c, yy, xx] += patches[n, i, k]
        else:
            patches[n, i, k] = x[n, c, yy, xx]


def unfold_forward(out, x, patch):
    """out (N, P, Ch*p*p) = the p x p patches of x (N, Ch, H, W); H and W multiples of p."""
    _unfold[blocks(out.size), THREADS](out, x, patch, False)


def unfold_backward(dx, dout, patch):
    """dx (N, Ch, H, W) += dout (N, P, Ch*p*p) put back where each patch element came from."""
    _unfold[blocks(dout.size), THREADS](dout, dx, patch, True)


@cuda.jit(cache=True)
def _cls_pos_forward(out, x, cls, pos):
    N, T, C = out.shape
    for e in range(cuda.grid(1), N * T * C, cuda.gridsize(1)):
        n = e // (T * C)
        i = e // C % T
        c = e % C
        v = cls[c] if i == 0 else x[n, i - 1, c]
        out[n, i, c] = v + pos[i, c]


@cuda.jit(cache=True)
def _cls_pos_backward(dx, dcls, dpos, dout):
    """One thread per (token, channel): it sums the batch for dpos / dcls and adds dx."""
    N, T, C = dout.shape
    for e in range(cuda.grid(1), T * C, cuda.gridsize(1)):
        i = e // C
        c = e % C
        s = 0.0
        for n in range(N):
            g = dout[n, i, c]
            s += g
            if i > 0:
                dx[n, i - 1, c] += g
        if dpos.shape[0] > 0:
            dpos[i, c] += s
        if i == 0 and dcls.shape[0] > 0:
            dcls[c] += s


def cls_pos_forward(out, x, cls, pos):
    """out (N, 1+P, C): out[n, 0] = cls + pos[0], out[n, 1+i] = x[n, i] + pos[1+i]."""
    _cls_pos_forward[blocks(out.size), THREADS](out, x, cls, pos)


def cls_pos_backward(dx, dcls, dpos, dout):
    """dx += dout[:, 1:]; dcls += sum_n dout[n, 0]; dpos += sum_n dout[n] (empty: skipped)."""
    T, C = dout.shape[1], dout.shape[2]
    _cls_pos_backward[blocks(T * C), THREADS](dx, dcls, dpos, dout)


@cuda.jit(cache=True)
def _pool_forward(out, x, mean):
    N, T, C = x.shape
    for e in range(cuda.grid(1), N * C, cuda.gridsize(1)):
        n = e // C
        c = e % C
        if mean:
            s = 0.0
            for t in range(T):
                s += x[n, t, c]
            out[n, c] = s / T
        else:
            out[n, c] = x[n, 0, c]


@cuda.jit(cache=True)
def _pool_backward(dx, dout, mean):
    N, T, C = dx.shape
    for e in range(cuda.grid(1), N * T * C, cuda.gridsize(1)):
        n = e // (T * C)
        t = e // C % T
        c = e % C
        if mean:
            dx[n, t, c] += dout[n, c] / T
        elif t == 0:
            dx[n, 0, c] += dout[n, c]


def pool_forward(out, x, mean):
    """out (N, C) = the mean of x (N, T, C) over its tokens (mean) or its first token."""
    _pool_forward[blocks(out.size), THREADS](out, x, bool(mean))


def pool_backward(dx, dout, mean):
    """dx (N, T, C) += dout (N, C) / T at every token (mean), or at the first token."""
    _pool_backward[blocks(dx.size), THREADS](dx, dout, bool(mean))


@cuda.jit(device=True, cache=True)
def _source(o, scale, size):
    """Bilinear source of output index o (half-pixel centres, clamped): (i0, i1, w1)."""
    s = max((o + 0.5) * scale - 0.5, 0.0)
    i0 = min(int(math.floor(s)), size - 1)
    return i0, min(i0 + 1, size - 1), s - i0


@cuda.jit(cache=True)
def _resize_bilinear(out, img, rounding):
    N, H, W, C = img.shape
    OH, OW = out.shape[1], out.shape[2]
    sy, sx = H / OH, W / OW
    for e in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        n = e // (OH * OW * C)
        oy = e // (OW * C) % OH
        ox = e // C % OW
        c = e % C
        y0, y1, wy = _source(oy, sy, H)
        x0, x1, wx = _source(ox, sx, W)
        top = img[n, y0, x0, c] * (1.0 - wx) + img[n, y0, x1, c] * wx
        bottom = img[n, y1, x0, c] * (1.0 - wx) + img[n, y1, x1, c] * wx
        out[n, oy, ox, c] = top * (1.0 - wy) + bottom * wy + rounding


def resize_bilinear(out, img, rounding):
    """out (N, OH, OW, C) = img (N, H, W, C) resized bilinearly (half-pixel centres, no
    antialiasing), + rounding before the store."""
    _resize_bilinear[blocks(out.size), THREADS](out, img, float(rounding))


@cuda.jit(cache=True)
def _crop_flip(out, img, boxes, fill):
    N, H, W, C = img.shape
    OH, OW = out.shape[1], out.shape[2]
    for e in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        n = e // (OH * OW * C)
        oy = e // (OW * C) % OH
        ox = e // C % OW
        c = e % C
        y = boxes[n, 0] + oy
        x = boxes[n, 1] + (OW - 1 - ox if boxes[n, 2] != 0 else ox)
        if 0 <= y < H and 0 <= x < W:
            out[n, oy, ox, c] = img[n, y, x, c]
        else:
            out[n, oy, ox, c] = fill


def crop_flip(out, img, boxes, fill):
    """out (N, OH, OW, C) = img's window at (boxes[n, 0], boxes[n, 1]), outside pixels
    `fill`, mirrored when boxes[n, 2] != 0. boxes: a host int32 (N, 3) array."""
    _crop_flip[blocks(out.size), THREADS](out, img, ids_to_device(boxes), fill)


@cuda.jit(cache=True)
def _grayscale(out, img, rounding):
    N, H, W, _ = img.shape
    for e in range(cuda.grid(1), N * H * W, cuda.gridsize(1)):
        n = e // (H * W)
        y = e // W % H
        x = e % W
        out[n, y, x, 0] = 0.299 * img[n, y, x, 0] + 0.587 * img[n, y, x, 1] + 0.114 * img[n, y, x, 2] + rounding


def grayscale(out, img, rounding):
    """out (N, H, W, 1) = ITU-R 601 luma 0.299 R + 0.587 G + 0.114 B of img (N, H, W, 3)."""
    _grayscale[blocks(out.size), THREADS](out, img, float(rounding))


@cuda.jit(cache=True)
def _to_chw(out, img, scale, mean, std):
    N, H, W, C = img.shape
    for e in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        n = e // (C * H * W)
        c = e // (H * W) % C
        y = e // W % H
        x = e % W
        out[n, c, y, x] = (img[n, y, x, c] * scale - mean[c]) / std[c]


def to_chw(out, img, scale, mean, std):
    """out (N, C, H, W) float = (img (N, H, W, C) * scale - mean[c]) / std[c]."""
    _to_chw[blocks(out.size), THREADS](out, img, float(scale), mean, std)
