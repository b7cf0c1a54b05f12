"""The card's preprocessing: the service path and training's path give the same tensor on real images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medcl.card import Card, PreprocessSpec
from medcl.preprocess import ImageDecodeError, center_crop_box, decode_image, normalise, to_model_pixels
from tests.conftest import shared
from training.augment import standardise, to_float
from training.data import read_folder

BLOOD_SPEC = PreprocessSpec(input_size=28, crop="center", crop_pixels=200, interpolation="bilinear",
                            mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_service_and_training_give_the_same_tensor_for_a_real_photo(tmp_path: Path) -> None:
    photo = sorted(shared("blood-photos", "eosinophil").glob("*.jpg"))[0]
    # Service path: bytes as uploaded -> decode -> card geometry -> numpy normalisation.
    served = normalise(to_model_pixels(decode_image(photo.read_bytes()), BLOOD_SPEC), BLOOD_SPEC)
    # Training path: the folder reader -> uint8 store -> torch evaluation transform.
    (tmp_path / "eosinophil").mkdir()
    (tmp_path / "eosinophil" / photo.name).symlink_to(photo)
    labelled, _ = read_folder(tmp_path, BLOOD_SPEC)
    trained = standardise(to_float(torch.from_numpy(labelled.images)), BLOOD_SPEC.mean, BLOOD_SPEC.std)
    assert served.shape == (1, 3, 28, 28)
    np.testing.assert_allclose(served, trained.numpy(), rtol=0, atol=1e-5)


def test_crop_matches_medmnist_geometry_and_passes_small_tiles() -> None:
    assert center_crop_box(360, 363, BLOOD_SPEC) == (80, 81, 280, 281)
    assert center_crop_box(28, 28, BLOOD_SPEC) == (0, 0, 28, 28)
    frac = PreprocessSpec(input_size=28, crop="center", crop_fraction=0.5)
    assert center_crop_box(100, 200, frac) == (25, 75, 75, 125)


def test_a_28px_bloodmnist_tile_passes_unchanged() -> None:
    tile = np.random.default_rng(0).integers(0, 256, size=(28, 28, 3), dtype=np.uint8)
    assert np.array_equal(to_model_pixels(Image.fromarray(tile), BLOOD_SPEC), tile)


def test_rgba_greyscale_and_16_bit_are_converted() -> None:
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent -> white background
    assert (to_model_pixels(rgba, PreprocessSpec(input_size=8)) == 255).all()
    grey16 = Image.fromarray(np.full((30, 30), 65535, dtype=np.uint16))
    assert (to_model_pixels(grey16, PreprocessSpec(input_size=8)) == 255).all()
    grey = Image.fromarray(np.full((30, 30), 10, dtype=np.uint8), mode="L")
    assert (to_model_pixels(grey, PreprocessSpec(input_size=8)) == 10).all()


def test_truncated_and_garbage_bytes_raise_a_clear_error() -> None:
    photo = sorted(shared("blood-photos", "basophil").glob("*.jpg"))[0].read_bytes()
    with pytest.raises(ImageDecodeError, match="could not be decoded|truncated"):
        decode_image(photo[: len(photo) // 2])
    with pytest.raises(ImageDecodeError, match="not a recognised image format"):
        decode_image(b"this is not an image")


def test_pixel_limit_refuses_huge_images() -> None:
    buf = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buf, format="PNG")
    with pytest.raises(ImageDecodeError, match="above the limit"):
        decode_image(buf.getvalue(), max_pixels=1_000_000)


def test_card_rejects_inconsistent_crop_settings() -> None:
    with pytest.raises(ValueError, match="exactly one of crop_pixels or crop_fraction"):
        PreprocessSpec(input_size=28, crop="center")
    with pytest.raises(ValueError, match="std values must be > 0"):
        PreprocessSpec(input_size=28, std=(0.1, 0.0, 0.1))


def test_card_round_trip(tmp_path: Path) -> None:
    from medcl.card import ArchitectureSpec, DataSpec

    card = Card(name="x", version="x-1", method="s5cl", architecture=ArchitectureSpec(), class_names=["a", "b"],
                preprocess=BLOOD_SPEC, data=DataSpec(name="d", kind="npz", path="/d.npz"))
    card.save(tmp_path)
    assert Card.load(tmp_path) == card


def test_a_tiles_pixel_size_cuts_the_cards_field_of_view() -> None:
    """A 10x card (0.972 um/px, 96 px crop): a 40x tile (0.25 um/px) has its centre 373 px cut; a tile at
    the card's own size is cut as without it; a card without a pixel size ignores the tile's."""
    spec = PreprocessSpec(input_size=96, crop="center", crop_pixels=96, pixel_size_um=0.972)
    assert center_crop_box(1000, 1000, spec, 0.25) == (313, 313, 686, 686)
    assert center_crop_box(1000, 1000, spec, 0.972) == center_crop_box(1000, 1000, spec) == (452, 452, 548, 548)
    assert center_crop_box(200, 300, spec, 0.1) == (0, 50, 200, 250)  # never more than the image holds
    plain = PreprocessSpec(input_size=96, crop="center", crop_pixels=96)
    assert center_crop_box(1000, 1000, plain, 0.25) == center_crop_box(1000, 1000, plain)
    tile = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1000, 1000, 3), dtype=np.uint8))
    assert to_model_pixels(tile, spec, 0.25).shape == (96, 96, 3)
    with pytest.raises(ValueError, match="pixel_size_um needs crop 'center' with crop_pixels"):
        PreprocessSpec(input_size=96, pixel_size_um=0.5)
