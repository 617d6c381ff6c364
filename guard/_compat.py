"""Imports of optional or fragile third-party packages, in one place."""
import importlib

import torch

from .errors import MissingDependencyError


def _import_torchvision():
    # The only torchvision build that pairs with the CPU torch pin is a CUDA one;
    # its import fails registering compiled ops. Defining the two missing operator
    # schemas first makes the pure-Python transforms work (nms stays unavailable).
    # A torchvision that imports cleanly is never touched.
    try:
        import torchvision  # noqa: F401
    except RuntimeError as first_error:
        if "torchvision::nms" not in str(first_error):
            raise
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _import_torchvision.library = lib  # keep the definitions registered
        import torchvision  # noqa: F401


def import_open_clip():
    """Return the `open_clip` module, importing torchvision safely first."""
    try:
        _import_torchvision()
        return importlib.import_module("open_clip")
    except ImportError as error:
        raise MissingDependencyError(
            f"open_clip is needed for this ({error}); install it with "
            "`pip install -c constraints.txt open_clip_torch`"
        ) from error
