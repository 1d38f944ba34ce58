"""The one device resolver."""

import pytest
import torch

from napari_nucsynth.devices import available_devices, resolve_device


def test_auto_and_explicit_devices():
    devs = available_devices()
    assert devs[0] == "auto" and devs[-1] == "cpu"
    assert resolve_device("auto").type == devs[1] if len(devs) > 2 else resolve_device("auto").type == "cpu"
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_bad_or_absent_devices_are_messages():
    with pytest.raises(ValueError, match="device"):
        resolve_device("gpu please")
    with pytest.raises(ValueError, match="device"):
        resolve_device(3)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")
