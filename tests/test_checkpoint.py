"""modiff.checkpoint: weights-only loading, strict fit checks and atomic saves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from modiff.checkpoint import CheckpointError, load_into, load_state_dict, save_state_dict


def tiny_model(channels: int = 4, features: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, channels, 3),
        nn.BatchNorm2d(channels),
        nn.Flatten(),
        nn.Linear(channels * 4, features),
    )


class Payload:
    """An arbitrary object: weights_only loading must refuse to rebuild it."""

    def __init__(self) -> None:
        self.value = 42


class RunsCode:
    """Pickles as a call to os.system that would create ``marker`` when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch '{self.marker}'",)


def test_round_trip(tmp_path: Path) -> None:
    model = tiny_model()
    path = save_state_dict(model, tmp_path / "ckpt" / "model.pt")

    state = load_state_dict(path)
    restored = load_into(tiny_model(), path)  # also accepts a path
    torch.manual_seed(1)
    other = load_into(tiny_model(), state)  # ... or a state dict

    assert list(state) == list(model.state_dict())
    for module in (restored, other):
        for key, tensor in module.state_dict().items():
            assert torch.equal(tensor, model.state_dict()[key])
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]


def test_atomic_save_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"old")
    state = {"w": torch.arange(6.0).reshape(2, 3)}

    save_state_dict(state, path)

    assert torch.equal(load_state_dict(path)["w"], state["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_failed_save_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        save_state_dict({"w": "not a tensor"}, tmp_path / "model.pt")  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_arbitrary_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "extra": Payload()}, path)

    with pytest.raises(CheckpointError, match="refused for safety") as info:
        load_state_dict(path)
    assert "evil.pt" in str(info.value) and "Payload" in str(info.value)  # the refused global


def test_pickled_code_is_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "evil": RunsCode(marker)}, path)

    with pytest.raises(CheckpointError, match="not a plain tensor checkpoint"):
        load_state_dict(path)
    with pytest.raises(CheckpointError):
        load_into(tiny_model(), path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "found"),
    [
        ([torch.zeros(1)], "list"),
        (torch.zeros(3), "Tensor"),
        ({"state_dict": {"w": torch.zeros(1)}}, "'state_dict' (dict)"),
        ({"w": torch.zeros(1), "step": 10}, "'step' (int)"),
        ({}, "empty"),
    ],
)
def test_non_state_dict_payload_is_refused(tmp_path: Path, payload: object, found: str) -> None:
    path = tmp_path / "odd.pt"
    torch.save(payload, path)

    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    assert found in str(info.value) and "odd.pt" in str(info.value)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "absent.pt")

    path = tmp_path / "truncated.pt"
    save_state_dict(tiny_model(), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_state_dict(path)


def test_mismatched_model_is_reported_in_full(tmp_path: Path) -> None:
    state = tiny_model(channels=4).state_dict()
    del state["3.bias"]  # missing
    state["extra.weight"] = torch.zeros(2)  # unexpected
    path = save_state_dict(state, tmp_path / "model.pt")
    target = tiny_model(channels=8)  # every conv/bn/linear weight changes shape
    before = {k: v.clone() for k, v in target.state_dict().items()}

    with pytest.raises(CheckpointError) as info:
        load_into(target, path)

    message = str(info.value)
    assert "missing keys (1): 3.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "0.weight: checkpoint (4, 1, 3, 3) vs model (8, 1, 3, 3)" in message
    assert "3.weight: checkpoint (3, 16) vs model (3, 32)" in message
    assert "preset or config" in message
    # Nothing was loaded: the check runs before load_state_dict.
    for key, tensor in target.state_dict().items():
        assert torch.equal(tensor, before[key])


def test_mismatch_lists_are_truncated() -> None:
    model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(15)))
    state = {f"other.{i}": torch.zeros(1) for i in range(25)}

    with pytest.raises(CheckpointError) as info:
        load_into(model, state)

    message = str(info.value)
    assert "missing keys (30)" in message and "... and 20 more" in message
    assert "unexpected keys (25)" in message and "... and 15 more" in message
    assert "other.9" in message and "other.10" not in message
