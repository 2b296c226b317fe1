"""Image preprocessing for CLIP-style vision towers, with numpy and Pillow only.

The runtime must not import torch or transformers, yet the vision graph it runs was traced on pixel
values made by transformers' image processor. Any drift in those pixel values (an off-by-one resize
size, a crop shifted by a pixel, alpha composited differently) silently changes every visual token,
so this module reproduces ``transformers.CLIPImageProcessorPil`` (transformers 5.x, PIL backend)
step by step rather than approximating it:

1. convert to RGB the way ``image_transforms.convert_to_rgb`` does: PIL images with an alpha band
   or a ``transparency`` entry are alpha-composited onto opaque white, everything else goes through
   ``Image.convert("RGB")``; HxWx4 arrays are blended in float64 and rounded, as transformers'
   numpy branch does;
2. resize with Pillow on the **uint8** RGB image (transformers hands uint8 data to ``PIL.Image.resize``
   without rescaling it first), to the size ``get_resize_output_image_size(default_to_square=False)``
   computes: the short side becomes ``shortest_edge`` and the long side is
   ``int(shortest_edge * long / short)``, truncated rather than rounded;
3. center crop on the uint8 channel-first array, with ``top = (h - crop_h) // 2`` (floor, so odd
   leftovers lose their extra row at the bottom) and, when the image is smaller than the crop, zero
   padding placed ``ceil(missing / 2)`` pixels from the top/left before the crop is taken;
4. rescale as ``uint8 -> float64 * factor -> float32``;
5. normalize in float32 as ``(x - float32(mean)) / float32(std)`` per channel.

The result matches the transformers processor bit for bit on the same input image.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps

from rlens.errors import RlensError

__all__ = [
    "CLIP_IMAGE_MEAN",
    "CLIP_IMAGE_STD",
    "ImageInput",
    "ImageProcessorConfig",
    "load_image",
    "preprocess",
]

# transformers.image_utils.OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, copied so the runtime needs no transformers.
CLIP_IMAGE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# Pillow's resampling filters by their enum value, as preprocessor configs store them.
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

# Defaults of transformers' CLIPImageProcessor, used for keys a config leaves out (or sets to null,
# which transformers also replaces by the class default).
_CLIP_SHORTEST_EDGE = 224
_CLIP_CROP = 224

ImageInput = str | os.PathLike | bytes | PIL.Image.Image | np.ndarray
"""One image: a file path, the encoded bytes of a file, a PIL image, or an HxWxC uint8 array."""


@dataclass(frozen=True)
class ImageProcessorConfig:
    """What the runtime needs to know to turn an image into the vision tower's pixel values.

    Each step of the transformers pipeline is represented by its parameters, with ``None`` meaning
    the step is switched off, so that a disabled step cannot carry stale parameters around.

    Attributes:
        shortest_edge: resize so the shorter side has this many pixels (aspect ratio kept); ``None``
            when the image is not resized that way.
        crop_height, crop_width: center-crop size; ``None`` when ``do_center_crop`` is false.
        resample: Pillow resampling filter as its integer enum value (3 = bicubic).
        rescale_factor: multiplier from uint8 to float, usually 1/255; ``None`` when ``do_rescale``
            is false.
        image_mean, image_std: per-channel normalisation; ``None`` when ``do_normalize`` is false.
        do_convert_rgb: composite transparency onto white and convert to RGB, as transformers does.
        resize_height, resize_width: resize to exactly this size, ignoring the aspect ratio (a
            ``size`` of ``{"height", "width"}`` in the transformers config); mutually exclusive with
            ``shortest_edge``.
    """

    shortest_edge: int | None
    crop_height: int | None
    crop_width: int | None
    resample: int = 3
    rescale_factor: float | None = 1 / 255
    image_mean: tuple[float, float, float] | None = CLIP_IMAGE_MEAN
    image_std: tuple[float, float, float] | None = CLIP_IMAGE_STD
    do_convert_rgb: bool = True
    resize_height: int | None = None
    resize_width: int | None = None

    def __post_init__(self) -> None:
        """Reject inconsistent configs here, so preprocessing never meets one halfway through an image."""
        if self.shortest_edge is not None and self.resize_height is not None:
            raise RlensError(
                "image processor config sets both shortest_edge and height/width; keep one of them"
            )
        if (self.resize_height is None) != (self.resize_width is None):
            raise RlensError("image processor config must give both resize height and width, or neither")
        if (self.crop_height is None) != (self.crop_width is None):
            raise RlensError("image processor config must give both crop height and width, or neither")
        for name in ("shortest_edge", "crop_height", "crop_width", "resize_height", "resize_width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise RlensError(f"image processor config: {name} must be a positive integer, got {value!r}")
        if self.resample not in _RESAMPLE_NAMES:
            raise RlensError(
                f"image processor config: resample must be a Pillow filter number 0-5, got {self.resample!r}"
            )
        if (self.image_mean is None) != (self.image_std is None):
            raise RlensError("image processor config must give both image_mean and image_std, or neither")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise RlensError(
                    f"image processor config: {name} must have 3 values (R, G, B), got {value!r}"
                )
        if self.image_std is not None and any(s == 0 for s in self.image_std):
            raise RlensError(f"image processor config: image_std must not contain 0, got {self.image_std!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageProcessorConfig:
        """Read the image processor section of a transformers ``preprocessor_config.json``.

        Accepts what transformers 5 ``save_pretrained`` writes, either the image processor dict
        itself or a ``processor_config.json`` that nests it under ``"image_processor"``. Keys that
        are missing or null take CLIPImageProcessor's class defaults, because that is what
        transformers does when it builds the processor from the same file. ``size`` may be
        ``{"shortest_edge": n}``, ``{"height": h, "width": w}`` (exact resize) or a bare int (the
        shortest edge, CLIP's ``default_to_square=False``); ``crop_size`` may be a dict or an int.
        """
        if not isinstance(d, dict):
            raise RlensError(f"image processor config must be a JSON object, got {type(d).__name__}")
        if isinstance(d.get("image_processor"), dict):
            d = d["image_processor"]

        def get(key: str, default: Any) -> Any:
            value = d.get(key)
            return default if value is None else value

        if get("do_pad", False):
            raise RlensError(
                "image processor config uses do_pad, which rlens does not support for vision towers"
            )

        shortest_edge = resize_height = resize_width = None
        if get("do_resize", True):
            size = get("size", {"shortest_edge": _CLIP_SHORTEST_EDGE})
            default_to_square = bool(get("default_to_square", False))
            size_dict = _size_dict(size, "size", default_to_square=default_to_square)
            if set(size_dict) == {"shortest_edge"}:
                shortest_edge = size_dict["shortest_edge"]
            elif set(size_dict) == {"height", "width"}:
                resize_height, resize_width = size_dict["height"], size_dict["width"]
            else:
                raise RlensError(
                    f"image processor config: size {size!r} is not supported; "
                    'use {"shortest_edge": n} or {"height": h, "width": w}'
                )

        crop_height = crop_width = None
        if get("do_center_crop", True):
            crop = _size_dict(get("crop_size", _CLIP_CROP), "crop_size", default_to_square=True)
            if set(crop) != {"height", "width"}:
                raise RlensError(
                    "image processor config: crop_size must be "
                    f'{{"height": h, "width": w}} or an int, got {crop!r}'
                )
            crop_height, crop_width = crop["height"], crop["width"]

        rescale_factor = float(get("rescale_factor", 1 / 255)) if get("do_rescale", True) else None

        image_mean = image_std = None
        if get("do_normalize", True):
            image_mean = _three_floats(get("image_mean", CLIP_IMAGE_MEAN), "image_mean")
            image_std = _three_floats(get("image_std", CLIP_IMAGE_STD), "image_std")

        resample = get("resample", 3)
        if isinstance(resample, bool) or not isinstance(resample, int):
            raise RlensError(
                f"image processor config: resample must be a Pillow filter number, got {resample!r}"
            )

        return cls(
            shortest_edge=shortest_edge,
            crop_height=crop_height,
            crop_width=crop_width,
            resample=int(resample),
            rescale_factor=rescale_factor,
            image_mean=image_mean,
            image_std=image_std,
            do_convert_rgb=bool(get("do_convert_rgb", True)),
            resize_height=resize_height,
            resize_width=resize_width,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict in transformers' own key names, so ``from_dict`` (and transformers) read it back.

        Disabled steps are written as ``do_x: false`` without their parameters, since any value there
        would be a default nobody chose.
        """
        out: dict[str, Any] = {"do_convert_rgb": self.do_convert_rgb}
        if self.shortest_edge is not None:
            out.update(do_resize=True, size={"shortest_edge": self.shortest_edge}, resample=self.resample)
        elif self.resize_height is not None:
            out.update(
                do_resize=True,
                size={"height": self.resize_height, "width": self.resize_width},
                resample=self.resample,
            )
        else:
            out.update(do_resize=False, resample=self.resample)
        if self.crop_height is not None:
            out.update(do_center_crop=True, crop_size={"height": self.crop_height, "width": self.crop_width})
        else:
            out["do_center_crop"] = False
        if self.rescale_factor is not None:
            out.update(do_rescale=True, rescale_factor=self.rescale_factor)
        else:
            out["do_rescale"] = False
        if self.image_mean is not None and self.image_std is not None:
            out.update(do_normalize=True, image_mean=list(self.image_mean), image_std=list(self.image_std))
        else:
            out["do_normalize"] = False
        return out


def _size_dict(size: Any, name: str, *, default_to_square: bool) -> dict[str, int]:
    """Normalise a size the way transformers' ``get_size_dict`` does, keeping only int values."""
    if isinstance(size, dict):
        result = dict(size)
    elif isinstance(size, int) and not isinstance(size, bool):
        result = {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        result = {"height": size[0], "width": size[1]}
    else:
        raise RlensError(f"image processor config: cannot read {name} {size!r}")
    for key, value in result.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise RlensError(f"image processor config: {name}[{key!r}] must be an integer, got {value!r}")
    return result


def _three_floats(value: Any, name: str) -> tuple[float, float, float]:
    """Per-channel mean/std; a single number means the same for all channels, as in transformers."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3:
        try:
            a, b, c = (float(v) for v in value)
        except (TypeError, ValueError):
            pass
        else:
            return (a, b, c)
    raise RlensError(f"image processor config: {name} must be 3 numbers (R, G, B), got {value!r}")


def _one_line(text: str) -> str:
    """Collapse whitespace so an error from Pillow cannot break the one-line message rule."""
    return " ".join(text.split())


def load_image(image: ImageInput) -> PIL.Image.Image:
    """Open an image so preprocessing can run on it, raising :class:`RlensError` if it cannot be read.

    Files and bytes are decoded fully here (not lazily), so a truncated file fails with a clear
    message at load time instead of deep inside a resize. Their EXIF orientation is applied, as
    ``transformers.image_utils.load_image`` and the pipelines do, so phone photos are upright. The
    mode is kept (alpha included) so that :func:`preprocess` can composite transparency onto white
    exactly as the image processor does. PIL images are returned unchanged, and arrays are wrapped
    with ``Image.fromarray``.
    """
    if isinstance(image, PIL.Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return PIL.Image.fromarray(_check_array(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return _open(io.BytesIO(data), f"({len(data)} bytes of data)", "give the bytes of a PNG or JPEG file")
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        label = f"'{path}'"
        if not os.path.exists(path):
            raise RlensError(f"cannot read image {label}: no such file; give a PNG or JPEG file")
        if os.path.isdir(path):
            raise RlensError(f"cannot read image {label}: it is a directory; give a PNG or JPEG file")
        return _open(path, label, "give a PNG or JPEG file")
    raise TypeError(
        f"image must be a path, bytes, a PIL image or an HxWxC uint8 numpy array, got {type(image).__name__}"
    )


def _open(source: str | io.BytesIO, label: str, hint: str) -> PIL.Image.Image:
    """Decode one image file completely and apply its EXIF orientation."""
    try:
        with PIL.Image.open(source) as opened:
            opened.load()
            # exif_transpose always returns a new image, detached from the file about to be closed.
            result = PIL.ImageOps.exif_transpose(opened)
    except PIL.UnidentifiedImageError:
        reason = "not a recognised image format"
    except PIL.Image.DecompressionBombError as exc:
        reason = f"too large to decode safely ({_one_line(str(exc))})"
    except PermissionError:
        reason = "permission denied"
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports corrupt or truncated data with these, depending on the format plugin.
        reason = f"corrupt or truncated image data ({_one_line(str(exc)) or type(exc).__name__})"
    else:
        assert result is not None
        return result
    raise RlensError(f"cannot read image {label}: {reason}; {hint}")


def _check_array(array: np.ndarray) -> np.ndarray:
    """Accept HxW or HxWxC (C in 1, 3, 4) uint8 arrays, the layouts an image file decodes to."""
    ok_shape = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))
    if array.dtype != np.uint8 or not ok_shape or 0 in array.shape:
        raise RlensError(
            f"cannot use image array of shape {tuple(array.shape)} and dtype {array.dtype}; "
            "give an HxWx3 (or HxWx4, HxW) uint8 array"
        )
    return array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array


def _to_rgb_array(image: PIL.Image.Image | np.ndarray, do_convert_rgb: bool) -> np.ndarray:
    """HxWx3 uint8 RGB, converted exactly as transformers' ``convert_to_rgb`` does.

    With ``do_convert_rgb`` false transformers passes RGB data through untouched and fails later on
    anything else (normalising 1 or 4 channels with 3 means), so non-RGB inputs still get the same
    conversion here: the vision tower needs three channels either way.
    """
    if isinstance(image, np.ndarray):
        array = _check_array(image)
        if array.ndim == 2:
            return np.repeat(array[:, :, None], 3, axis=2)
        if array.shape[2] == 4:
            # transformers' numpy branch: float64 blend onto white, rounded half to even.
            alpha = array[..., 3:4] / 255
            composite = alpha * array[..., :3] + (1 - alpha) * 255
            return np.round(composite).astype(np.uint8)
        return array
    if image.mode == "RGB" and (not do_convert_rgb or image.info.get("transparency") is None):
        return np.asarray(image)
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(PIL.Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _resize_size(height: int, width: int, config: ImageProcessorConfig) -> tuple[int, int] | None:
    """Target (height, width), or None when the config does not resize.

    Mirrors ``get_resize_output_image_size(size, default_to_square=False)``: the short side (the
    width when the image is square) becomes ``shortest_edge`` and the long side is
    ``int(shortest_edge * long / short)``, i.e. a float division truncated towards zero.
    """
    if config.shortest_edge is not None:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = config.shortest_edge, int(config.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if config.resize_height is not None and config.resize_width is not None:
        return config.resize_height, config.resize_width
    return None


def _center_crop(image: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """Center crop a CxHxW array, zero-padding first when it is smaller than the crop.

    Same offsets as ``transformers.image_transforms.center_crop``: ``top = (h - crop_h) // 2``, and
    when padding is needed the image sits ``ceil((new_h - h) / 2)`` rows from the top of a zero
    canvas of ``max(crop_h, h)`` rows (likewise for columns) before the crop is cut out.
    """
    height, width = image.shape[-2:]
    top = (height - crop_height) // 2
    left = (width - crop_width) // 2
    bottom, right = top + crop_height, left + crop_width
    if top >= 0 and bottom <= height and left >= 0 and right <= width:
        return image[..., top:bottom, left:right]

    new_height, new_width = max(crop_height, height), max(crop_width, width)
    canvas = np.zeros((*image.shape[:-2], new_height, new_width), dtype=image.dtype)
    top_pad = -(-(new_height - height) // 2)
    left_pad = -(-(new_width - width) // 2)
    canvas[..., top_pad : top_pad + height, left_pad : left_pad + width] = image
    top, bottom, left, right = top + top_pad, bottom + top_pad, left + left_pad, right + left_pad
    return canvas[..., max(0, top) : min(new_height, bottom), max(0, left) : min(new_width, right)]


def _preprocess_one(image: ImageInput, config: ImageProcessorConfig) -> np.ndarray:
    """One image to a 3xHxW float32 array, following transformers' PilBackend step by step."""
    if not isinstance(image, np.ndarray):
        image = load_image(image)
    rgb = _to_rgb_array(image, config.do_convert_rgb)

    target = _resize_size(rgb.shape[0], rgb.shape[1], config)
    if target is not None:
        # Resized as uint8 through Pillow, exactly where transformers resizes (before any rescale).
        height, width = target
        resized = PIL.Image.fromarray(rgb).resize(
            (width, height), resample=config.resample, reducing_gap=None
        )
        rgb = np.asarray(resized)

    pixels = np.moveaxis(rgb, -1, 0)  # channel-first uint8, where transformers crops
    if config.crop_height is not None and config.crop_width is not None:
        pixels = _center_crop(pixels, config.crop_height, config.crop_width)

    if config.rescale_factor is not None:
        values = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
    else:
        values = pixels.astype(np.float32)

    if config.image_mean is not None and config.image_std is not None:
        mean = np.asarray(config.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(config.image_std, dtype=np.float32)[:, None, None]
        values = (values - mean) / std
    return np.ascontiguousarray(values, dtype=np.float32)


def preprocess(images: ImageInput | Sequence[ImageInput], config: ImageProcessorConfig) -> np.ndarray:
    """Turn one image or a list of images into the ``[B, 3, H, W]`` float32 pixel values of the vision tower.

    Raises :class:`RlensError` for unreadable images, and when a batch does not come out at one size
    (possible only when the config has no center crop and the aspect ratios differ).
    """
    single = isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, PIL.Image.Image, np.ndarray))
    batch: Sequence[ImageInput] = [images] if single else images  # type: ignore[list-item]
    if not isinstance(batch, Sequence):
        raise TypeError(f"images must be an image or a sequence of images, got {type(images).__name__}")
    if len(batch) == 0:
        raise RlensError("no images given; give at least one PNG or JPEG file")
    arrays = [_preprocess_one(image, config) for image in batch]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        sizes = ", ".join(f"{s[1]}x{s[2]}" for s in sorted(shapes))
        raise RlensError(
            f"images come out at different sizes ({sizes}) because the image processor config has no "
            "center crop; give images of one aspect ratio, or one image at a time"
        )
    return np.stack(arrays)
