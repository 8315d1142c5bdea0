"""Train a Vision Transformer on scikit-learn's bundled handwritten digits (no download).

    python train/train_vit.py                       # ~1 minute on 2 CPU cores, >= 97% test accuracy
    python train/train_vit.py --epochs 5 --misclassified ""   # a quick look

The 1,797 8x8 digits (sklearn.datasets.load_digits, values 0..16) become uint8 images;
a fixed, stratified 20% of them (random_state 0) is the test set. Training batches get
a random 8x8 crop of the image padded by one pixel (shifts of up to a pixel) through
nt.vision; AdamW with a warmup and a cosine decay. The script prints the loss, a confusion
matrix, saves a grid of the misclassified test digits when matplotlib is installed, and
ends with the line `test accuracy: 0.XXXX`.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Optional, Sequence

# The matrices here are tiny (64 wide): OpenBLAS's threads cost more than they save.
# Measured on the 2-core CPU: 0.13 s -> 0.04 s of CPU time per training step. It must be
# set before OpenBLAS loads (nt's first import); a value the user chose is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from nt import vision  # noqa: E402
from nt.models import ViT, ViTConfig  # noqa: E402
from nt.optim import AdamW, clip_factor  # noqa: E402


def load_digits_split(seed: int = 0, test_size: float = 0.2):
    """(train images, train labels, test images, test labels): uint8 (N, 8, 8, 1) images and
    int64 labels, the test set a stratified `test_size` of the 1,797 digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    x_train, x_test, y_train, y_test = train_test_split(images, digits.target, test_size=test_size,
                                                        random_state=seed, stratify=digits.target)
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


class Normalizer:
    """uint8 (N, H, W, 1) images -> float32 (N, 1, H, W), standardised with the training
    set's pixel mean and standard deviation."""

    def __init__(self, train_images: np.ndarray):
        pixels = train_images.astype(np.float64) / 255.0
        self.mean, self.std = float(pixels.mean()), float(pixels.std())

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return vision.to_chw(images, self.mean, self.std)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then a cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(model: ViT, images: np.ndarray, labels: np.ndarray, normalize: Normalizer, epochs: int,
          batch_size: int, lr: float, weight_decay: float, seed: int, padding: int = 1,
          log_every: int = 0) -> list[float]:
    """Train in place; returns every step's loss. Each epoch visits the images in a fresh
    random order, in full batches only (every step has the same shapes, so after the first
    step nothing is allocated for activations)."""
    rng = np.random.default_rng(seed)
    opt = AdamW(model.params, lr=lr, weight_decay=weight_decay)
    per_epoch = len(images) // batch_size
    total, warmup = epochs * per_epoch, max(1, epochs * per_epoch // 20)
    size = images.shape[1:3]
    losses: list[float] = []
    model.train()
    for epoch in range(epochs):
        order = rng.permutation(len(images))
        for b in range(per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            batch = vision.random_crop(images[idx], size, rng, padding=padding) if padding else images[idx]
            _, loss = model.forward(normalize(batch), labels[idx])
            model.zero_grad()
            model.backward()
            _, clip = clip_factor(model.params, 1.0)
            opt.step(lr=lr_at(len(losses), total, lr, warmup), grad_scale=clip)
            losses.append(float(loss.numpy()[0]))
        if log_every and (epoch + 1) % log_every == 0:
            print(f"epoch {epoch + 1:3d}/{epochs}  loss {np.mean(losses[-per_epoch:]):.4f}", flush=True)
    model.eval()
    return losses


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """counts[i, j]: images of class i predicted as class j."""
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (truth, predicted), 1)
    return counts


def format_confusion(counts: np.ndarray) -> str:
    """The matrix as text: rows are true classes, columns predictions."""
    k = counts.shape[0]
    lines = ["true\\pred " + " ".join(f"{j:4d}" for j in range(k))]
    lines += [f"{i:9d} " + " ".join(f"{c:4d}" for c in row) for i, row in enumerate(counts)]
    return "\n".join(lines)


def save_misclassified(path: str, images: np.ndarray, truth: np.ndarray, predicted: np.ndarray) -> Optional[str]:
    """A PNG grid of the misclassified images titled 'true -> predicted'; None (nothing
    written) without matplotlib or without mistakes."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    wrong = np.flatnonzero(truth != predicted)
    if wrong.size == 0:
        return None
    cols = min(8, wrong.size)
    rows = (wrong.size + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(images[i, :, :, 0], cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(f"{truth[i]} -> {predicted[i]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def build_model(args, classes: int = 10) -> ViT:
    cfg = ViTConfig(image_size=8, patch=args.patch, channels=1, width=args.width, depth=args.depth,
                    heads=args.heads, classes=classes, dropout=args.dropout, mlp=args.mlp, pool=args.pool)
    return ViT(cfg, seed=args.seed)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--patch", type=int, default=4, help="patch side (8 must be a multiple): 4 = four 4x4 patches")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=2, help="MLP hidden width as a multiple of --width")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--pool", choices=("cls", "mean"), default="cls")
    p.add_argument("--padding", type=int, default=1, help="random-crop padding (0: no augmentation)")
    p.add_argument("--seed", type=int, default=0)


def main(argv: Optional[Sequence[str]] = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_args(p)
    p.add_argument("--misclassified", default="vit_misclassified.png",
                   help="PNG grid of the misclassified test digits ('' to skip)")
    args = p.parse_args(argv)

    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_digits_split()
    normalize = Normalizer(x_train)
    model = build_model(args)
    print(f"digits: {len(x_train)} train, {len(x_test)} test; ViT {model.config} "
          f"({model.num_params:,} parameters)", flush=True)
    losses = train(model, x_train, y_train, normalize, args.epochs, args.batch_size, args.lr,
                   args.weight_decay, args.seed, args.padding, log_every=max(1, args.epochs // 10))
    predicted, _ = model.predict(normalize(x_test))
    counts = confusion_matrix(y_test, predicted, 10)
    print(f"first/last epoch loss {np.mean(losses[:len(x_train) // args.batch_size]):.4f} / "
          f"{np.mean(losses[-(len(x_train) // args.batch_size):]):.4f}")
    print("confusion matrix (test):")
    print(format_confusion(counts))
    if args.misclassified:
        written = save_misclassified(args.misclassified, x_test, y_test, predicted)
        print(f"misclassified digits: {written}" if written else
              "misclassified digits: none saved (no mistakes, or matplotlib is not installed)")
    accuracy = float(np.mean(predicted == y_test))
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    print(f"test accuracy: {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    main()
