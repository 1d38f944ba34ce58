"""What every learned renderer promises alike (adain, sian, pix2pixhd, points2image): without a trained model the error says
how to train one, a named checkpoint that is missing is said to be missing, and importing the renderer module (as the
widgets do to list methods) does not import torch."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from _tiny import discs, flat_style

#: method -> what its "no model" error must contain
TRAIN_HINT = {
    "adain": "nucsynth train --model adain",
    "sian": "nucsynth train --model sian",
    "pix2pixhd": "nucsynth train --model pix2pixhd",
    "points2image": "nucsynth train --model points2image --images DIR",
}


@pytest.mark.parametrize("method", sorted(TRAIN_HINT))
def test_missing_checkpoint_says_how_to_train(method, monkeypatch, tmp_path):
    from napari_nucsynth.render import render

    module = importlib.import_module(f"napari_nucsynth.render.{method}")
    monkeypatch.setattr(module, "default_checkpoint", lambda: tmp_path / "none.pt")
    with pytest.raises(ValueError, match=TRAIN_HINT[method]):
        render(discs(), flat_style(), method=method)
    with pytest.raises(ValueError, match="does not exist"):
        render(discs(), flat_style(), method=method, checkpoint=tmp_path / "missing.pt")


@pytest.mark.parametrize("method", sorted(TRAIN_HINT))
def test_renderer_module_does_not_import_torch(method):
    code = ("import sys; import napari_nucsynth.render as r; r.renderers(); "
            f"import napari_nucsynth.render.{method}; sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False, capture_output=True).returncode == 0
