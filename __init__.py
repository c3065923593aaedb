"""dclsify: turn vision backbones into audio taggers with learnable-spacing convolutions."""

from .surgery.conv import large_kernel_conv2d
from .surgery.dcls import Dcls2d, LargeKernelConv2d, dcls_kernel

__version__ = "0.1.0"
__all__ = ["Dcls2d", "LargeKernelConv2d", "dcls_kernel", "large_kernel_conv2d", "__version__"]
