"""Hebbian learning on a frozen ViT: a readout layer learns a digit the ViT never saw from
a handful of examples, with no gradients.

    python train/hebbian_vit.py                    # new class 9 from 5 examples, ~40 s on 2 cores
    python train/hebbian_vit.py --new-class 3 --shots 10

1. A ViT is trained (backprop, as train_vit.py) on the digits of every class but the new one.
2. It is frozen. Its features, every token of its final layernorm flattened and scaled to
   unit length (the pooled CLS row alone is trained to tell the known digits apart and
   lumps the new one with them: measured, 25% instead of 62% on the new class), feed
   a HebbianLinear readout with one row per digit, learned by Oja's rule with the output
   clamped to the one-hot label: each row moves to the mean feature of its class, and rows
   of classes absent from a batch do not move (see nt.hebbian).
3. The readout learns the known classes from the training features, then the new class
   from `--shots` training examples of it (`--trials` random draws, each from the same
   state). Test accuracy is measured before and after;
   the readout predicts the row most aligned with the feature (cosine).
"""
from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

# train_vit.py lies beside this script; importing it first holds OpenBLAS to one thread
# before nt loads it (see there)
from train_vit import Normalizer, add_args, build_model, load_digits_split, train

import numpy as np  # noqa: E402

from nt.hebbian import HebbianLinear  # noqa: E402


def unit(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, so every example weighs the same in a prototype."""
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def learn(layer: HebbianLinear, features: np.ndarray, labels: np.ndarray, passes: int, batch: int,
          rng: np.random.Generator) -> None:
    """Oja steps with the output clamped to one-hot labels, `passes` times over the data."""
    onehot = np.eye(layer.weight.shape[0])
    for _ in range(passes):
        order = rng.permutation(len(features))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            layer.learn(features[idx], onehot[labels[idx]])


def predict(layer: HebbianLinear, features: np.ndarray) -> np.ndarray:
    """The class whose row points most nearly along the feature (cosine): rows learned from
    few examples or few steps are shorter (Oja moves a row part of the way to its mean per
    step), and a plain dot product would let the long rows win."""
    norms = np.maximum(np.linalg.norm(layer.weight.numpy(), axis=1), 1e-12)
    return np.argmax(layer(features) / norms, axis=1)


def report(name: str, predicted: np.ndarray, truth: np.ndarray, new_class: int) -> tuple[float, float]:
    """Print and return the accuracy over all test digits and over the new class (and
    print the known classes')."""
    known, new = truth != new_class, truth == new_class
    acc, acc_new = float(np.mean(predicted == truth)), float(np.mean(predicted[new] == truth[new]))
    print(f"{name:38s} all {acc:.4f}   known classes {np.mean(predicted[known] == truth[known]):.4f}   "
          f"new class {new_class}: {acc_new:.4f}")
    return acc, acc_new


def main(argv: Optional[Sequence[str]] = None) -> tuple[float, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_args(p)
    p.add_argument("--new-class", type=int, default=9, help="the digit the ViT never sees")
    p.add_argument("--shots", type=int, default=5, help="examples of the new digit the Hebbian layer gets")
    p.add_argument("--hebb-lr", type=float, default=0.5)
    p.add_argument("--hebb-passes", type=int, default=5)
    p.add_argument("--trials", type=int, default=10, help="draws of the few examples, each from the same start")
    p.set_defaults(epochs=40)
    args = p.parse_args(argv)
    if not 0 <= args.new_class <= 9:
        p.error("--new-class must be a digit 0..9")

    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    x_train, y_train, x_test, y_test = load_digits_split()
    normalize = Normalizer(x_train)
    known = y_train != args.new_class
    # the ViT's classes are the 9 known digits, renumbered 0..8
    digits = np.array([d for d in range(10) if d != args.new_class])
    to_vit = np.full(10, -1)
    to_vit[digits] = np.arange(9)
    model = build_model(args, classes=9)
    train(model, x_train[known], to_vit[y_train[known]], normalize, args.epochs, args.batch_size, args.lr,
          args.weight_decay, args.seed, args.padding)
    print(f"ViT trained by backprop on digits {digits.tolist()} ({known.sum()} images), then frozen")

    vit_classes, test_features = model.predict(normalize(x_test), tokens=True)
    _, train_features = model.predict(normalize(x_train), tokens=True)
    train_features, test_features = unit(train_features), unit(test_features)
    report("frozen ViT's own classifier", digits[vit_classes], y_test, args.new_class)

    layer = HebbianLinear(train_features.shape[1], 10, rule="oja", lr=args.hebb_lr, dtype=np.float32)
    learn(layer, train_features[known], y_train[known], args.hebb_passes, 64, rng)
    before, _ = report("Hebbian readout, known classes only", predict(layer, test_features), y_test,
                       args.new_class)

    # which few examples arrive matters: each trial draws its own, from the same start
    learned_known = layer.weight.numpy().copy()
    accs = []
    for trial in range(args.trials):
        layer.params.load_flat(learned_known.reshape(-1))
        shots = rng.choice(np.flatnonzero(~known), args.shots, replace=False)
        learn(layer, train_features[shots], y_train[shots], args.hebb_passes, len(shots), rng)
        accs.append(report(f"+ {args.shots} examples of {args.new_class} (trial {trial + 1})",
                           predict(layer, test_features), y_test, args.new_class))
    after, after_new = (float(np.mean(a)) for a in zip(*accs))
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    print(f"new class {args.new_class} from {args.shots} examples: {after_new:.4f} "
          f"(mean of {args.trials} draws, min {min(a[1] for a in accs):.4f}, max {max(a[1] for a in accs):.4f})")
    print(f"test accuracy before: {before:.4f} after: {after:.4f} (mean of {args.trials} draws)")
    return before, after


if __name__ == "__main__":
    main()
