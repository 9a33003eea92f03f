"""Low-level operations used by the networks.

Every op has a pure-PyTorch reference that defines what it computes, and an optional fused CUDA
path with the same signature. ``impl`` picks the path per call (``"auto"``, ``"cuda"`` or
``"ref"``); ``None`` means the process-wide default, set with :func:`set_default_impl` or the
``STYLEX_OPS_IMPL`` environment variable.

Layout: each op's module holds its reference and its fused path side by side
(:mod:`~stylex.ops.upfirdn2d`, :mod:`~stylex.ops.bias_act`); :mod:`~stylex.ops.dispatch`
chooses between them and declares the one compiled extension; ``_build`` (with ``_toolkit`` and
``_lock``) builds it on first use and knows no op. Importing this package compiles nothing.
"""

from stylex.ops.bias_act import ACTIVATIONS, bias_act
from stylex.ops.dispatch import get_default_impl, set_default_impl
from stylex.ops.upfirdn2d import downsample2d, filter2d, setup_filter, upfirdn2d, upsample2d

__all__ = [
    "ACTIVATIONS",
    "bias_act",
    "downsample2d",
    "filter2d",
    "get_default_impl",
    "set_default_impl",
    "setup_filter",
    "upfirdn2d",
    "upsample2d",
]
