"""decode.py beyond what tests/data/test_folder.py covers (square crops, JPEG draft, formats, bad files, threads):
crops to a non-square size, palette images with transparency, reading from an open file, the pixel limit, as_size,
the decoder's random resized crops, and the shard loaders' batch decoders (decode_rows; decode_cuda on the CPU)."""
import io

import numpy as np
import pytest
import torch

from danlu.data.decode import BadImage, as_size, decode_image
from danlu.errors import DanluError


def _photo(h, w):
    """A smooth RGB image (h, w, 3) uint8: resampling differences stay small."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([127 + 120 * np.sin((x + 2 * y + 5 * c) * 2 * np.pi / max(h, w) * (c + 2)) for c in range(3)],
                    -1).astype(np.uint8)


def _png(tmp_path, arr, name="a.png"):
    from PIL import Image

    path = tmp_path / name
    Image.fromarray(arr).save(path)
    return path


@pytest.mark.parametrize("shape, size", [((90, 150), (20, 40)), ((150, 90), (20, 40)), ((90, 150), (40, 16))])
def test_crop_to_a_non_square_size_covers_then_takes_the_centre(tmp_path, shape, size):
    """Scale (keeping the aspect ratio) until the image covers the target, then cut the centre: torchvision's
    Resize to the covering size and CenterCrop."""
    from torchvision.transforms import v2

    img = _photo(*shape)
    (H, W), (h, w) = shape, size
    s = max(h / H, w / W)  # the smallest scale that covers both sides
    cover = [max(h, int(H * s)), max(w, int(W * s))]
    ref = v2.Compose([v2.Resize(cover, antialias=True), v2.CenterCrop(size)])(torch.from_numpy(img).permute(2, 0, 1))
    ours = decode_image(_png(tmp_path, img), size, 3, "crop")
    assert ours.shape == (3, h, w)
    assert (torch.from_numpy(ours).float() - ref.float()).abs().mean() < 0.5


def test_a_palette_image_with_transparency_keeps_its_colours(tmp_path):
    from PIL import Image

    im = Image.new("P", (8, 6))
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))  # 0 red, 1 green, 2 blue
    im.putdata([0, 1, 2] * 16)
    im.info["transparency"] = 2  # blue is the transparent index
    path = tmp_path / "p.png"
    im.save(path, transparency=2)
    rgb = decode_image(path, (6, 8), 3, "exact")  # (3, 6, 8)
    # the first three pixels: red, green, and the transparent one keeps its colour (training images have no alpha)
    assert rgb[:, 0, :3].T.tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    gray = decode_image(path, (6, 8), 1, "exact")
    assert gray.shape == (1, 6, 8) and gray[0, 0, 0] == 76 and gray[0, 0, 1] == 150  # ITU-R 601 luma of red, green


def test_an_open_file_decodes_as_its_path(tmp_path):
    path = _png(tmp_path, _photo(30, 50))
    with open(path, "rb") as f:
        from_file = decode_image(f, (16, 16), 3, "crop")
    assert np.array_equal(from_file, decode_image(path, (16, 16), 3, "crop"))
    assert np.array_equal(decode_image(io.BytesIO(path.read_bytes()), (16, 16), 3), from_file)


def test_the_pixel_limit_is_checked_from_the_header(tmp_path):
    path = _png(tmp_path, _photo(60, 100))
    with pytest.raises(BadImage, match="100x60 pixels is over the limit of 5000 pixels"):
        decode_image(path, (8, 8), max_pixels=5000)
    assert decode_image(path, (8, 8), max_pixels=6000).shape == (3, 8, 8)  # exactly at the limit is fine


def test_as_size():
    assert as_size(32) == (32, 32) and as_size([24, 40]) == (24, 40) and as_size(None) == (224, 224)
    assert as_size(None, default=28) == (28, 28)
    with pytest.raises(DanluError, match=r"data.size=\[0, 4\]: expected positive sizes"):
        as_size([0, 4])


def test_the_decoders_crop_boxes_are_the_device_warps():
    """ResizedCrop.box, in whole source pixels, is augment._box's box for the same four draws."""
    from danlu.data.augment import _box
    from danlu.data.decode import ResizedCrop

    rc, (H, W) = ResizedCrop((0.08, 1.0), (3 / 4, 4 / 3)), (300, 500)
    d = torch.rand(200, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fw, fh, cx, cy = _box(d, H, W, rc.area, rc.ratio)
    for i in range(len(d)):
        left, top, bw, bh = rc.box(W, H, d[i].tolist())
        assert abs(bw - fw[i].item() * W) <= 0.5 and abs(bh - fh[i].item() * H) <= 0.5
        assert 0 <= left <= W - bw and 0 <= top <= H - bh
        assert abs(left + bw / 2 - (cx[i].item() + 1) / 2 * W) <= 1.5  # the same centre, to the pixel
        assert abs(top + bh / 2 - (cy[i].item() + 1) / 2 * H) <= 1.5


def test_a_crop_decodes_as_torchvisions_resized_crop(tmp_path):
    """decode_image(crop=...): the box of the source resized with antialiasing, torchvision's resized_crop."""
    from torchvision.transforms.v2 import functional as TF

    from danlu.data.decode import ResizedCrop

    img, rc = _photo(90, 150), ResizedCrop((0.1, 0.6))
    path = _png(tmp_path, img)
    for d in ([0.2, 0.3, 0.1, 0.9], [0.9, 0.8, 0.5, 0.5], [0.0, 0.0, 0.99, 0.0]):
        left, top, bw, bh = rc.box(150, 90, d)
        ref = TF.resized_crop(torch.from_numpy(img).permute(2, 0, 1), top, left, bh, bw, [24, 32], antialias=True)
        ours = decode_image(path, (24, 32), 3, "crop", crop=(rc, d))
        assert ours.shape == (3, 24, 32)
        assert (torch.from_numpy(ours).float() - ref.float()).abs().mean() < 1.0, d


def test_a_large_jpegs_crop_is_decoded_at_a_reduced_scale(tmp_path, monkeypatch):
    """A JPEG whose box is over twice the target is decoded at 1/2 (1/4, 1/8) and still looks like the full decode's
    crop (a box 10% off would differ by over 20 levels); a box under twice the target is decoded whole."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    from danlu.data.decode import ResizedCrop

    img, rc = _photo(400, 600), ResizedCrop((0.5, 1.0))
    path = tmp_path / "big.jpg"
    Image.fromarray(img).save(path, quality=95)
    full = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    from danlu.data import decode

    sizes = []
    real = decode._resized_box
    monkeypatch.setattr(decode, "_resized_box", lambda a, *r: (sizes.append(tuple(a.shape[:0:-1])), real(a, *r))[1])
    for d, target, scale in (([0.9, 0.5, 0.5, 0.5], (48, 64), 4), ([0.0, 0.5, 0.2, 0.7], (200, 200), 1)):
        left, top, bw, bh = rc.box(600, 400, d)
        ours = decode_image(path, target, 3, "crop", crop=(rc, d))
        assert sizes[-1] == (600 // scale, 400 // scale), (d, sizes[-1])
        ref = TF.resized_crop(full, top, left, bh, bw, list(target), antialias=True)
        # DCT-scaled decoding, and the box snapped to the reduced image's pixel grid (up to half a reduced pixel)
        assert (torch.from_numpy(ours).float() - ref.float()).abs().mean() < (4.0 if scale > 1 else 1.0), d


def test_a_truncated_jpeg_is_a_bad_image_cropped_or_not(tmp_path):
    from PIL import Image

    from danlu.data.decode import ResizedCrop

    buf = io.BytesIO()
    Image.fromarray(_photo(64, 80)).save(buf, format="JPEG")
    cut = buf.getvalue()[:len(buf.getvalue()) * 2 // 3]  # the header whole, the pixels cut
    for crop in (None, (ResizedCrop(), [0.5, 0.5, 0.5, 0.5])):
        with pytest.raises(BadImage, match="not a readable image .*truncated"):
            decode_image(io.BytesIO(cut), (32, 32), 3, "crop", crop=crop)


@pytest.mark.parametrize("channels", [3, 1])
def test_decode_crop_gives_decode_images_pixels(channels):
    """The shard decoders' fast path (simplejpeg: the size from the header, the DCT scale Pillow's draft would take)
    writes exactly what decode_image(crop=...) returns: boxes enlarged (OpenCV's resize), shrunk at full scale, and
    decoded at 1/2 and 1/4; a PNG and a CMYK JPEG, which simplejpeg does not take, through decode_image itself."""
    from PIL import Image

    from danlu.data import decode
    from danlu.data.decode import ResizedCrop, decode_crop

    assert decode._simplejpeg() is not None  # a dependency: the fast path is the one tested
    img = _photo(300, 400)
    files = {}
    for fmt, mode in (("JPEG", "RGB"), ("PNG", "RGB"), ("JPEG", "CMYK"), ("JPEG", "L")):
        buf = io.BytesIO()
        Image.fromarray(img).convert(mode).save(buf, format=fmt, quality=90)
        files[fmt, mode] = buf.getvalue()
    rc = ResizedCrop((0.05, 1.0))
    scales = []
    real = decode._resized_box
    for (fmt, mode), data in files.items():
        for d, size in (([0.0, 0.5, 0.3, 0.6], (64, 64)), ([0.0, 0.2, 0.9, 0.1], (96, 80)),
                        ([1.0, 0.5, 0.5, 0.5], (224, 224)), ([0.9, 0.5, 0.1, 0.4], (70, 90)),
                        ([0.5, 0.9, 0.5, 0.5], (32, 40))):
            out = np.zeros((channels, *size), np.uint8)

            def spy(t, box, fx, fy, h, w, copy=True):
                scales.append(round(1 / fx))
                return real(t, box, fx, fy, h, w, copy)

            decode._resized_box = spy
            try:
                decode_crop(data, size, channels, rc, d, out)
            finally:
                decode._resized_box = real
            ref = decode_image(io.BytesIO(data), size, channels, crop=(rc, d))
            assert np.array_equal(out, ref), (fmt, mode, d, size, np.abs(out.astype(int) - ref).max())
    assert {1, 2, 4} <= set(scales)  # whole, half and quarter scale decodes were among them
    mirror = ResizedCrop((0.05, 1.0), flip=True)  # the training flip, done by the decoder: where d[4] < 0.5
    for data in files.values():
        for d in ([0.0, 0.5, 0.3, 0.6], [1.0, 0.5, 0.5, 0.5]):
            plain = decode_image(io.BytesIO(data), (64, 64), channels, crop=(rc, d))
            for u, want in ((0.2, plain[..., ::-1]), (0.7, plain)):
                out = np.zeros((channels, 64, 64), np.uint8)
                decode_crop(data, (64, 64), channels, mirror, d + [u], out)
                assert np.array_equal(out, want)
                assert np.array_equal(decode_image(io.BytesIO(data), (64, 64), channels, crop=(mirror, d + [u])), want)


def test_decode_crop_of_a_bad_file_raises_bad_image():
    from danlu.data.decode import ResizedCrop, decode_crop

    out = np.zeros((3, 8, 8), np.uint8)
    for data in (b"\xff\xd8\xff\xe0 not really a jpeg", b"plain text"):
        with pytest.raises(BadImage, match="not a readable image"):
            decode_crop(data, (8, 8), 3, ResizedCrop(), [0.5] * 4, out)


def test_decode_rows_fills_only_its_rows_and_names_the_bad_ones():
    """decode_rows (the shard loaders' CPU decode of a batch's encoded images): rows lo..hi of `out` only, each what
    decode_image gives (resized, or cropped by its draws), a bad one zeroed and named with its reason."""
    from PIL import Image

    from danlu.data.decode import ResizedCrop, decode_rows

    data = []
    for k in range(4):
        buf = io.BytesIO()
        Image.fromarray(np.roll(_photo(30, 40), 7 * k, axis=1)).save(buf, format="JPEG" if k % 2 else "PNG")
        data.append(buf.getvalue())
    data[2] = b"\xff\xd8\xff\xe0 not really a jpeg"
    out = np.full((4, 3, 12, 16), 7, np.uint8)
    bad = decode_rows(data, out, 1, 4, (12, 16), 3, "crop")
    assert list(bad) == [2] and bad[2].startswith("not a readable image") and (out[2] == 0).all()
    assert (out[0] == 7).all()  # outside lo..hi: untouched
    for i in (1, 3):
        assert np.array_equal(out[i], decode_image(io.BytesIO(data[i]), (12, 16), 3, "crop"))
    crop, draws = ResizedCrop((0.2, 0.8), flip=True), np.random.default_rng(0).random((4, 5))
    assert decode_rows(data, out, 0, 2, (12, 16), 3, "crop", crop, draws) == {}
    for i in (0, 1):
        assert np.array_equal(out[i], decode_image(io.BytesIO(data[i]), (12, 16), 3, crop=(crop, draws[i])))


def test_decode_cuda_on_the_cpu_device_resizes_and_crops_as_decode_image_does():
    """decode_cuda (nvJPEG's batched decode, then the resize or crop on the device) run with device="cpu", where
    torchvision decodes the same JPEG batch with libjpeg: its geometry within a few levels of decode_image's; a PNG
    through decode_image itself; a bad file zeroed and named. (The GPU itself: tests marked cuda.)"""
    from PIL import Image

    from danlu.data.decode import ResizedCrop, decode_cuda

    data = []
    for k, fmt in enumerate(("JPEG", "PNG", "JPEG")):
        buf = io.BytesIO()
        y, x = np.mgrid[0:60, 0:80]  # smooth (a gradient and a slow wave): decoders and resamplers agree closely
        arr = np.stack([3 * x, 4 * y, 127 + 100 * np.sin((x + y + 20 * k) / 15)], -1).astype(np.uint8)
        Image.fromarray(arr).save(buf, format=fmt, quality=95)
        data.append(buf.getvalue())
    data.append(b"\xff\xd8\xff\xe0 not really a jpeg")
    crop, draws = ResizedCrop((0.3, 0.9), flip=True), np.random.default_rng(1).random((4, 5))
    for kw in ({}, {"crop": crop, "draws": draws}):
        x, bad = decode_cuda(data, (24, 24), 3, "crop", torch.device("cpu"), **kw)  # square: a centre crop
        assert x.shape == (4, 3, 24, 24) and x.dtype == torch.uint8 and list(bad) == [3] and (x[3] == 0).all()
        for i in range(3):
            ref = decode_image(io.BytesIO(data[i]), (24, 24), 3, "crop", crop=(crop, draws[i]) if kw else None)
            assert (x[i].float() - torch.from_numpy(ref).float()).abs().mean() < 4, (i, kw.keys())
