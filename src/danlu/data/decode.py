"""Image files -> uint8 arrays (C, H, W) of one size, decoded in parallel on every core.

    arr = decode_image("cat.jpg", (224, 224), channels=3, resize="crop")      # (3, 224, 224) uint8
    images, bad = decode_many(paths, (224, 224), 3, "crop")                   # (N, 3, 224, 224), {i: reason}

Pillow decodes (JPEG, PNG, BMP, PGM/PPM, WebP, GIF, TIFF). Its decoders and its resize release the GIL, so a thread
pool keeps all cores busy without copying pixels between processes. A JPEG is decoded at a reduced DCT scale when the
target is much smaller (`draft`, libjpeg's scaled decoding: 2-8x fewer pixels to decode), then resized with
antialiasing. `resize="crop"`: scale so the image covers the target (shorter side to `size` for a square target),
then take the centre, like torchvision's Resize + CenterCrop; `resize="exact"`: stretch to the target.
`crop=(ResizedCrop, draws)`: a random resized crop of the source instead (the wds loader's training images).
A file that is not a readable image (text, zero bytes, truncated, corrupt) raises `BadImage` with the reason.
`decode_image` also takes an open binary file (`io.BytesIO(upload)`: `danlu serve` decodes uploads in memory) and
`max_pixels`, a limit on width x height checked from the header before any pixel is decoded (image bombs).

Rows of a batch of encoded images (the tar shards' samples, as bytes) decode into one uint8 batch:

    bad = decode_rows(data, out, 0, len(data), (224, 224), 3, "crop")           # CPU, into out (B, 3, 224, 224)
    x, bad = decode_cuda(data, (224, 224), 3, "crop", torch.device("cuda"))     # nvJPEG, (B, 3, 224, 224) on the GPU
"""
from __future__ import annotations

import functools
import io
import math
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np
import torch

from danlu.errors import DanluError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pbm", ".pnm", ".webp", ".gif", ".tif",
                    ".tiff")
RESIZE_MODES = ("crop", "exact")


class BadImage(Exception):
    """A file that cannot be decoded into an image; the message is the reason shown in data_report.json."""


def as_size(size: Union[int, Sequence[int], None], default: int = 224) -> tuple[int, int]:
    """data.size (an int or [h, w]) -> (h, w)."""
    if size is None:
        size = default
    if isinstance(size, int):
        size = (size, size)
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise DanluError(f"data.size={list(size)}: expected positive sizes, an int or [h, w]")
    return h, w


