"""nt.vision: image files (round trips, scikit-learn's bundled photos, hostile files) and
batch transforms against NumPy, Pillow and (when installed) PyTorch references."""
import struct
import zlib

import numpy as np
import pytest

from nt import vision
from nt.io import FormatError

Image = pytest.importorskip("PIL.Image")


def picture(H=12, W=17, C=3, seed=0):
    """A uint8 test image with smooth gradients and noise (so JPEG has something to keep)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W]
    base = np.stack([x * 255 // max(W - 1, 1), y * 255 // max(H - 1, 1), (x + y) * 255 // (H + W)], -1)[..., :C]
    return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- files

@pytest.mark.parametrize("suffix", [".png", ".bmp"])
@pytest.mark.parametrize("mode, C", [("RGB", 3), ("L", 1)])
def test_lossless_round_trip(tmp_path, suffix, mode, C):
    img = picture(C=C)
    vision.save_image(tmp_path / f"a{suffix}", img)
    back = vision.load_image(tmp_path / f"a{suffix}", mode)
    assert back.dtype == np.uint8 and back.shape == img.shape
    np.testing.assert_array_equal(back, img)


def test_jpeg_round_trip_is_close(tmp_path):
    img = picture(32, 24)
    vision.save_image(tmp_path / "a.jpg", img)
    back = vision.load_image(tmp_path / "a.jpg")
    assert back.shape == img.shape
    with Image.open(tmp_path / "a.jpg") as im:
        np.testing.assert_array_equal(back, np.asarray(im.convert("RGB")))  # Pillow's own decoding
    assert np.abs(back.astype(int) - img).mean() < 16  # JPEG is lossy (and the test image noisy)


def test_one_pixel_image(tmp_path):
    vision.save_image(tmp_path / "p.png", np.array([[[1, 2, 3]]], np.uint8))
    np.testing.assert_array_equal(vision.load_image(tmp_path / "p.png"), [[[1, 2, 3]]])
    gray = vision.load_image(tmp_path / "p.png", "L")
    assert gray.shape == (1, 1, 1)


def test_load_batch_resizes_every_file(tmp_path):
    small, large = picture(6, 9, seed=1), picture(24, 30, seed=2)
    vision.save_image(tmp_path / "s.png", small)
    vision.save_image(tmp_path / "l.bmp", large)
    batch = vision.load_batch([tmp_path / "s.png", tmp_path / "l.bmp"], (12, 15))
    assert batch.shape == (2, 12, 15, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[0], vision.resize(small[None], (12, 15))[0])
    np.testing.assert_array_equal(batch[1], vision.resize(large[None], (12, 15))[0])
    assert vision.load_batch([tmp_path / "s.png"], 4, "L").shape == (1, 4, 4, 1)
    with pytest.raises(ValueError, match="no paths"):
        vision.load_batch([], 4)
    with pytest.raises(FormatError, match="nothing.png"):
        vision.load_batch([tmp_path / "s.png", tmp_path / "nothing.png"], 4)


def test_sklearn_sample_images(tmp_path):
    """The photos scikit-learn ships (china.jpg, flower.jpg) decode as Pillow decodes them,
    and survive a PNG round trip exactly."""
    datasets = pytest.importorskip("sklearn.datasets")
    import os
    folder = os.path.join(os.path.dirname(datasets.__file__), "images")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".jpg")) if os.path.isdir(folder) else []
    if not names:
        pytest.skip("this scikit-learn has no bundled sample images")
    for name in names:
        img = vision.load_image(os.path.join(folder, name))
        with Image.open(os.path.join(folder, name)) as im:
            np.testing.assert_array_equal(img, np.asarray(im.convert("RGB")))
        small = vision.resize(img[None], (48, 64))[0]
        vision.save_image(tmp_path / "s.png", small)
        np.testing.assert_array_equal(vision.load_image(tmp_path / "s.png"), small)


def png_with_size(width, height):
    """A PNG whose IHDR declares width x height (with a valid CRC) over 1x1 of pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00"))
            + chunk(b"IEND", b""))


