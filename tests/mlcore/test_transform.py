"""The eval transform shared by training and serving: resize_for_model and to_tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mlcore.model import IMAGENET_MEAN, IMAGENET_STD
from mlcore.preprocessing import TransformSpec, resize_for_model, to_tensor

from .helpers import lesion_image, pixels

SPEC = TransformSpec(48, IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("size", [(48, 48), (96, 64), (33, 70)])
def test_to_tensor_gives_float32_of_shape_3_by_input_size(size):
    tensor = to_tensor(lesion_image(size=64).resize(size), SPEC)
    assert tensor.shape == (3, 48, 48)
    assert tensor.dtype == torch.float32
    assert tensor.is_contiguous()


def test_to_tensor_normalises_a_flat_colour_as_pixel_minus_mean_over_std():
    colour = (200, 120, 40)
    tensor = to_tensor(Image.new("RGB", (60, 50), colour), SPEC)
    for channel in range(3):
        expected = (colour[channel] / 255.0 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        assert torch.allclose(tensor[channel], torch.full((48, 48), expected), atol=1e-5)


def test_to_tensor_uses_the_spec_mean_and_std():
    spec = TransformSpec(16, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    tensor = to_tensor(Image.new("RGB", (16, 16), (255, 0, 255)), spec)
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([2.0, -1.0, 0.5]), atol=1e-6)


def test_to_tensor_converts_grayscale_input_to_three_equal_channels():
    tensor = to_tensor(Image.new("L", (20, 20), 128), TransformSpec(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    assert tensor.shape == (3, 16, 16)
    assert torch.allclose(tensor, torch.full((3, 16, 16), 128 / 255), atol=1e-6)


def _red_left_blue_right() -> Image.Image:
    image = Image.new("RGB", (200, 100), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 100, 100))
    return image


def test_non_square_image_is_squashed_so_left_and_right_halves_keep_their_sides():
    resized = pixels(resize_for_model(_red_left_blue_right(), 32))
    assert resized.shape == (32, 32, 3)
    assert (resized[:, :14] == [255, 0, 0]).all()
    assert (resized[:, 18:] == [0, 0, 255]).all()


def test_non_square_image_is_squashed_not_cropped_so_its_edges_survive():
    # Green strips on the far left and right of a wide image: a centre crop would cut both away.
    image = Image.new("RGB", (200, 100), (128, 128, 128))
    image.paste((0, 255, 0), (0, 0, 12, 100))
    image.paste((0, 255, 0), (188, 0, 200, 100))
    resized = pixels(resize_for_model(image, 50))
    assert (resized[:, 0] == [0, 255, 0]).all()
    assert (resized[:, -1] == [0, 255, 0]).all()
    assert (resized[:, 25] == [128, 128, 128]).all()


def test_tensor_of_a_squashed_image_is_red_on_the_left_and_blue_on_the_right():
    tensor = to_tensor(_red_left_blue_right(), TransformSpec(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    assert torch.all(tensor[0, :, :14] == 1.0) and torch.all(tensor[2, :, :14] == 0.0)
    assert torch.all(tensor[0, :, 18:] == 0.0) and torch.all(tensor[2, :, 18:] == 1.0)


def test_resize_for_model_leaves_an_image_of_the_right_size_untouched():
    image = lesion_image(size=32)
    resized = resize_for_model(image, 32)
    assert resized.size == (32, 32)
    assert np.array_equal(pixels(resized), pixels(image))


def test_resize_for_model_converts_rgba_to_rgb():
    resized = resize_for_model(Image.new("RGBA", (40, 20), (10, 20, 30, 255)), 16)
    assert resized.mode == "RGB"
    assert resized.size == (16, 16)
    assert (pixels(resized) == [10, 20, 30]).all()
