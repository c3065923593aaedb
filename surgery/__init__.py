"""Graph surgery and the operators it inserts."""

from .conv import ALGORITHMS, large_kernel_conv2d
from .dcls import VERSIONS, Dcls2d, LargeKernelConv2d, dcls_kernel

__all__ = ["ALGORITHMS", "VERSIONS", "Dcls2d", "LargeKernelConv2d", "dcls_kernel", "large_kernel_conv2d"]
