"""dclsify: turn vision backbones into audio taggers with learnable-spacing convolutions."""

from ._version import __version__
from .surgery.checkpoint import CheckpointError, convert, load, save
from .surgery.conv import large_kernel_conv2d
from .surgery.dcls import Dcls2d, LargeKernelConv2d, bake, dcls_kernel
from .surgery.diff import graph_diff
from .surgery.rewrite import SurgeryError, rewrite

__all__ = [
    "CheckpointError",
    "Dcls2d",
    "ExportError",
    "LargeKernelConv2d",
    "SurgeryError",
    "Tagger",
    "__version__",
    "bake",
    "build_model",
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


PIPELINE_NAMES = ("ExportError", "Tagger", "build_model", "export", "import_checkpoint")


def __getattr__(name: str):
    # The pipeline's names load only when asked for (PEP 562): they bring torchaudio, soundfile
    # and the rest of the audio side, which model surgery alone does not need.
    if name in ("ExportError", "export"):
        from .pipeline import export as module
    elif name == "Tagger":
        from .pipeline import predict as module
    elif name == "import_checkpoint":
        from .pipeline import importer as module
    elif name == "build_model":
        from .pipeline import train as module
    else:
        raise AttributeError(f"module 'dclsify' has no attribute {name!r}")
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *PIPELINE_NAMES})
