"""Methods of the four multi-task papers on one shared trainer (see :mod:`.base`).

>>> from mtseg_harness.methods import create_method, list_methods
>>> list_methods()                                     # doctest: +SKIP
>>> m = create_method("hog_mtl", num_classes=2)        # m.heads() -> Heads(hog=HOGHeadSpec(dim=504, ...))
"""

from .base import (Method, NoOptions, SegLoss, TrainContext, create_method, list_methods, method_class, register_method,
                   resize_logits)
from . import losses
from .baseline import Baseline
from .hog_mtl import HOGMTL
from .tdsnet import TDSNet
from .cmunet import CMUNet
from .recursive import RecursiveApprox
from .recursive_baselines import GrabCutPseudo, StrongOnly

__all__ = ["Method", "NoOptions", "SegLoss", "TrainContext", "create_method", "list_methods", "method_class",
           "register_method", "resize_logits", "losses",
           "Baseline", "HOGMTL", "TDSNet", "CMUNet", "RecursiveApprox", "GrabCutPseudo", "StrongOnly"]
