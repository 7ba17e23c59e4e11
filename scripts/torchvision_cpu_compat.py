"""Let the CUDA build of torchvision import next to a CPU-only torch (MONAI Label venv only).

PyPI's torchvision 0.28.0 (the only release pinned to torch 2.13.0) is a CUDA 13.0 build: its ``_C.so`` needs
``libtorch_cuda.so``, which ``torch==2.13.0+cpu`` does not ship. torchvision swallows the failed library load and
then registers fake kernels for ``torchvision::nms``/``qnms`` unconditionally, so ``import torchvision`` raises
``RuntimeError: operator torchvision::nms does not exist``. MONAI Label imports ``torchvision.utils`` (pure
Python ``make_grid``/``save_image``) at module level, so its server cannot start.

This module installs a one-shot import hook: on the first ``import torchvision`` it tries to load ``_C.so`` and,
only if that fails, declares the two operator schemas so that the import succeeds. Pure-Python torchvision works;
its C++ operators still raise torchvision's own "Couldn't load custom C++ ops" error when called. With a working
torchvision build the hook is a no-op.

``scripts/monailabel_env.sh`` copies this file into the MONAI Label venv's site-packages together with a
``torchvision_cpu_compat.pth`` line ``import torchvision_cpu_compat``. Never install it into the project's main venv.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys


class TorchvisionCpuCompat(importlib.abc.MetaPathFinder):
    """Meta-path finder that prepares torch's operator registry before torchvision is first imported."""

    library = None  # keeps the torch.library.Library holding the declared schemas alive

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)  # run once; the regular finders import the package
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not spec.submodule_search_locations:
            return None
        import torch

        extension = os.path.join(list(spec.submodule_search_locations)[0], "_C.so")
        try:
            torch.ops.load_library(extension)
        except (OSError, RuntimeError):
            library = torch.library.Library("torchvision", "DEF")
            library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            TorchvisionCpuCompat.library = library
        return None


if "torchvision" not in sys.modules and not any(isinstance(f, TorchvisionCpuCompat) for f in sys.meta_path):
    sys.meta_path.insert(0, TorchvisionCpuCompat())