def bad_files(tmp_path):
    """name -> bytes of files nt must refuse."""
    vision.save_image(tmp_path / "ok.png", picture())
    vision.save_image(tmp_path / "ok.jpg", picture(40, 40))
    vision.save_image(tmp_path / "ok.bmp", picture())
    png, jpg, bmp = ((tmp_path / n).read_bytes() for n in ("ok.png", "ok.jpg", "ok.bmp"))
    gif = tmp_path / "x.gif"
    Image.fromarray(picture()).save(gif)
    return {
        "empty.png": b"",
        "text.png": b"this is not an image at all\n" * 10,
        "truncated.png": png[:len(png) // 2],
        "truncated.jpg": jpg[:len(jpg) // 2],
        "truncated.bmp": bmp[:len(bmp) // 2],
        "header_only.png": png[:33],
        "bomb.png": png_with_size(100_000, 100_000),
        "zero_size.png": png_with_size(0, 0),
        "other_format.gif": gif.read_bytes(),
    }


def test_bad_files_are_format_errors_naming_the_file(tmp_path):
    limit = Image.MAX_IMAGE_PIXELS
    for name, data in bad_files(tmp_path).items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(FormatError) as e:
            vision.load_image(path)
        assert name in str(e.value), (name, str(e.value))
    assert Image.MAX_IMAGE_PIXELS == limit  # the decompression-bomb guard stays on
    with pytest.raises(FormatError, match="missing.png"):
        vision.load_image(tmp_path / "missing.png")


def test_images_between_one_and_two_times_the_bomb_limit_are_refused(tmp_path, monkeypatch):
    """Pillow only warns there; nt refuses (with a small limit so the test stays small)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    vision.save_image(tmp_path / "a.png", picture(10, 15))   # 150 pixels: 1.5x the limit
    with pytest.raises(FormatError, match="decompression-bomb"):
        vision.load_image(tmp_path / "a.png")


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        vision.load_image("x.png", "CMYK")
    with pytest.raises(ValueError, match="uint8"):
        vision.save_image("x.png", np.zeros((2, 2, 3), np.float32))


# ----------------------------------------------------------------------------- transforms

def resize_reference(img, OH, OW):
    """Bilinear, half-pixel centres, source clamped at 0, no antialiasing (float64)."""
    N, H, W, C = img.shape

    def taps(out, size):
        s = np.maximum((np.arange(out) + 0.5) * size / out - 0.5, 0.0)
        i0 = np.minimum(np.floor(s).astype(int), size - 1)
        return i0, np.minimum(i0 + 1, size - 1), s - i0
    y0, y1, wy = taps(OH, H)
    x0, x1, wx = taps(OW, W)
    f = img.astype(np.float64)
    rows = f[:, y0] * (1 - wy)[None, :, None, None] + f[:, y1] * wy[None, :, None, None]
    return rows[:, :, x0] * (1 - wx)[None, None, :, None] + rows[:, :, x1] * wx[None, None, :, None]


SIZES = [(7, 5), (24, 34), (12, 17), (1, 1), (3, 40)]   # down, up (2x), same, one pixel, mixed


@pytest.mark.parametrize("OH, OW", SIZES)
def test_resize_float_matches_reference_and_torch(OH, OW):
    img = picture().astype(np.float32)[None].repeat(2, 0)
    img[1] = img[1][::-1]
    got = vision.resize(img, (OH, OW))
    assert got.dtype == np.float32 and got.shape == (2, OH, OW, 3)
    np.testing.assert_allclose(got, resize_reference(img, OH, OW), rtol=1e-6, atol=1e-4)
    try:
        import torch
    except ImportError:
        return
    want = torch.nn.functional.interpolate(torch.from_numpy(img).permute(0, 3, 1, 2), size=(OH, OW), mode="bilinear",
                                           align_corners=False, antialias=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)   # stated tolerance: 1e-4 on 0..255 floats


@pytest.mark.parametrize("OH, OW", SIZES)
def test_resize_uint8_is_the_float_result_rounded(OH, OW):
    img = picture()[None]
    got = vision.resize(img, (OH, OW))
    assert got.dtype == np.uint8
    want = np.floor(resize_reference(img, OH, OW) + 0.5)
    assert np.abs(got.astype(int) - want).max() <= 1  # a float64 x.5 tie may land either side
    assert np.mean(got == want) > 0.99


@pytest.mark.parametrize("OH, OW", [(24, 34), (36, 51), (12, 17)])
def test_resize_matches_pillow_when_enlarging(OH, OW):
    """Pillow's BILINEAR uses the same half-pixel taps when enlarging; its fixed-point
    arithmetic and per-pass rounding put it within 1 of ours. (Shrinking, Pillow widens its
    filter: antialiasing, which this resize does not do.)"""
    img = picture()
    pil = np.asarray(Image.fromarray(img).resize((OW, OH), Image.BILINEAR))
    got = vision.resize(img[None], (OH, OW))[0]
    assert np.abs(got.astype(int) - pil.astype(int)).max() <= 1


def test_center_crop_matches_slicing_and_refuses_larger():
    batch = np.stack([picture(seed=s) for s in range(3)])   # 12 x 17
    np.testing.assert_array_equal(vision.center_crop(batch, (8, 9)), batch[:, 2:10, 4:13])
    np.testing.assert_array_equal(vision.center_crop(batch, (11, 16)), batch[:, 0:11, 0:16])  # odd margins
    np.testing.assert_array_equal(vision.center_crop(batch, (12, 17)), batch)
    np.testing.assert_array_equal(vision.center_crop(batch, 1), batch[:, 6:7, 8:9])
    with pytest.raises(ValueError, match="does not fit"):
        vision.center_crop(batch, (13, 17))


def test_random_crop_and_flip_are_seeded_and_match_numpy():
    batch = np.stack([picture(seed=s) for s in range(6)])
    a = vision.random_crop(batch, (10, 10), np.random.default_rng(7), padding=2, fill=9, flip=0.5)
    b = vision.random_crop(batch, (10, 10), np.random.default_rng(7), padding=2, fill=9, flip=0.5)
    np.testing.assert_array_equal(a, b)
    # the same draws, replayed in NumPy on the padded images
    rng = np.random.default_rng(7)
    ys, xs, flips = rng.integers(-2, 12 + 2 - 10 + 1, 6), rng.integers(-2, 17 + 2 - 10 + 1, 6), rng.random(6) < 0.5
    padded = np.pad(batch, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=9)
    for n in range(6):
        want = padded[n, ys[n] + 2:ys[n] + 12, xs[n] + 2:xs[n] + 12]
        np.testing.assert_array_equal(a[n], want[:, ::-1] if flips[n] else want)
    assert 0 < flips.sum() < 6


def test_hflip():
    batch = np.stack([picture(seed=s) for s in range(4)]).astype(np.float64)
    np.testing.assert_array_equal(vision.hflip(batch), batch[:, :, ::-1])
    flips = np.random.default_rng(3).random(4) < 0.5
    got = vision.hflip(batch, np.random.default_rng(3))
    for n in range(4):
        np.testing.assert_array_equal(got[n], batch[n, :, ::-1] if flips[n] else batch[n])


def test_grayscale_is_itu_r_601_luma():
    batch = np.stack([picture(seed=s) for s in range(2)])
    luma = batch.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(vision.grayscale(batch.astype(np.float32))[..., 0], luma, rtol=1e-6)
    got = vision.grayscale(batch)
    assert got.dtype == np.uint8 and got.shape == (2, 12, 17, 1)
    assert np.abs(got[..., 0].astype(int) - np.floor(luma + 0.5)).max() <= 1
    pil = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in batch])
    assert np.abs(got[..., 0].astype(int) - pil).max() <= 1   # Pillow's fixed-point luma


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_to_chw_normalises(dtype):
    batch = np.stack([picture(seed=s) for s in range(2)])
    mean, std = vision.IMAGENET_MEAN, vision.IMAGENET_STD
    got = vision.to_chw(batch, mean, std, dtype=dtype)
    want = ((batch / 255.0 - np.array(mean)) / np.array(std)).transpose(0, 3, 1, 2)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)
    np.testing.assert_allclose(vision.to_chw(batch.astype(np.float32), 2.0, 4.0),
                               (batch.transpose(0, 3, 1, 2) - 2.0) / 4.0, rtol=1e-6)


def test_transforms_refuse_bad_input():
    batch = picture()[None]
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        vision.resize(picture(), 4)
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        vision.resize(np.zeros((0, 4, 4, 3), np.uint8), 4)
    with pytest.raises(ValueError, match="size"):
        vision.resize(batch, (0, 4))
    with pytest.raises(ValueError, match="size"):
        vision.resize(batch, (4, 10 ** 9))
    with pytest.raises(TypeError, match="Generator"):
        vision.random_crop(batch, 4, 7)
    with pytest.raises(ValueError, match="does not fit"):
        vision.random_crop(batch, 20, np.random.default_rng(0), padding=1)
    with pytest.raises(ValueError, match="3 \\(RGB\\)"):
        vision.grayscale(batch[..., :1])
    with pytest.raises(ValueError, match="std"):
        vision.to_chw(batch, 0.0, 0.0)
    with pytest.raises(ValueError, match="mean"):
        vision.to_chw(batch, (0.1, 0.2), 1.0)


def test_mutated_files_load_or_raise_format_error(tmp_path):
    """Seeded random corruption (byte flips, cuts, insertions, huge 32-bit values) of PNG,
    palette PNG, JPEG, progressive JPEG and BMP files: each either loads as a uint8 image
    or is a FormatError. (3,000 mutants passed when this was written; CI runs 300.)"""
    import io
    rng = np.random.default_rng(0)
    seeds = []
    for fmt, options in (("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}), ("BMP", {})):
        buf = io.BytesIO()
        Image.fromarray(picture(13, 11)).save(buf, fmt, **options)
        seeds.append((fmt, buf.getvalue()))
    buf = io.BytesIO()
    Image.fromarray(picture(13, 11)).convert("P").save(buf, "PNG")
    seeds.append(("PNG", buf.getvalue()))
    path = tmp_path / "mutant"
    for i in range(300):
        _, seed = seeds[i % len(seeds)]
        data = bytearray(seed)
        for _ in range(rng.integers(1, 8)):
            op, pos = rng.integers(0, 4), int(rng.integers(0, max(len(data), 1)))
            if op == 0 and data:
                data[pos] = int(rng.integers(0, 256))
            elif op == 1:
                del data[pos:]
            elif op == 2:
                data[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 9))).astype(np.uint8).tobytes()
            elif pos + 4 <= len(data):
                data[pos:pos + 4] = b"\xff\xff\xff\x7f"
        path.write_bytes(bytes(data))
        try:
            img = vision.load_image(path)
        except FormatError as e:
            assert "mutant" in str(e)
        else:
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
