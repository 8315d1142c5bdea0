"""Images: load JPEG / PNG / BMP files into uint8 (H, W, C) arrays with Pillow, and transform
batches (N, H, W, C) with Numba kernels (nt.kernels.cpu.vision, CUDA twins beside them).

    from nt import vision
    img = vision.load_image("cat.jpg")                    # (H, W, 3) uint8
    many = vision.load_batch(["a.png", "b.jpg"], (64, 64))  # (2, 64, 64, 3) uint8
    batch = vision.resize(img[None], (224, 224))          # (1, 224, 224, 3) uint8
    x = vision.to_chw(vision.center_crop(batch, (200, 200)), mean=vision.IMAGENET_MEAN,
                      std=vision.IMAGENET_STD)            # (1, 3, 200, 200) float32

Conventions:
- resize is bilinear without antialiasing, with half-pixel centres (align_corners=False):
  the result of torch.nn.functional.interpolate(mode="bilinear", align_corners=False,
  antialias=False) and torchvision's resize(antialias=False) on float input, to float32
  rounding. uint8 results are that value rounded half up. Pillow's BILINEAR agrees when
  enlarging (within 1 of 255, its fixed-point rounding); when shrinking Pillow widens its
  filter (antialiasing), which this resize deliberately does not.
- center_crop refuses a crop larger than the image. random_crop may reach `padding`
  pixels outside the image; those pixels take `fill` (torchvision's RandomCrop(padding=)).
- random_crop and hflip draw from a numpy.random.Generator the caller seeds.
- grayscale is ITU-R 601 luma, 0.299 R + 0.587 G + 0.114 B (Pillow's convert("L")).
- Transforms return new arrays of the input's dtype (to_chw: float32, or `dtype`).

Loading treats a file as hostile: a missing, empty, truncated or non-image file, a format
other than JPEG / PNG / BMP, and an image past Pillow's decompression-bomb limit
(Image.MAX_IMAGE_PIXELS, which stays on) are nt.io.FormatError naming the file.
"""
from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .backend import backend
from .io.common import FormatError

FORMATS = ("JPEG", "PNG", "BMP")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = {"RGB": 3, "L": 1}

PathLike = Union[str, os.PathLike]


def _pillow():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("nt.vision needs Pillow to read and write images: pip install 'nt[vision]'") from e
    return Image


def load_image(path: PathLike, mode: str = "RGB") -> np.ndarray:
    """The image at `path` (JPEG, PNG or BMP) as a uint8 (H, W, C) array: C = 3 for mode
    "RGB", 1 for "L" (grayscale as Pillow converts it). Any problem with the file is a
    FormatError naming it."""
    Image = _pillow()
    if mode not in MODES:
        raise ValueError(f"load_image: mode must be one of {sorted(MODES)}, got {mode!r}")
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise FormatError(f"{path}: cannot read the image: {e.strerror or e}") from None
    if size == 0:
        raise FormatError(f"{path}: the file is empty (0 bytes), not an image")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; nt refuses both
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=FORMATS) as im:
                im.load()  # decode now, so a truncated file fails here
                array = np.asarray(im.convert(mode), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise FormatError(f"{path}: declared image size is past the decompression-bomb limit "
                          f"({Image.MAX_IMAGE_PIXELS} pixels): {e}") from None
    except Image.UnidentifiedImageError:
        raise FormatError(f"{path}: not a {'/'.join(FORMATS)} image") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error) as e:
        # what Pillow's decoders raise on short or corrupt data
        raise FormatError(f"{path}: broken image data ({type(e).__name__}: {e})") from None
    return array.reshape(array.shape[0], array.shape[1], MODES[mode])


