"""Parity of rlens' numpy/Pillow preprocessing with transformers' CLIPImageProcessorPil.

The vision graphs are traced on pixel values made by transformers, so the runtime's own
preprocessing is only correct if it reproduces them on the same image; these tests compare the two
directly (to 1e-5, in practice bit for bit) over the cases where the two could plausibly diverge:
aspect ratios and their rounding, images smaller than the crop, modes needing RGB conversion, and
configs read from what transformers writes.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from rlens.errors import RlensError
from rlens.runtime.preprocess import ImageProcessorConfig, load_image, preprocess

transformers = pytest.importorskip("transformers")
TOL = 1e-5


def _hf(image: PIL.Image.Image | np.ndarray, **kwargs: object) -> np.ndarray:
    """Pixel values from transformers' PIL-backend CLIP processor, as a [1, 3, H, W] array."""
    processor = transformers.CLIPImageProcessorPil(**kwargs)
    return np.asarray(processor(image, return_tensors="np")["pixel_values"])


def _config(size: int, crop: int | None = None) -> ImageProcessorConfig:
    crop = size if crop is None else crop
    return ImageProcessorConfig(shortest_edge=size, crop_height=crop, crop_width=crop)


def _rgb(height: int, width: int, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _assert_parity(image: PIL.Image.Image | np.ndarray, size: int, crop: int | None = None) -> None:
    crop = size if crop is None else crop
    expected = _hf(image, size={"shortest_edge": size}, crop_size={"height": crop, "width": crop})
    got = preprocess(image, _config(size, crop))
    assert got.dtype == np.float32
    assert got.shape == expected.shape == (1, 3, crop, crop)
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize(
    ("height", "width"),
    [(47, 83), (83, 47), (50, 50), (31, 100), (101, 33), (7, 9)],
    ids=["landscape", "portrait", "square", "wide", "tall", "smaller-than-crop"],
)
@pytest.mark.parametrize("size", [32, 336])
def test_parity_rgb(height: int, width: int, size: int) -> None:
    _assert_parity(_rgb(height, width, seed=height * 1000 + width), size)


def test_parity_rgba_composites_on_white() -> None:
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (40, 57, 4), dtype=np.uint8)
    rgba[:10, :, 3] = 0  # fully transparent rows must become white, not their hidden colour
    _assert_parity(PIL.Image.fromarray(rgba), 32)
    _assert_parity(rgba, 32)  # the ndarray branch blends in float64 instead of with Pillow


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "LA"])
def test_parity_other_modes(mode: str) -> None:
    image = _rgb(45, 61, seed=2).convert(mode)
    _assert_parity(image, 32)


def test_parity_palette_with_transparency() -> None:
    image = _rgb(30, 44, seed=3).convert("P")
    image.info["transparency"] = 0
    _assert_parity(image, 32)


@pytest.mark.parametrize(("size", "crop"), [(32, 40), (33, 40), (32, 24), (33, 17)])
def test_parity_crop_differs_from_size(size: int, crop: int) -> None:
    # Crop larger than the resized image pads with zeros; odd leftovers test the offset rounding.
    _assert_parity(_rgb(37, 52, seed=4), size, crop)


def test_parity_image_smaller_than_crop_without_resize() -> None:
    # Odd shortfalls on both axes (25 rows, 23 columns) pin down where the zero padding goes.
    image = _rgb(7, 9, seed=13)
    kwargs = {"do_resize": False, "crop_size": {"height": 32, "width": 32}}
    expected = _hf(image, **kwargs)
    config = ImageProcessorConfig.from_dict(transformers.CLIPImageProcessorPil(**kwargs).to_dict())
    assert config.shortest_edge is None and config.resize_height is None
    got = preprocess(image, config)
    assert got.shape == expected.shape == (1, 3, 32, 32)
    assert np.abs(got - expected).max() <= TOL


def test_parity_rectangular_crop_and_exact_resize() -> None:
    image = _rgb(40, 70, seed=5)
    expected = _hf(image, size={"height": 30, "width": 45}, crop_size={"height": 28, "width": 35})
    config = ImageProcessorConfig.from_dict(
        {"size": {"height": 30, "width": 45}, "crop_size": {"height": 28, "width": 35}}
    )
    assert (config.resize_height, config.resize_width, config.shortest_edge) == (30, 45, None)
    assert np.abs(preprocess(image, config) - expected).max() <= TOL


def test_parity_disabled_steps_and_other_resample() -> None:
    image = _rgb(33, 48, seed=6)
    kwargs = {
        "size": {"shortest_edge": 32},
        "do_center_crop": False,
        "do_normalize": False,
        "resample": 2,
    }
    expected = _hf(image, **kwargs)
    processor = transformers.CLIPImageProcessorPil(**kwargs)
    config = ImageProcessorConfig.from_dict(processor.to_dict())
    assert (config.crop_height, config.image_mean, config.resample) == (None, None, 2)
    got = preprocess(image, config)
    assert got.shape == expected.shape == (1, 3, 32, 46)
    assert np.abs(got - expected).max() <= TOL


