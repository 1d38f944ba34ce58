"""The one place that resolves a device name ("auto", "cuda", "cuda:N", "mps", "cpu") for every torch model.

torch is imported when a function here is called, not when the module is imported.
"""

from __future__ import annotations

__all__ = ["resolve_device", "available_devices"]


def available_devices() -> list[str]:
    """"auto" followed by the devices present here (for device dropdowns)."""
    import torch

    out = ["auto"]
    if torch.cuda.is_available():
        out.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out + ["cpu"]


def resolve_device(device="auto"):
    """Resolve ``device`` to a ``torch.device``: "auto" is cuda, then mps, then cpu; an explicit device that is not
    present is a ``ValueError`` that says what to use instead."""
    import torch

    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for CUDA, which is not available here; use 'auto' or 'cpu'")
    return dev