def load_batch(paths: Sequence[PathLike], size, mode: str = "RGB") -> np.ndarray:
    """Images of any sizes as one uint8 (N, OH, OW, C) batch: each file loaded (load_image)
    and resized to size = (OH, OW) (bilinear, as resize)."""
    OH, OW = _size(size, "load_batch")
    paths = list(paths)
    if not paths:
        raise ValueError("load_batch: no paths given")
    out = np.empty((len(paths), OH, OW, MODES.get(mode, 0)), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = resize(load_image(path, mode)[None], (OH, OW))[0]
    return out


def save_image(path: PathLike, image: np.ndarray) -> None:
    """Write a uint8 (H, W, 3) or (H, W, 1) / (H, W) image; the format follows the suffix
    (.png, .bmp, .jpg / .jpeg)."""
    Image = _pillow()
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3) \
            or (image.ndim == 3 and image.shape[2] not in (1, 3)):
        raise ValueError(f"save_image: need a uint8 (H, W), (H, W, 1) or (H, W, 3) array, "
                         f"got {getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}")
    pixels = image if image.ndim == 2 else (image[..., 0] if image.shape[2] == 1 else image)
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)


# ----------------------------------------------------------------------------- transforms

def _batch(images: np.ndarray, op: str) -> np.ndarray:
    """A contiguous (N, H, W, C) batch of a real or unsigned-integer dtype, non-empty."""
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype.kind not in "uif" \
            or 0 in images.shape:
        raise ValueError(f"{op}: images must be a non-empty (N, H, W, C) numeric array, got "
                         f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")
    return np.ascontiguousarray(images)


def _size(size, op: str) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        size = (size, size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and 0 < s <= 1 << 16 for s in size):
        raise ValueError(f"{op}: size must be a positive (height, width) up to 65536, got {size!r}")
    return int(size[0]), int(size[1])


def _rounding(dtype) -> float:
    """What to add before a truncating store: 0.5 rounds an integer output half up."""
    return 0.5 if np.dtype(dtype).kind in "ui" else 0.0


def resize(images: np.ndarray, size, device: str = "cpu") -> np.ndarray:
    """Bilinear resize of a (N, H, W, C) batch to size = (OH, OW) (or one int for both),
    half-pixel centres, no antialiasing (see the module docstring)."""
    images = _batch(images, "resize")
    OH, OW = _size(size, "resize")
    k = backend(device)
    out = k.empty(images.shape[0] * OH * OW * images.shape[3], images.dtype).reshape(
        images.shape[0], OH, OW, images.shape[3])
    k.resize_bilinear(out, k.to_device(images), _rounding(images.dtype))
    return k.to_host(out)


def _crop(images: np.ndarray, size, boxes: np.ndarray, fill, device: str) -> np.ndarray:
    OH, OW = size
    k = backend(device)
    out = k.empty(images.shape[0] * OH * OW * images.shape[3], images.dtype).reshape(
        images.shape[0], OH, OW, images.shape[3])
    k.crop_flip(out, k.to_device(images), boxes, fill)
    return k.to_host(out)


def center_crop(images: np.ndarray, size, device: str = "cpu") -> np.ndarray:
    """The central (OH, OW) window of every image (the top-left one of the two middles
    when the margin is odd, as torchvision rounds). A crop larger than the image is refused."""
    images = _batch(images, "center_crop")
    OH, OW = _size(size, "center_crop")
    N, H, W, _ = images.shape
    if OH > H or OW > W:
        raise ValueError(f"center_crop: a {OH}x{OW} crop does not fit {H}x{W} images (resize first)")
    boxes = np.zeros((N, 3), dtype=np.int32)
    boxes[:, 0], boxes[:, 1] = int(round((H - OH) / 2.0)), int(round((W - OW) / 2.0))
    return _crop(images, (OH, OW), boxes, 0, device)


def random_crop(images: np.ndarray, size, rng: np.random.Generator, padding: int = 0, fill=0,
                flip: float = 0.0, device: str = "cpu") -> np.ndarray:
    """A random (OH, OW) window of every image, its corner drawn uniformly among all
    windows of the image padded by `padding` pixels of value `fill` on each side;
    with flip > 0 each image is also mirrored left-right with that probability."""
    images = _batch(images, "random_crop")
    OH, OW = _size(size, "random_crop")
    N, H, W, _ = images.shape
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"random_crop: rng must be a numpy.random.Generator (seed it), got {type(rng).__name__}")
    if not 0 <= int(padding) <= 1 << 16:
        raise ValueError(f"random_crop: padding must be in [0, 65536], got {padding}")
    pad = int(padding)
    if OH > H + 2 * pad or OW > W + 2 * pad:
        raise ValueError(f"random_crop: a {OH}x{OW} crop does not fit {H}x{W} images padded by {pad}")
    if not 0.0 <= flip <= 1.0:
        raise ValueError(f"random_crop: flip must be a probability, got {flip}")
    boxes = np.empty((N, 3), dtype=np.int32)
    boxes[:, 0] = rng.integers(-pad, H + pad - OH + 1, N)
    boxes[:, 1] = rng.integers(-pad, W + pad - OW + 1, N)
    boxes[:, 2] = rng.random(N) < flip
    return _crop(images, (OH, OW), boxes, fill, device)


