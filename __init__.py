"""dclsify: turn vision backbones into audio taggers with learnable-spacing convolutions."""

from .surgery.checkpoint import CheckpointError, convert, load, save
from .surgery.conv import large_kernel_conv2d
from .surgery.dcls import Dcls2d, LargeKernelConv2d, bake, dcls_kernel
from .surgery.diff import graph_diff
from .surgery.export import ExportError, export
from .surgery.rewrite import SurgeryError, rewrite

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "Dcls2d",
    "ExportError",
    "LargeKernelConv2d",
    "SurgeryError",
    "__version__",
    "bake",
    "convert",
    "dcls_kernel",
    "export",
    "graph_diff",
    "large_kernel_conv2d",
    "load",
    "rewrite",
    "save",
]
