"""build_model, CheckpointMeta and the checkpoint file format."""

from __future__ import annotations

import hashlib
import io

import pytest
import torch

from mlcore.model import (
    ARCHITECTURES,
    CHECKPOINT_FORMAT,
    CheckpointError,
    CheckpointMeta,
    build_model,
    checkpoint_bytes,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
)

from .helpers import HostilePayload, tiny_meta, tiny_model


@pytest.mark.parametrize("arch", ["resnet_tiny", "resnet18"])
def test_build_model_gives_two_outputs_per_image(arch):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    with torch.no_grad():
        logits = model(torch.randn(3, 3, 64, 64))
    assert logits.shape == (3, 2)
    assert torch.isfinite(logits).all()


def test_build_model_respects_num_classes():
    model = build_model("resnet_tiny", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 5)


def test_resnet_tiny_has_the_torchvision_resnet_layout():
    model = build_model("resnet_tiny")
    for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"):
        assert hasattr(model, name)
    assert model.fc.out_features == 2


def test_unknown_architecture_raises_checkpoint_error_naming_the_choices():
    with pytest.raises(CheckpointError) as info:
        build_model("vgg16")
    message = str(info.value)
    assert "vgg16" in message
    for arch in ARCHITECTURES:
        assert arch in message


def test_resnet_tiny_refuses_pretrained_weights(tmp_path):
    with pytest.raises(CheckpointError):
        build_model("resnet_tiny", pretrained_weights=tmp_path / "weights.pt")


def test_build_model_loads_pretrained_weights_from_a_local_file_and_replaces_the_head(tmp_path):
    torch.manual_seed(1)
    state = build_model("resnet18").state_dict()
    state = {name: tensor.clone() for name, tensor in state.items()}
    # A distinctive pattern no random initialisation would produce, and an ImageNet-shaped head.
    state["conv1.weight"] = torch.arange(state["conv1.weight"].numel(), dtype=torch.float32).reshape(
        state["conv1.weight"].shape
    )
    state["fc.weight"] = torch.randn(1000, 512)
    state["fc.bias"] = torch.randn(1000)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(state, path)

    torch.manual_seed(2)
    model = build_model("resnet18", pretrained_weights=path)

    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert torch.equal(model.layer2[0].bn1.running_var, state["layer2.0.bn1.running_var"])
    assert (model.fc.in_features, model.fc.out_features) == (512, 2)


def test_build_model_with_a_mismatched_weights_file_fails(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save(build_model("resnet_tiny").state_dict(), path)
    with pytest.raises(CheckpointError, match="not a resnet18 ImageNet state dict"):
        build_model("resnet18", pretrained_weights=path)


# --- CheckpointMeta ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [-1e-9, -0.2, 1.0 + 1e-9, 1.5])
def test_checkpoint_meta_rejects_a_threshold_outside_zero_to_one(threshold):
    with pytest.raises(CheckpointError, match="threshold"):
        tiny_meta(threshold=threshold)


def test_checkpoint_meta_accepts_thresholds_from_zero_to_one_inclusive():
    # 0 is a legitimate operating point (refer everything) when a target sensitivity demands it.
    for threshold in (0.0, 1e-6, 0.5, 1.0):
        assert tiny_meta(threshold=threshold).threshold == threshold


def test_checkpoint_meta_rejects_a_positive_class_not_among_the_class_names():
    with pytest.raises(CheckpointError, match="melanoma"):
        tiny_meta(positive_class="melanoma")


def test_checkpoint_meta_rejects_a_tiny_input_size():
    with pytest.raises(CheckpointError, match="input size"):
        tiny_meta(input_size=8)


def test_checkpoint_meta_positive_index_follows_the_class_names():
    assert tiny_meta().positive_index == 1
    assert tiny_meta(class_names=["melanoma", "naevus"], positive_class="melanoma").positive_index == 0


def test_checkpoint_meta_sums_the_malignant_classes_once_each():
    names = ("akiec", "bcc", "mel", "nv")
    meta = CheckpointMeta(arch="resnet_tiny", input_size=32, class_names=names, positive_class="mel",
                          malignant_classes=["mel", "bcc", "mel"])  # fmt: skip
    assert meta.malignant_classes == ("mel", "bcc") and meta.malignant_indices == [2, 1]
    probabilities = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 1.0, 0.0]])
    assert meta.malignant_probability(probabilities).tolist() == pytest.approx([0.5, 1.0])
    assert meta.label_for([0.1, 0.2, 0.3, 0.4]) == "nv" and not meta.binary  # the most probable diagnosis
    binary = CheckpointMeta(arch="resnet_tiny", input_size=32, threshold=0.3)
    assert binary.malignant_classes == ("malignant",) and binary.label_for([0.72, 0.28]) == "benign"
    assert binary.label_for([0.7, 0.3]) == "malignant"  # at the threshold, as before
    with pytest.raises(CheckpointError, match="not among"):
        CheckpointMeta(arch="resnet_tiny", input_size=32, class_names=names, positive_class="mel",
                       malignant_classes=["scc"])  # fmt: skip
    with pytest.raises(CheckpointError, match="benign"):
        CheckpointMeta(arch="resnet_tiny", input_size=32, malignant_classes=["benign", "malignant"])