def hflip(images: np.ndarray, rng: Optional[np.random.Generator] = None, p: float = 0.5,
          device: str = "cpu") -> np.ndarray:
    """Every image mirrored left-right (rng None), or each with probability p drawn from rng."""
    images = _batch(images, "hflip")
    N, H, W, _ = images.shape
    boxes = np.zeros((N, 3), dtype=np.int32)
    if rng is None:
        boxes[:, 2] = 1
    else:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"hflip: p must be a probability, got {p}")
        boxes[:, 2] = rng.random(N) < p
    return _crop(images, (H, W), boxes, 0, device)


def grayscale(images: np.ndarray, device: str = "cpu") -> np.ndarray:
    """(N, H, W, 3) RGB -> (N, H, W, 1) ITU-R 601 luma, same dtype (uint8 rounded half up)."""
    images = _batch(images, "grayscale")
    if images.shape[3] != 3:
        raise ValueError(f"grayscale: images must have 3 (RGB) channels, got {images.shape[3]}")
    k = backend(device)
    N, H, W, _ = images.shape
    out = k.empty(N * H * W, images.dtype).reshape(N, H, W, 1)
    k.grayscale(out, k.to_device(images), _rounding(images.dtype))
    return k.to_host(out)


def _per_channel(value, C: int, name: str) -> np.ndarray:
    """One finite float64 per channel from a number or a length-C sequence."""
    v = np.asarray(value, dtype=np.float64).reshape(-1)
    if v.size not in (1, C) or not np.all(np.isfinite(v)):
        raise ValueError(f"to_chw: {name} needs one finite value or {C} (one per channel), got {value!r}")
    return np.ascontiguousarray(np.broadcast_to(v, (C,)))


def to_chw(images: np.ndarray, mean: Sequence[float] = 0.0, std: Sequence[float] = 1.0,
           scale: Optional[float] = None, dtype=np.float32, device: str = "cpu") -> np.ndarray:
    """(N, H, W, C) -> (N, C, H, W) floats (images * scale - mean[c]) / std[c]. scale
    defaults to 1/255 for uint8 images (so mean and std are in [0, 1] units, as
    torchvision's ToTensor + Normalize) and 1 otherwise; mean and std are one number or one
    per channel."""
    images = _batch(images, "to_chw")
    N, H, W, C = images.shape
    if scale is None:
        scale = 1.0 / 255.0 if images.dtype == np.uint8 else 1.0
    m, s = _per_channel(mean, C, "mean"), _per_channel(std, C, "std")
    if not (np.all(s > 0) and np.isfinite(scale)):
        raise ValueError(f"to_chw: std must be positive and scale finite, got {std} and {scale}")
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise TypeError(f"to_chw: dtype must be float32 or float64, got {dtype}")
    k = backend(device)
    out = k.empty(N * C * H * W, dtype).reshape(N, C, H, W)
    k.to_chw(out, k.to_device(images), float(scale), k.to_device(m), k.to_device(s))
    return k.to_host(out)
