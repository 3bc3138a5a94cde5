"""Skin tone by the individual typology angle, on crafted colours and photos (mlcore.skintone)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mlcore.data import generate_lesion
from mlcore.skintone import (
    BAND_SLUGS,
    BANDS,
    FITZPATRICK_TO_BAND,
    band_from_fitzpatrick,
    band_from_metadata_or_image,
    band_of,
    fitzpatrick_type,
    ita,
    lab_to_srgb,
    measure_skin_tone,
    skin_colour,
    srgb_to_lab,
)

# Band centres (the dark and very light bands' by a typical value), and the colour's own angle for each
CENTRES = {"very_light": 65.0, "light": 48.0, "intermediate": 34.5, "tan": 19.0, "brown": -10.0, "dark": -45.0}


def _angle_of(colour) -> float:
    lightness, _, b = srgb_to_lab(np.asarray(colour, dtype=np.uint8))
    return ita(lightness, b)


def _photo(skin, lesion=None, *, size: int = 256, radius: float = 0.3, hairs: int = 0) -> Image.Image:
    """Skin of one colour with a soft round blob of another in the middle, and optional dark hair lines."""
    yy, xx = np.mgrid[0:size, 0:size]
    pixels = np.broadcast_to(np.asarray(skin, dtype=np.float64), (size, size, 3)).copy()
    if lesion is not None:
        distance = np.hypot(yy - size / 2, xx - size / 2) / size
        alpha = 1 / (1 + np.exp((distance - radius) * size / 1.5))[..., None]
        pixels = pixels * (1 - alpha) + np.asarray(lesion, dtype=np.float64) * alpha
    image = Image.fromarray(np.round(pixels).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for index in range(hairs):
        offset = size * (index + 1) / (hairs + 1)
        draw.line([(offset - size / 3, 0), (offset + size / 3, size)], fill=(40, 28, 20), width=2)
    return image


# --- sRGB -> CIELAB ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rgb", "lab"),
    [
        ((255, 255, 255), (100.0, 0.0, 0.0)),
        ((0, 0, 0), (0.0, 0.0, 0.0)),
        ((255, 0, 0), (53.24, 80.09, 67.20)),
        ((0, 255, 0), (87.73, -86.18, 83.18)),
        ((0, 0, 255), (32.30, 79.19, -107.86)),
        ((128, 128, 128), (53.59, 0.0, 0.0)),
    ],
)
def test_srgb_to_lab_gives_the_standard_values(rgb, lab):
    assert srgb_to_lab(np.array(rgb, dtype=np.uint8)) == pytest.approx(lab, abs=0.01)
    assert srgb_to_lab(np.array(rgb, dtype=np.float64)) == pytest.approx(lab, abs=0.01)  # exact path, same values


def test_lab_to_srgb_inverts_srgb_to_lab_over_the_whole_cube():
    colours = np.random.default_rng(0).integers(0, 256, size=(500, 3)).astype(np.uint8)
    lab = srgb_to_lab(colours)
    assert lab.shape == (500, 3)
    assert np.abs(lab_to_srgb(lab) - colours).max() < 1e-6


def test_srgb_to_lab_refuses_a_shape_without_three_channels():
    with pytest.raises(ValueError, match="last axis of 3"):
        srgb_to_lab(np.zeros((4, 4), dtype=np.uint8))


# --- the angle and its bands -------------------------------------------------------------------------------------


def test_ita_is_the_formula_where_b_is_positive_and_keeps_the_sign_of_lightness_elsewhere():
    assert ita(50.0, 20.0) == 0.0
    assert ita(70.0, 20.0) == pytest.approx(45.0)
    assert ita(30.0, 20.0) == pytest.approx(-45.0)
    assert ita(65.0, 12.0) == pytest.approx(math.degrees(math.atan(15 / 12)))
    assert ita(60.0, 0.0) == pytest.approx(90.0) and ita(40.0, 0.0) == pytest.approx(-90.0)
    assert ita(70.0, -20.0) == pytest.approx(135.0)  # a light bluish colour stays positive: never "dark"
    assert ita(30.0, -20.0) == pytest.approx(-135.0)
    angles = ita(np.array([70.0, 30.0]), np.array([20.0, 20.0]))
    assert isinstance(angles, np.ndarray) and angles == pytest.approx([45.0, -45.0])


@pytest.mark.parametrize(
    ("angle", "band"),
    [
        (90.0, "very_light"),
        (55.001, "very_light"),
        (55.0, "light"),
        (41.001, "light"),
        (41.0, "intermediate"),
        (28.001, "intermediate"),
        (28.0, "tan"),
        (10.001, "tan"),
        (10.0, "brown"),
        (0.0, "brown"),
        (-29.999, "brown"),
        (-30.0, "dark"),
        (-80.0, "dark"),
    ],
)
def test_band_of_puts_each_boundary_in_the_darker_band(angle, band):
    assert band_of(angle) == band


def test_the_bands_are_the_six_standard_ones_lightest_first():
    assert BAND_SLUGS == ("very_light", "light", "intermediate", "tan", "brown", "dark")
    assert [band.above for band in BANDS[:-1]] == [55.0, 41.0, 28.0, 10.0, -30.0]
    assert all(band.label for band in BANDS)
    with pytest.raises(ValueError, match="NaN"):
        band_of(float("nan"))


@pytest.mark.parametrize(("band", "target"), CENTRES.items())
def test_skin_colour_has_the_angle_asked_for(band, target):
    colour = skin_colour(target)
    assert colour.dtype == np.uint8
    assert _angle_of(colour) == pytest.approx(target, abs=0.8)  # 8-bit rounding
    assert band_of(_angle_of(colour)) == band


def test_skin_colour_refuses_an_angle_no_skin_has():
    with pytest.raises(ValueError, match="L\\*"):
        skin_colour(85.0)
    with pytest.raises(ValueError, match="b\\*"):
        skin_colour(20.0, b=-3.0)


# --- measuring a photo ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("band", "target"), CENTRES.items())
def test_a_uniform_patch_measures_its_own_colour(band, target):
    colour = skin_colour(target)
    measured = measure_skin_tone(_photo(colour, size=128))
    assert measured is not None
    assert measured["ita"] == pytest.approx(_angle_of(colour), abs=1e-6)
    assert measured["band"] == band
    assert measured["skin_fraction"] == 1.0


def test_a_dark_lesion_on_light_skin_measures_the_skin():
    skin, lesion = skin_colour(62.0), np.array([70, 45, 30])
    assert band_of(_angle_of(lesion)) == "dark"
    photo = _photo(skin, lesion, radius=0.42)  # over half the frame
    measured = measure_skin_tone(photo)
    assert measured is not None and measured["band"] == "very_light"
    assert measured["ita"] == pytest.approx(_angle_of(skin), abs=1.5)
    assert 0.2 < measured["skin_fraction"] < 0.45  # the lesion and its rim are left out
    # the whole frame's median would have been the lesion's
    lab = srgb_to_lab(np.asarray(photo).reshape(-1, 3))
    assert abs(ita(np.median(lab[:, 0]), np.median(lab[:, 2])) - _angle_of(skin)) > 20


def test_a_light_lesion_on_dark_skin_measures_the_skin():
    skin, lesion = skin_colour(-45.0), np.array([175, 130, 105])
    assert band_of(_angle_of(lesion)) in ("tan", "intermediate")
    photo = _photo(skin, lesion, radius=0.42)
    measured = measure_skin_tone(photo)
    assert measured is not None and measured["band"] == "dark"
    assert measured["ita"] == pytest.approx(_angle_of(skin), abs=1.5)
    lab = srgb_to_lab(np.asarray(photo).reshape(-1, 3))
    assert abs(ita(np.median(lab[:, 0]), np.median(lab[:, 2])) - _angle_of(skin)) > 20


@pytest.mark.parametrize("target", [60.0, 20.0, -40.0])
def test_hair_lines_barely_move_the_tone(target):
    skin, lesion = skin_colour(target), np.array([90, 60, 40])
    clean = measure_skin_tone(_photo(skin, lesion))
    hairy = measure_skin_tone(_photo(skin, lesion, hairs=6))
    assert clean is not None and hairy is not None
    assert hairy["ita"] == pytest.approx(clean["ita"], abs=1.5)
    assert hairy["band"] == clean["band"]


@pytest.mark.parametrize("colour", [(30, 60, 200), (128, 128, 128), (250, 250, 250), (20, 160, 40)])
def test_a_photo_of_no_skin_has_no_tone(colour):
    assert measure_skin_tone(_photo(colour, (200, 40, 40), size=96)) is None


def test_arrays_and_images_of_any_size_and_mode_measure_alike():
    photo = _photo(skin_colour(30.0), (90, 60, 40), size=200)
    from_image = measure_skin_tone(photo)
    assert from_image is not None
    assert measure_skin_tone(np.asarray(photo)) == from_image
    assert measure_skin_tone(np.asarray(photo).astype(np.float32)) == from_image
    assert measure_skin_tone(photo.convert("RGBA")) == from_image
    wide = measure_skin_tone(_photo(skin_colour(30.0), (90, 60, 40), size=600).resize((900, 500)))
    assert wide is not None and wide["ita"] == pytest.approx(from_image["ita"], abs=1.0)
    with pytest.raises(ValueError, match="RGB image"):
        measure_skin_tone(np.zeros((32, 32), dtype=np.uint8))


def test_the_tone_agrees_with_the_synthetic_skin_it_was_drawn_on():
    """The generator's photos (lighting gradient, texture, hairs, blur, blotchy lesions): the band of the
    measured tone is that of the skin's true colour (its pixels outside the drawn lesion) nearly always."""
    agree, total = 0, 40
    for index in range(total):
        lesion = generate_lesion(np.random.default_rng(index), malignant=bool(index % 2), size=128)
        lab = srgb_to_lab(np.asarray(lesion.image)[~lesion.mask])
        truth = ita(np.median(lab[:, 0]), np.median(lab[:, 2]))
        measured = measure_skin_tone(lesion.image)
        assert measured is not None
        assert measured["ita"] == pytest.approx(truth, abs=3.0)
        agree += measured["band"] == band_of(truth)
    assert agree >= 0.9 * total