def test_checkpoint_meta_normalises_lists_to_tuples():
    meta = tiny_meta(class_names=["benign", "malignant"], mean=[0, 0.5, 1], std=[1, 1, 1])
    assert meta.class_names == ("benign", "malignant")
    assert meta.mean == (0.0, 0.5, 1.0)
    assert all(isinstance(value, float) for value in meta.std)


# --- checkpoint round trip --------------------------------------------------------------------------------------


def _rich_meta() -> CheckpointMeta:
    return tiny_meta(
        threshold=0.3125,
        mean=(0.4, 0.5, 0.6),
        std=(0.2, 0.25, 0.3),
        metrics={"validation": {"auc": 0.875, "sensitivity": 0.9, "n": 100}},
        training={"history": [{"epoch": 1, "val_auc": 0.8}], "device": "cpu", "tags": ["a", "b"]},
    )


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(123)
    batch = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        return model(batch)


def _assert_same_checkpoint(model, meta, loaded_model, loaded_meta):
    assert not loaded_model.training
    assert torch.equal(_outputs(loaded_model), _outputs(model))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded_model.state_dict()[name], tensor), name
    assert loaded_meta == meta
    assert loaded_meta.threshold == 0.3125
    assert loaded_meta.class_names == ("benign", "malignant")
    assert loaded_meta.input_size == 32
    assert loaded_meta.mean == (0.4, 0.5, 0.6)
    assert loaded_meta.metrics == {"validation": {"auc": 0.875, "sensitivity": 0.9, "n": 100}}
    assert loaded_meta.training["history"] == [{"epoch": 1, "val_auc": 0.8}]


def test_checkpoint_bytes_round_trip_gives_identical_outputs_and_metadata():
    model, meta = tiny_model(seed=3), _rich_meta()
    loaded_model, loaded_meta = load_checkpoint(checkpoint_bytes(model, meta))
    _assert_same_checkpoint(model, meta, loaded_model, loaded_meta)


def test_checkpoint_file_round_trip_gives_identical_outputs_and_metadata(tmp_path):
    model, meta = tiny_model(seed=4), _rich_meta()
    path = tmp_path / "model.pt"
    save_checkpoint(model, meta, path)

    from_path = load_checkpoint(path)
    from_str = load_checkpoint(str(path))
    with open(path, "rb") as handle:
        from_handle = load_checkpoint(handle)

    for loaded_model, loaded_meta in (from_path, from_str, from_handle):
        _assert_same_checkpoint(model, meta, loaded_model, loaded_meta)


