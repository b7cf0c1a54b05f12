"""Card-defined preprocessing in numpy/PIL: the one definition the service and training share.

Two steps, kept apart on purpose:
- ``to_model_pixels``: decode-side geometry (alpha, mode, centre crop, resize) -> uint8 HxWx3.
  Training's readers store images in this form, so augmentation starts from the same pixels.
- ``normalise``: uint8 NxHxWx3 -> float32 Nx3xHxW, scaled and standardised.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from medcl.card import PreprocessSpec
from medcl.errors import MedclError

# A truncated file is an error for us, never a silently grey-filled image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

DEFAULT_MAX_PIXELS = 64_000_000
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})


class ImageDecodeError(MedclError, ValueError):
    """The bytes are not an image we can read; the message says why, for the client."""


class ImageTooLargeError(ImageDecodeError):
    """The image has more pixels than allowed (decompression-bomb guard)."""


# What the service accepts (the JPEG decoder also opens MPO, the multi-picture JPEG some cameras
# write). Training readers take anything Pillow reads; the service keeps its attack surface to the
# formats labs actually send.
SERVICE_FORMATS = ("PNG", "JPEG", "TIFF")


def decode_image(data: bytes | str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS,
                 formats: tuple[str, ...] | None = None) -> Image.Image:
    """Decode fully (not lazily) so truncation and corruption surface here, with a clear message.
    ``formats`` limits the decoders tried (None: any Pillow reads)."""
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else Path(data)
    if formats:
        Image.init()  # registers every plugin: Image.open only pre-registers a few and KeyErrors on the rest
    try:
        with Image.open(source, formats=list(formats) if formats else None) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageTooLargeError(f"image is {width}x{height} pixels, above the limit of {max_pixels}")
            im.load()  # pixels now in memory: the image outlives the closed source without a copy
            im = upright(im)
            return im if im.mode in ("RGB", "RGBA", "L", "I;16", "I", "F", "LA", "P") else im.convert("RGB")
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image format (PNG, JPEG or TIFF expected)") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"image could not be decoded: {e}") from None
    except Exception as e:  # a decoder failing in its own way on crafted input is still the input's fault
        raise ImageDecodeError(f"image could not be decoded ({type(e).__name__}: {e})") from None


def upright(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it: a camera's EXIF orientation tag (phone photographs of
    dermoscopy, JPEGs from slide scanners) applied to the pixels, so training and serving see the
    same tissue the same way up. Images without the tag (nearly all tiles) are returned as they are."""
    from PIL import ImageOps

    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to refuse the pixels
        return image
    if orientation in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB by the card's rules: alpha composited on white; 16-bit/float greyscale rescaled to 8 bit."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    return image.convert("RGB")


def center_crop_box(width: int, height: int, spec: PreprocessSpec,
                    pixel_size_um: float | None = None) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of the card's centre crop on an image of this size; with the
    image's pixel size (and one in the card), the box covers the card's field of view."""
    short = min(width, height)
    if spec.crop == "none":
        return (0, 0, width, height)
    if spec.crop_pixels is not None:
        side = spec.crop_pixels
        if pixel_size_um and spec.pixel_size_um:
            side = max(1, int(round(spec.crop_pixels * spec.pixel_size_um / pixel_size_um)))
        side = min(side, short)
    else:
        side = max(1, int(round(short * float(spec.crop_fraction or 1.0))))
    left = (width - side) // 2
    top = (height - side) // 2
    return (left, top, left + side, top + side)


def to_model_pixels(image: Image.Image, spec: PreprocessSpec, pixel_size_um: float | None = None) -> np.ndarray:
    """Crop and resize as the card says; returns uint8 array of shape (input_size, input_size, 3).

    ``pixel_size_um`` (the image's microns per pixel) makes the crop cover the card's field of view,
    e.g. a 40x tile (0.25 um/px) sent to a 10x model (0.97 um/px, 96 px) has its centre 373 px cut
    and resized to 96."""
    rgb = to_rgb(image)
    box = center_crop_box(rgb.width, rgb.height, spec, pixel_size_um)
    if box != (0, 0, rgb.width, rgb.height):
        rgb = rgb.crop(box)
    size = (spec.input_size, spec.input_size)
    if rgb.size != size:
        rgb = rgb.resize(size, _RESAMPLE[spec.interpolation])
    return np.asarray(rgb, dtype=np.uint8)


def normalise(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 (N, H, W, 3) or (H, W, 3) -> float32 (N, 3, H, W), scaled to [0, 1] and standardised."""
    if pixels.ndim == 3:
        pixels = pixels[None]
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected uint8 pixels of shape (N, H, W, 3), got {pixels.shape}")
    mean = np.asarray(spec.mean, dtype=np.float32) * 255.0
    scale = 1.0 / (np.asarray(spec.std, dtype=np.float32) * 255.0)
    out = (pixels.astype(np.float32) - mean) * scale
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def load_model_pixels(path: str | os.PathLike[str], spec: PreprocessSpec) -> np.ndarray:
    """Read one image file into model pixels (used by training's folder and CSV readers)."""
    return to_model_pixels(decode_image(path), spec)