# --- Fitzpatrick types ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("I", 1), ("ii", 2), (" III ", 3), ("IV", 4), ("V", 5), ("VI", 6),
        ("1", 1), ("6", 6), (3, 3), (np.int64(5), 5), (4.0, 4), ("Type IV", 4), ("FST2", 2),
        (None, None), ("", None), ("unknown", None), (float("nan"), None),
    ],
)  # fmt: skip
def test_fitzpatrick_types_are_read_from_the_usual_spellings(value, expected):
    assert fitzpatrick_type(value) == expected


@pytest.mark.parametrize("value", ["VII", "0", "7", 3.5, 0, True, "brown"])
def test_an_unreadable_fitzpatrick_type_is_an_error_that_says_what_is_expected(value):
    with pytest.raises(ValueError, match="expected I–VI or 1–6"):
        fitzpatrick_type(value)


def test_each_fitzpatrick_type_maps_to_the_band_in_the_same_place_of_the_order():
    assert [FITZPATRICK_TO_BAND[t] for t in range(1, 7)] == list(BAND_SLUGS)
    assert band_from_fitzpatrick("V") == "brown" and band_from_fitzpatrick(None) is None


def test_the_metadata_type_is_preferred_to_the_measured_tone():
    measured = {"ita": 50.0, "band": "light", "skin_fraction": 0.7}
    assert band_from_metadata_or_image("VI", measured) == {"band": "dark", "source": "fitzpatrick", "ita": 50.0}
    assert band_from_metadata_or_image(None, measured) == {"band": "light", "source": "ita", "ita": 50.0}
    assert band_from_metadata_or_image("", -40.0) == {"band": "dark", "source": "ita", "ita": -40.0}
    assert band_from_metadata_or_image(2, None) == {"band": "light", "source": "fitzpatrick", "ita": None}
    assert band_from_metadata_or_image(float("nan"), None) is None
    with pytest.raises(ValueError, match="Fitzpatrick"):
        band_from_metadata_or_image("VIII", measured)
