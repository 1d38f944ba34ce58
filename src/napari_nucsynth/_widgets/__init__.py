"""napari widgets (Qt only; the computation lives in the Qt-free modules).

Importing this package keeps triton out of the napari process: torch imports triton when torchvision loads, and
triton's bundled LLVM crashes the process (segmentation fault) once Mesa's software OpenGL (llvmpipe, used by
napari on machines without a GPU driver: virtual machines, remote desktops, Xvfb) has loaded its own LLVM.
Nothing in this plugin uses triton (no ``torch.compile``), and torch treats a missing triton as "not installed".
Widgets are imported only when opened, after the viewer (and its OpenGL) exists, so this is the last moment to do
it. Set ``NUCSYNTH_ALLOW_TRITON=1`` to leave triton importable (e.g. to ``torch.compile`` in the same process
on a machine with a real GPU driver).
"""

import os
import sys

if "triton" not in sys.modules and not os.environ.get("NUCSYNTH_ALLOW_TRITON"):
    sys.modules["triton"] = None  # `import triton` now raises ImportError; torch then runs without it