def test_checkpoint_of_a_torchvision_resnet18_round_trips():
    torch.manual_seed(5)
    model = build_model("resnet18").eval()
    meta = CheckpointMeta(arch="resnet18", input_size=64, threshold=0.4)
    loaded_model, loaded_meta = load_checkpoint(checkpoint_bytes(model, meta))
    batch = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded_model(batch), model(batch))
    assert loaded_meta == meta


def test_checkpoint_bytes_are_deterministic():
    model, meta = tiny_model(seed=6), _rich_meta()
    assert (
        hashlib.sha256(checkpoint_bytes(model, meta)).digest() == hashlib.sha256(checkpoint_bytes(model, meta)).digest()
    )


@pytest.mark.parametrize(
    "data",
    [b"", b"definitely not a checkpoint", bytes(range(256)) * 8, b"PK\x03\x04" + bytes(100)],
    ids=["empty", "text", "binary", "zip-header"],
)
def test_load_checkpoint_on_garbage_bytes_raises_checkpoint_error(data):
    with pytest.raises(CheckpointError):
        load_checkpoint(data)


def test_load_checkpoint_of_a_truncated_checkpoint_raises_checkpoint_error():
    data = checkpoint_bytes(tiny_model(), tiny_meta())
    with pytest.raises(CheckpointError):
        load_checkpoint(data[: len(data) // 2])


def test_load_checkpoint_of_a_plain_state_dict_raises_checkpoint_error():
    buffer = io.BytesIO()
    torch.save(tiny_model().state_dict(), buffer)
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(buffer.getvalue())


def test_load_checkpoint_of_an_unknown_format_version_raises_checkpoint_error():
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT + 1, "meta": tiny_meta().to_dict(), "state_dict": {}}, buffer)
    with pytest.raises(CheckpointError):
        load_checkpoint(buffer.getvalue())


def test_load_checkpoint_whose_weights_do_not_match_its_architecture_raises_checkpoint_error():
    buffer = io.BytesIO()
    meta = CheckpointMeta(arch="resnet18", input_size=64)
    torch.save({"format": CHECKPOINT_FORMAT, "meta": meta.to_dict(), "state_dict": tiny_model().state_dict()}, buffer)
    with pytest.raises(CheckpointError, match="architecture"):
        load_checkpoint(buffer.getvalue())


def test_load_checkpoint_with_invalid_metadata_raises_checkpoint_error():
    buffer = io.BytesIO()
    meta = tiny_meta().to_dict()
    meta["threshold"] = 1.5
    torch.save({"format": CHECKPOINT_FORMAT, "meta": meta, "state_dict": tiny_model().state_dict()}, buffer)
    with pytest.raises(CheckpointError, match="threshold"):
        load_checkpoint(buffer.getvalue())


def test_load_checkpoint_of_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


def _hostile_checkpoint(marker) -> bytes:
    """A checkpoint-shaped payload that would run a shell command if unpickled without weights_only."""
    buffer = io.BytesIO()
    payload = {
        "format": CHECKPOINT_FORMAT,
        "meta": tiny_meta().to_dict(),
        "state_dict": tiny_model().state_dict(),
        "hook": HostilePayload(marker),
    }
    torch.save(payload, buffer)
    return buffer.getvalue()


def test_the_hostile_checkpoint_really_runs_code_when_loaded_unsafely(tmp_path):
    # The control for the next test: the payload is live, so its refusal means something.
    marker = tmp_path / "unsafe-load-ran"
    torch.load(io.BytesIO(_hostile_checkpoint(marker)), weights_only=False)
    assert marker.exists()


def test_checkpoint_that_would_execute_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    data = _hostile_checkpoint(marker)
    with pytest.raises(CheckpointError):
        load_checkpoint(data)
    path = tmp_path / "hostile.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "blob.bin"
    content = bytes(range(256)) * 5000
    path.write_bytes(content)
    assert sha256_file(path, chunk_size=4096) == hashlib.sha256(content).hexdigest()
