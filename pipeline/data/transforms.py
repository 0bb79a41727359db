"""Deterministic image preprocessing shared by every stage that touches pixels.

One chain, used everywhere, so the pixels the decoder learns to reconstruct and the
pixels the frozen encoder sees always come from the same crop:

    file --load_rgb--> RGB --adm_center_crop--> S x S uint8 --apply_view--> view
         (pixel targets: ``load_pixels``)                     --encoder_input--> normalised tensor

Choices where the usual references are silent (all deterministic, no randomness):

* Transparency (RGBA, LA, PA, palette + transparency) is composited over white.
  Dropping alpha, as ``Image.convert("RGB")`` does, exposes whatever colour the
  transparent pixels happen to store.
* 16-bit greyscale (``I;16*``, and ``I`` with values above 255) keeps the top 8 bits;
  Pillow's own conversion clips everything above 255 to white.
* EXIF orientation is applied (``ImageOps.exif_transpose``): a phone photo stored
  sideways with an orientation tag is used upright, as every viewer shows it
  (torchvision's ImageFolder loader ignores the tag).
* CMYK (and other non-RGB modes) go through Pillow's conversion; an animated GIF,
  WebP or PNG gives its first frame.
* An image above Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, about
  179 M pixels at twice the default) is a failure "image too large", handled by
  ``data.on_error`` like any unreadable file; it is never decoded.
* Truncated files are errors: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set.
* ``encoder_input`` resizes each cropped view with Pillow BICUBIC to the encoder size.
  Pillow's bicubic kernel is mirror-symmetric: resizing the flipped crop equals
  flipping the resized crop, bit for bit (measured for 64->112, 256->224, 32->28 and
  others; covered by a test), so the "flip" view's encoder input is exactly the mirror
  of the "orig" view's.

Feature stores record this chain by name in their ``crop`` / ``resize`` attrs
(``fae_pipe.cache.schema.CROP_POLICY`` / ``RESIZE_POLICY``).

Sources: a path, or a ``TarMember`` (``fae_pipe.data.tar_members``: the byte range of an
image kept inside a WebDataset tar shard, what ``DatasetIndex.abspath`` returns for
such samples); ``open_source``/``source_size`` are the one place that tells them apart,
so every stage that decodes pixels reads tar members without knowing about them.

Torch is imported inside ``encoder_input`` only, so ``fae-pipe prepare`` (which only
checks images) never pays for importing it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fae_pipe.data.tar_members import TarMember
from fae_pipe.errors import UserError

VIEWS = ("orig", "flip")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = (255, 255, 255)


class ImageDecodeError(Exception):
    """An image file that cannot be fully decoded; ``reason`` is short and human."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """Map 16-bit (or wide integer) greyscale to 8 bits by keeping the high byte."""
    arr = np.asarray(img)
    if img.mode == "I" and arr.max(initial=0) <= 255:
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    arr = np.clip(arr.astype(np.int64), 0, 65535) >> 8
    return Image.fromarray(arr.astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any Pillow mode to RGB (see module notes for the policy)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode == "I":
        return _sixteen_bit_to_l(img).convert("RGB")
    if img.mode == "F":
        arr = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return img.convert("RGB")


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (a copy when it rotates; the image itself otherwise)."""
    try:
        if img.getexif().get(0x0112, 1) == 1:
            return img
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a malformed EXIF block: keep the pixels as stored
        return img


def as_source(path) -> Path | TarMember:
    """A path-like (str, Path) as ``Path``; a ``TarMember`` as it is."""
    return path if isinstance(path, TarMember) else Path(path)


def source_size(source: Path | TarMember) -> int:
    """Bytes of an image file or tar member (``OSError`` when a file is unreadable)."""
    return source.size if isinstance(source, TarMember) else source.stat().st_size


def open_source(source: Path | TarMember):
    """A binary file object over the image's bytes (a tar member is read whole: one seek, one read)."""
    return source.open() if isinstance(source, TarMember) else open(source, "rb")


def load_rgb(path) -> Image.Image:
    """Fully decode ``path`` (a path or a ``TarMember``) to an RGB image or raise ``ImageDecodeError``."""
    path = as_source(path)
    try:
        f = open_source(path) if source_size(path) else None
    except OSError as e:
        if isinstance(path, Path) and path.is_symlink():
            raise ImageDecodeError(path, f"dangling symlink: {e.strerror or e}") from None
        raise ImageDecodeError(path, f"unreadable: {e.strerror or e}") from None
    if f is None:
        raise ImageDecodeError(path, "zero-byte file")
    try:
        with f, Image.open(f) as img:
            img.seek(0)  # animated: the first frame
            img.load()
            try:
                return to_rgb(_upright(img))
            except ValueError as e:
                raise ImageDecodeError(path, f"unsupported image mode {img.mode}: {e}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(path, f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(path, f"truncated or corrupt image: {e}") from None


def adm_center_crop(img: Image.Image, image_size: int) -> Image.Image:
    """ADM-style centre crop to ``image_size`` x ``image_size``.

    Halve with a BOX filter while the short side is at least twice the target (cheap
    anti-aliasing for large photos), BICUBIC-resize so the short side equals the target,
    then cut the centred square. This is the crop used by ADM, DiT and SiT data loaders,
    so cached pixels match the usual ImageNet 256 pipelines.
    """
    while min(img.size) >= 2 * image_size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = image_size / min(img.size)
    new_size = (round(img.width * scale), round(img.height * scale))
    if new_size != img.size:
        img = img.resize(new_size, resample=Image.BICUBIC)
    left = (img.width - image_size) // 2
    top = (img.height - image_size) // 2
    return img.crop((left, top, left + image_size, top + image_size))


def apply_view(arr: np.ndarray, view: str) -> np.ndarray:
    """Return view ``view`` of an (H, W, C) image: "orig" unchanged, "flip" mirrored left-right."""
    if view == "orig":
        return arr
    if view == "flip":
        return np.ascontiguousarray(arr[:, ::-1])
    raise UserError(f"data.views: unknown view {view!r}; valid views: {', '.join(VIEWS)}")


def load_pixels(path, image_size: int, views=VIEWS) -> np.ndarray:
    """Pixel targets of one file: uint8 array (V, image_size, image_size, 3), one row per view."""
    crop = np.asarray(adm_center_crop(load_rgb(path), image_size), dtype=np.uint8)
    return np.stack([apply_view(crop, v) for v in views])


def encoder_input(pixels, input_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Encoder inputs for uint8 pixels (N, H, W, 3): float32 tensor (N, 3, input_size, input_size).

    Each image is resized with Pillow BICUBIC (skipped when already ``input_size``),
    scaled to [0, 1] and normalised with ``mean``/``std``: the ImageNet ones DINOv2 was
    trained with by default; each encoder passes its family's (``FrozenEncoder.preprocess``).
    """
    import torch

    if isinstance(pixels, torch.Tensor):
        pixels = pixels.cpu().numpy()
    arr = np.asarray(pixels)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"encoder_input expects uint8 pixels of shape (N, H, W, 3), got {arr.dtype} {arr.shape}")
    if arr.shape[1:3] != (input_size, input_size):
        arr = np.stack([
            np.asarray(Image.fromarray(im).resize((input_size, input_size), resample=Image.BICUBIC))
            for im in arr
        ])
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous()