def to_mode(im, channels: int):
    """A Pillow image in mode L (channels=1) or RGB (3); 16-bit and float images are scaled to 8 bits first."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # Pillow's advice for palette images with transparency
    want = "L" if channels == 1 else "RGB"
    return im if im.mode == want else im.convert(want)


@dataclass(frozen=True)
class ResizedCrop:
    """torchvision's RandomResizedCrop geometry for the decoder: a box of a share of the source's area in `area` and
    an aspect ratio (width / height) log-uniform in `ratio`, clipped to the image (where torchvision would draw
    again), placed uniformly where it fits: the same rule as the device warp's boxes (augment._box), on the source's
    own pixels. The four uniforms in [0, 1) that pick a box are drawn by the caller (ShardLoader: from the seed, the
    epoch and the sample's position), so a box depends on nothing else. `flip`: the crop is also mirrored left-right
    where a fifth uniform is under 0.5 (the training flip, done by the decoder with the crop)."""
    area: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False

    def mirrored(self, d: Sequence[float]) -> bool:
        return self.flip and len(d) > 4 and d[4] < 0.5

    def box(self, W: int, H: int, d: Sequence[float]) -> tuple[int, int, int, int]:
        """(left, top, width, height) in whole pixels of a W x H source for the draws d (share, log ratio, x, y)."""
        share = self.area[0] + d[0] * (self.area[1] - self.area[0])
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = math.exp(lo + d[1] * (hi - lo))
        bw = min(W, max(1, int(round(math.sqrt(share * W * H * aspect)))))
        bh = min(H, max(1, int(round(math.sqrt(share * W * H / aspect)))))
        return int(d[2] * (W - bw + 1)), int(d[3] * (H - bh + 1)), bw, bh


def decode_image(path: Union[str, Path, BinaryIO], size: tuple[int, int], channels: int = 3, resize: str = "crop",
                 max_pixels: Optional[int] = None,
                 crop: Optional[tuple[ResizedCrop, Sequence[float]]] = None) -> np.ndarray:
    """One image file (a path or an open binary file) -> (channels, h, w) uint8. Raises BadImage for anything that
    is not a readable image, or one of more than `max_pixels` pixels (checked before decoding).
    `crop=(ResizedCrop, draws)`: a random resized crop instead of `resize` (the box in the source's pixels, resized to
    (h, w) with antialiasing, as torchvision's RandomResizedCrop); a JPEG is decoded at the smallest DCT scale at which
    the box still covers (h, w), so a large source costs a fraction of its full decode."""
    from PIL import Image

    h, w = size
    box = None
    try:  # everything that reads the (untrusted) file: any failure means "not a readable image"
        with Image.open(path) as im:
            W0, H0 = im.size
            if W0 < 1 or H0 < 1:
                raise BadImage(f"image of size {W0}x{H0}")
            if max_pixels is not None and W0 * H0 > max_pixels:
                raise BadImage(f"image of {W0}x{H0} pixels is over the limit of {max_pixels} pixels "
                               f"(a decompression bomb?); expected a smaller image")
            if crop is not None:  # the box, and the whole image's size at which the box becomes (w, h)
                box = crop[0].box(W0, H0, crop[1])
                rw, rh = math.ceil(W0 * w / box[2]), math.ceil(H0 * h / box[3])
            else:
                rw, rh = cover_size(W0, H0, h, w) if resize == "crop" else (w, h)  # the image's size after resizing
            if 2 * rw <= W0 and 2 * rh <= H0:  # JPEG: decode at 1/2, 1/4, 1/8 when that covers it (else no call:
                im.draft("L" if channels == 1 else "RGB", (rw, rh))  # a draft at full scale decodes slower)
            elif box is not None and im.format == "JPEG" and im.mode in ("RGB", "L"):  # whole: libjpeg-turbo
                return _mirror(_resized_box(_decode_jpeg(path, channels), box, 1.0, 1.0, h, w), crop)  # (torchvision)
            im = to_mode(im, channels)
            im.load()  # decodes: a truncated or corrupt file fails here
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types (UnidentifiedImageError, OSError, SyntaxError..)
        is_path = isinstance(path, (str, os.PathLike))
        if is_path and os.path.isfile(path) and os.path.getsize(path) == 0:
            raise BadImage("empty file (0 bytes)") from None
        name = type(e).__name__
        msg = str(e).split("\n")[0].replace(str(path), "").strip(" '\"") or name  # an open file: its repr
        raise BadImage(f"not a readable image ({name}: {msg})") from None
    if box is not None:  # the crop box, in whole pixels of the (possibly draft-reduced) decoded image
        a = torch.from_numpy(np.array(im))  # (H, W, 3) or (H, W)
        a = a.permute(2, 0, 1) if a.dim() == 3 else a[None]
        return _mirror(_resized_box(a, box, im.size[0] / W0, im.size[1] / H0, h, w), crop)
    # Resize to (rw, rh) then take the centred (w, h) window, as torchvision's Resize + CenterCrop do, in one Pillow
    # call: `box` is that window in the (possibly draft-reduced) source's coordinates, so the sampling grid and the
    # antialiasing filter are exactly those of resizing the whole image.
    left, top = int(round((rw - w) / 2.0)), int(round((rh - h) / 2.0))
    fx, fy = im.size[0] / rw, im.size[1] / rh  # source pixels per resized pixel
    box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
    a = np.asarray(im.resize((w, h), Image.Resampling.BILINEAR, box=box))  # antialiased; (h, w) or (h, w, 3)
    return a[None] if a.ndim == 2 else np.ascontiguousarray(a.transpose(2, 0, 1))


def _mirror(a: np.ndarray, crop: tuple[ResizedCrop, Sequence[float]]) -> np.ndarray:
    return np.ascontiguousarray(a[..., ::-1]) if crop[0].mirrored(crop[1]) else a


def decode_crop(data: bytes, size: tuple[int, int], channels: int, crop: ResizedCrop, draws: Sequence[float],
                out: np.ndarray) -> None:
    """The random resized crop of one image file's bytes, written into `out` (channels, h, w) uint8: what
    `decode_image(io.BytesIO(data), size, channels, crop=(crop, draws))` returns, the same pixels for a JPEG (tested),
    faster. A JPEG goes through simplejpeg (libjpeg-turbo): its size from the header alone, then decoded at the DCT
    scale Pillow's `draft` would choose (1/2, 1/4, 1/8 where the box still covers the target, else whole), the box
    resized as decode_image resizes it (_resized_box), mirrored where the draws say. Anything simplejpeg does not
    take (not a JPEG, CMYK, 12-bit, a damaged file) goes through decode_image, which decodes it or raises BadImage
    with the reason."""
    sj = _simplejpeg()
    if sj is not None and data[:3] == b"\xff\xd8\xff":
        try:
            H0, W0, space = sj.decode_jpeg_header(data)[:3]
            if space not in ("YCbCr", "Gray"):  # CMYK, YCCK: Pillow converts those its own way
                raise ValueError(space)
            if _bomb(W0 * H0):  # Pillow refuses it: decode_image says so
                raise ValueError("too many pixels")
            h, w = size
            box = crop.box(W0, H0, draws)
            q = min(W0 // math.ceil(W0 * w / box[2]), H0 // math.ceil(H0 * h / box[3]))  # Pillow's draft rule
            s = 8 if q >= 8 else 4 if q >= 4 else 2 if q >= 2 else 1
            a = sj.decode_jpeg(data, colorspace="GRAY" if channels == 1 else "RGB", min_factor=s,
                               min_height=-(-H0 // s), min_width=-(-W0 // s))  # (H, W, C), exactly 1/s
        except ValueError:  # simplejpeg's error for anything it refuses: Pillow's path says why, or decodes it
            pass
        else:
            t = torch.from_numpy(a).permute(2, 0, 1)  # (C, H, W) view of the decoded pixels
            r = _resized_box(t, box, a.shape[1] / W0, a.shape[0] / H0, h, w, copy=False)  # (C, h, w), HWC memory
            cv2 = import_cv2()
            if len(r) == 3 and cv2 is not None and all(p.flags.c_contiguous for p in out):
                hwc = r.transpose(1, 2, 0)
                cv2.split(cv2.flip(hwc, 1) if crop.mirrored(draws) else hwc, list(out))  # into the planes in
                # place: 6x numpy's strided copy
            else:
                out[...] = r[..., ::-1] if crop.mirrored(draws) else r
            return
    out[...] = decode_image(io.BytesIO(data), size, channels, crop=(crop, draws))


def _bomb(pixels: int) -> bool:
    """Over Pillow's decompression-bomb limit (twice Image.MAX_IMAGE_PIXELS), where Pillow raises."""
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS is not None and pixels > 2 * Image.MAX_IMAGE_PIXELS


_CV2: list = []
_cv2_lock = threading.Lock()


def import_cv2():
    """OpenCV (with its `cv2.data` subpackage: the bundled cascades' folder), imported once under a lock, or None where
    it is not installed. Two threads importing cv2 at once (prepare's and the decoders' pools): one of them got
    "cannot import name 'data'" in 4 of 20 fresh processes, as cv2's bootstrap replaces its own module."""
    if not _CV2:
        with _cv2_lock:
            if not _CV2:
                try:
                    import cv2
                    import cv2.data  # noqa: F401
                except ImportError:
                    cv2 = None
                if cv2 is not None:  # no OpenCV thread pool: a process forked after it ran (the shard decoders)
                    cv2.setNumThreads(0)  # could hang on its mutex (seen once in a test; an OpenCV-after-fork trap)
                _CV2.append(cv2)
    return _CV2[0]


@functools.cache
def _simplejpeg():
    """The simplejpeg module, or None where it is not installed (a dependency of danlu; Pillow's path then)."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def _decode_jpeg(path: Union[str, Path, BinaryIO], channels: int) -> "torch.Tensor":
    """A whole JPEG (a path or an open binary file) -> (channels, H, W) uint8, by torchvision's libjpeg-turbo decoder:
    2x Pillow's decode-and-copy for a 256 px photo, with the GIL released."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if isinstance(path, (str, os.PathLike)):
        data = Path(path).read_bytes()
    else:
        path.seek(0)
        data = path.read()
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except RuntimeError as e:  # "decode_jpeg, <source file>:<line>, <libjpeg's reason>": the reason
        raise BadImage(f"not a readable image (JPEG: {str(e).split(', ')[-1].strip()})") from None


def _resized_box(t: "torch.Tensor", box: tuple[int, int, int, int], fx: float, fy: float, h: int,
                 w: int, copy: bool = True) -> np.ndarray:
    """The box (left, top, width, height; source pixels, scaled by fx, fy to the decoded image's) of a decoded
    (C, H, W) uint8 image, resized to (C, h, w) uint8 with antialiasing by torch's uint8 resize (torchvision's),
    on channels-last pixels, its fast layout: 2x Pillow's resize on a CPU."""
    H, W = t.shape[-2:]
    left, top = min(W - 1, int(round(box[0] * fx))), min(H - 1, int(round(box[1] * fy)))
    right, bottom = max(left + 1, min(W, int(round((box[0] + box[2]) * fx)))), \
        max(top + 1, min(H, int(round((box[1] + box[3]) * fy))))
    cv2 = import_cv2()
    if bottom - top <= h and right - left <= w and t.shape[0] in (1, 3) and cv2 is not None:
        # enlarged both ways, where antialiasing does nothing: OpenCV's bilinear resize (the same sampling grid; its
        # fixed-point weights put a value at most 1 level from torch's, 0.2 on average), 2x torch's on a CPU
        a = cv2.resize(t.permute(1, 2, 0).numpy()[top:bottom, left:right], (w, h),
                       interpolation=cv2.INTER_LINEAR)  # (h, w, C), or (h, w) for one channel
        a = a.reshape(h, w, -1).transpose(2, 0, 1)
        return np.ascontiguousarray(a) if copy else a
    t = t[None, :, top:bottom, left:right]
    if t.shape[1] == 3:
        t = t.contiguous(memory_format=torch.channels_last)  # a no-op for Pillow's pixels
    out = torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return np.ascontiguousarray(out[0].numpy()) if copy else out[0].numpy()  # copy=False: a view, channels-last


def cover_size(W: int, H: int, h: int, w: int) -> tuple[int, int]:
    """(width, height) that just covers (w, h) keeping the aspect ratio: for a square target, the shorter side
    becomes the target and the longer one int(target * long / short), torchvision's Resize(int) rule."""
    if h == w:
        return (w, int(w * H / W)) if W <= H else (int(h * W / H), h)
    s = max(h / H, w / W)
    return max(w, int(W * s)), max(h, int(H * s))


def default_workers() -> int:
    """All the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def decode_many(paths: Sequence[Union[str, Path]], size: tuple[int, int], channels: int = 3, resize: str = "crop", *,
                workers: Optional[int] = None, out: Optional[np.ndarray] = None,
                progress: Optional[Callable[[int], None]] = None) -> tuple[np.ndarray, dict[int, str]]:
    """Decode `paths` in parallel into `out` (N, C, h, w) uint8 (allocated when not given; rows of bad files stay
    zero). Returns (out, {index: reason} for the files that are not readable images). `progress(k)` is called with
    the number of files finished since the last call."""
    if resize not in RESIZE_MODES:
        raise DanluError(f"data.resize={resize!r}: expected one of {', '.join(RESIZE_MODES)}")
    n, (h, w) = len(paths), size
    if out is None:
        out = np.zeros((n, channels, h, w), np.uint8)
    bad: dict[int, str] = {}
    lock = threading.Lock()

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            try:
                out[i] = decode_image(paths[i], size, channels, resize)
            except BadImage as e:
                out[i] = 0
                with lock:
                    bad[i] = str(e)
        if progress is not None:
            with lock:
                progress(hi - lo)

    workers = workers or default_workers()
    step = max(1, min(64, math.ceil(n / (workers * 4))))  # small chunks: balanced across threads
    # Pillow's notes on odd files (EXIF, palettes) are not the user's concern. The filter is set here, in the calling
    # thread, around the whole pool: warnings.catch_warnings inside worker threads would race on the global filters.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"PIL\.")
        if workers == 1 or n <= step:
            work(0, n)
            return out, bad
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="danlu-decode") as pool:
            for f in [pool.submit(work, lo, min(n, lo + step)) for lo in range(0, n, step)]:
                f.result()
    return out, bad


def decode_rows(data: Sequence[bytes], out: np.ndarray, lo: int, hi: int, size: tuple[int, int], channels: int,
                resize: str, crop: Optional[ResizedCrop] = None, draws: Optional[np.ndarray] = None) -> dict[int, str]:
    """Decode the encoded images data[lo:hi] into rows lo..hi of `out` (B, C, h, w) uint8 on the CPU, each a random
    resized crop where `crop` and its `draws` (B, 5) are given (decode_crop), else resized by `resize`; {row: reason}
    of those that are not images (their rows: zeros)."""
    bad = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"PIL\.")
        for i in range(lo, hi):
            try:
                if draws is not None:
                    decode_crop(data[i], size, channels, crop, draws[i], out[i])
                else:
                    out[i] = decode_image(io.BytesIO(data[i]), size, channels, resize)
            except BadImage as e:
                out[i] = 0
                bad[i] = str(e)
    return bad


def decode_cuda(data: Sequence[bytes], size: tuple[int, int], channels: int, resize: str, device: torch.device,
                crop: Optional[ResizedCrop] = None,
                draws: Optional[np.ndarray] = None) -> tuple[torch.Tensor, dict[int, str]]:
    """One batch of encoded images decoded on the GPU: JPEGs batched through nvJPEG (torchvision.io.decode_jpeg), each
    resized to the target (shorter side + centre crop, or stretched; or the random resized crop of `crop` and its
    `draws`; antialiased) on the device; other formats, and JPEGs that nvJPEG refuses, decoded on the CPU.
    (B, C, H, W) uint8 on `device`, {row: reason} of rows that are not images."""
    from torchvision.io import ImageReadMode, decode_jpeg

    (h, w), c = size, channels
    out = torch.empty((len(data), c, h, w), dtype=torch.uint8, device=device)
    mode = ImageReadMode.GRAY if c == 1 else ImageReadMode.RGB
    jpeg = [i for i, d in enumerate(data) if d[:3] == b"\xff\xd8\xff"]
    cpu = [i for i in range(len(data)) if i not in set(jpeg)]
    bad: dict[int, str] = {}
    if jpeg:
        encoded = [torch.frombuffer(bytearray(data[i]), dtype=torch.uint8) for i in jpeg]
        try:
            decoded = decode_jpeg(encoded, mode=mode, device=device)  # list of (C, H0, W0) uint8 on the device
        except RuntimeError:  # one bad JPEG fails the batch: decode them one by one to find it
            decoded = []
            for i, d in zip(jpeg, encoded):
                try:
                    decoded.append(decode_jpeg(d, mode=mode, device=device))
                except RuntimeError:
                    decoded.append(None)
                    cpu.append(i)
        for i, im in zip(jpeg, decoded):
            if im is not None:
                box = None if draws is None else crop.box(im.shape[-1], im.shape[-2], draws[i])
                r = _resize_on_device(im, h, w, resize, box)
                out[i] = r.flip(-1) if box is not None and crop.mirrored(draws[i]) else r
    for i in sorted(cpu):
        try:
            out[i] = torch.from_numpy(decode_image(io.BytesIO(data[i]), (h, w), c, resize,
                                                   crop=None if draws is None else (crop, draws[i]))).to(device)
        except BadImage as e:
            out[i] = 0
            bad[i] = str(e)
    return out, bad


def _resize_on_device(im: torch.Tensor, h: int, w: int, resize: str,
                      box: Optional[tuple[int, int, int, int]] = None) -> torch.Tensor:
    """(C, H0, W0) uint8 -> (C, h, w) uint8: decode_image's geometry (crop: cover then centre; or the crop box
    (left, top, width, height) resized to (h, w)), on the device."""
    if box is not None:
        x = im[None, :, box[1]:box[1] + box[3], box[0]:box[0] + box[2]].float()
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
        return x.round_().clamp_(0, 255).to(torch.uint8)
    H0, W0 = im.shape[-2:]
    rw, rh = cover_size(W0, H0, h, w) if resize == "crop" else (w, h)
    x = torch.nn.functional.interpolate(im[None].float(), size=(rh, rw), mode="bilinear", antialias=True,
                                        align_corners=False)[0]
    top, left = int(round((rh - h) / 2.0)), int(round((rw - w) / 2.0))
    return x[:, top:top + h, left:left + w].round_().clamp_(0, 255).to(torch.uint8)