def test_from_dict_of_real_processor() -> None:
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 64}, crop_size={"height": 48, "width": 48}, image_mean=[0.5, 0.4, 0.3]
    )
    config = ImageProcessorConfig.from_dict(processor.to_dict())
    assert config == ImageProcessorConfig(
        shortest_edge=64, crop_height=48, crop_width=48, image_mean=(0.5, 0.4, 0.3)
    )
    image = _rgb(70, 90, seed=7)
    expected = np.asarray(processor(image, return_tensors="np")["pixel_values"])
    assert np.abs(preprocess(image, config) - expected).max() <= TOL


def test_from_saved_preprocessor_json(tmp_path: Path) -> None:
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    config = ImageProcessorConfig.from_dict(saved)
    assert config == _config(32)
    # processor_config.json nests the same dict under "image_processor".
    assert ImageProcessorConfig.from_dict({"image_processor": saved, "processor_class": "X"}) == config
    image = _rgb(41, 29, seed=8)
    expected = np.asarray(processor(image, return_tensors="np")["pixel_values"])
    assert np.abs(preprocess(image, config) - expected).max() <= TOL


def test_from_dict_legacy_forms_and_defaults() -> None:
    assert ImageProcessorConfig.from_dict({}) == _config(224)
    legacy = ImageProcessorConfig.from_dict({"size": 336, "crop_size": 336, "image_mean": None})
    assert legacy == _config(336)
    with pytest.raises(RlensError):
        ImageProcessorConfig.from_dict({"size": {"longest_edge": 100}})


@pytest.mark.parametrize(
    "config",
    [
        _config(32),
        ImageProcessorConfig(
            shortest_edge=None,
            crop_height=None,
            crop_width=None,
            rescale_factor=None,
            image_mean=None,
            image_std=None,
            do_convert_rgb=False,
            resample=1,
        ),
        ImageProcessorConfig(
            shortest_edge=None,
            crop_height=20,
            crop_width=30,
            resize_height=40,
            resize_width=50,
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.25, 0.5, 1.0),
        ),
    ],
)
def test_to_dict_round_trip(config: ImageProcessorConfig) -> None:
    as_json = json.loads(json.dumps(config.to_dict()))
    assert ImageProcessorConfig.from_dict(as_json) == config


def test_to_dict_is_read_the_same_by_transformers() -> None:
    config = _config(32, 24)
    image = _rgb(50, 35, seed=9)
    expected = np.asarray(
        transformers.CLIPImageProcessorPil(**config.to_dict())(image, return_tensors="np")["pixel_values"]
    )
    assert np.abs(preprocess(image, config) - expected).max() <= TOL


def test_bytes_path_and_batch_input(tmp_path: Path) -> None:
    image = _rgb(45, 60, seed=10)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path = tmp_path / "x.png"
    path.write_bytes(buffer.getvalue())
    expected = _hf(image, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})

    from_bytes = preprocess(buffer.getvalue(), _config(32))
    assert np.abs(from_bytes - expected).max() <= TOL
    batch = preprocess([path, str(path), image, np.asarray(image)], _config(32))
    assert batch.shape == (4, 3, 32, 32)
    assert np.abs(batch - expected).max() <= TOL


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = _rgb(20, 30, seed=11)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    assert load_image(path).size == (20, 30)


def test_mixed_sizes_without_crop_is_an_error() -> None:
    config = ImageProcessorConfig(shortest_edge=16, crop_height=None, crop_width=None)
    with pytest.raises(RlensError, match="different sizes"):
        preprocess([_rgb(16, 20), _rgb(16, 30)], config)


def _assert_one_line_error(exc: pytest.ExceptionInfo[RlensError], *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message and message.strip() == message
    for fragment in fragments:
        assert fragment in message


def test_missing_file_is_rlens_error(tmp_path: Path) -> None:
    with pytest.raises(RlensError) as exc:
        preprocess(tmp_path / "nope.png", _config(32))
    _assert_one_line_error(exc, "cannot read image", "nope.png", "no such file", "PNG or JPEG")


def test_directory_is_rlens_error(tmp_path: Path) -> None:
    with pytest.raises(RlensError) as exc:
        load_image(tmp_path)
    _assert_one_line_error(exc, "directory")


def test_garbage_file_and_bytes_are_rlens_errors(tmp_path: Path) -> None:
    path = tmp_path / "garbage.png"
    path.write_bytes(b"this is not\nan image at all\n" * 10)
    with pytest.raises(RlensError) as exc:
        load_image(path)
    _assert_one_line_error(exc, "garbage.png", "not a recognised image format", "PNG or JPEG")
    with pytest.raises(RlensError) as exc:
        preprocess(b"\x89PNG\r\n\x1a\nnonsense", _config(32))
    _assert_one_line_error(exc, "bytes", "PNG or JPEG")


def test_truncated_file_is_rlens_error(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    _rgb(64, 64, seed=12).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(RlensError) as exc:
        load_image(path)
    _assert_one_line_error(exc, "cut.jpg", "PNG or JPEG")


def test_bad_array_is_rlens_error() -> None:
    with pytest.raises(RlensError):
        preprocess(np.zeros((8, 8, 3), dtype=np.float32), _config(8))


def test_runtime_module_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, rlens.runtime.preprocess\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
