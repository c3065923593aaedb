"""dclsify: turn vision backbones into audio taggers with learnable-spacing convolutions."""

from .surgery.checkpoint import CheckpointError, convert, load, save
from .surgery.conv import large_kernel_conv2d
from .surgery.dcls import Dcls2d, LargeKernelConv2d, bake, dcls_kernel
from .surgery.diff import graph_diff
from .surgery.export import ExportError, export
from .surgery.importer import import_checkpoint
from .surgery.rewrite import SurgeryError, rewrite

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "Dcls2d",
    "ExportError",
    "LargeKernelConv2d",
    "SurgeryError",
    "Tagger",
    "__version__",
    "bake",
    "convert",
    "dcls_kernel",
    "export",
    "graph_diff",
    "import_checkpoint",
    "large_kernel_conv2d",
    "load",
    "rewrite",
    "save",
]


def __getattr__(name: str):
    if name == "Tagger":  # the inference pipeline (torchaudio, soundfile) loads only when asked for
        from .pipeline.predict import Tagger

        return Tagger
    raise AttributeError(f"module 'dclsify' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "Tagger"})
