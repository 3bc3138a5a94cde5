"""--pretrained hands the download to torchvision; only the network call itself is replaced here."""

from __future__ import annotations

import pytest
import torch
from torchvision import models as tv_models

from mlcore.model import CheckpointError, build_model


def test_download_pretrained_loads_torchvision_imagenet_weights(monkeypatch):
    reference = tv_models.resnet18(weights=None).state_dict()
    requested = []

    def fake_download(url, *args, **kwargs):  # the internet is the outside world
        requested.append(url)
        return reference

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", fake_download)
    model = build_model("resnet18", download_pretrained=True)
    assert requested and requested[0].endswith(".pth")
    assert torch.equal(model.conv1.weight, reference["conv1.weight"])
    assert model.fc.out_features == 2


def test_download_pretrained_and_a_weights_file_are_exclusive(tmp_path):
    with pytest.raises(CheckpointError, match="either"):
        build_model("resnet18", download_pretrained=True, pretrained_weights=tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="no ImageNet weights"):
        build_model("resnet_tiny", download_pretrained=True)
