"""napari-nucsynth: turn clicked nucleus centroids into instance masks and synthetic H&E training data.

The package root imports nothing heavy: napari discovers the plugin through ``napari.yaml`` without
importing torch, Qt or the compute modules. Import the modules you need, e.g.
``from napari_nucsynth import masks, points``.
"""

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("napari-nucsynth")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
