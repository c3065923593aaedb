"""Export a trained model for inference without dclsify's DCLS layers: a dense checkpoint, ONNX or TorchScript.

Every :class:`~dclsify.surgery.dcls.Dcls2d` is baked into its fixed kernel. For ONNX and
TorchScript the baked layers become plain ``nn.Conv2d`` (what both formats carry), and
with ``with_frontend=True`` the log-mel front-end (:class:`~dclsify.pipeline.frontend.LogMel`,
torch's STFT included) goes into the exported model, which then takes waveforms. Each
export is run on random input beside the original model, and refused, leaving no file,
when their logits differ by more than ``tolerance``.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .._version import __version__
from ..surgery.checkpoint import load, save
from ..surgery.dcls import LargeKernelConv2d, bake, plain_conv2d
from ..surgery.files import atomic_path
from ..surgery.rewrite import example_input
from .frontend import LogMel

FORMATS = ("dense", "onnx", "torchscript")
TOLERANCE = 1e-4  # largest difference of logits, exported against original, that an export may show
ONNX_INSTALL = "pip install 'dclsify[onnx]'"
TORCHSCRIPT_METADATA = "dclsify.json"  # the extra file of a TorchScript export holding its metadata
_EXAMPLE_BATCH, _CHECK_BATCH = 2, 3  # traced at one batch size, checked at another: the batch axis is free


class ExportError(ValueError):
    """An export that cannot be made, or whose result does not compute what the original does."""


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export` wrote: the file, what it takes and gives, and how closely it matches the original."""

    format: str
    path: Path
    max_abs_diff: float  # largest |exported - original| over the logits of a random batch
    input_name: str  # "waveform" (with the front-end) or "log_mel"
    input_shape: tuple[str | int, ...]  # "batch" is free
    input_description: str
    output_shape: tuple[str | int, ...]  # logits: a sigmoid (multi-label) or a softmax gives scores
    opset: int | None = None  # ONNX only


class WaveformModel(nn.Module):
    """The log-mel front-end and a model as one: (batch, samples) float waveforms in [-1, 1] -> logits."""

    def __init__(self, model: nn.Module, audio) -> None:
        super().__init__()
        self.frontend = LogMel(audio)
        self.model = model

    def forward(self, waveforms: Tensor) -> Tensor:
        return self.model(self.frontend(waveforms))


def plain_convolutions(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``Dcls2d`` baked and every baked layer a plain ``nn.Conv2d``
    computing directly: the same outputs from operators that ONNX and TorchScript know."""
    model = bake(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, LargeKernelConv2d):
            conv = plain_conv2d(module, device=module.weight.device, dtype=module.weight.dtype)
            conv.load_state_dict(module.state_dict())
            model.set_submodule(name, conv.train(module.training))
    return model


def require_onnx() -> None:
    """Raise an :class:`ExportError` saying what to install where the ONNX extra is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  torch's ONNX exporter needs it
    except ImportError as error:
        raise ExportError(f"ONNX export needs {error.name or 'onnx'} (not installed): {ONNX_INSTALL}") from None


def export(
    checkpoint: str | os.PathLike | nn.Module,
    path: str | os.PathLike,
    format: str = "dense",
    with_frontend: bool = False,
    trust_code: bool = False,
    tolerance: float = TOLERANCE,
) -> ExportReport:
    """Write a dclsify model (a checkpoint, or a model from :func:`~dclsify.load` / :func:`~dclsify.convert`)
    with its ``Dcls2d`` layers baked into fixed kernels, and check it against the original.

    Formats:

    ``dense``
        a dclsify checkpoint of the baked model (:func:`~dclsify.save`), with the class
        names, front-end settings and score type; :func:`~dclsify.load`, ``Tagger`` and
        ``dclsify predict`` read it as any checkpoint. It holds no positions or spreads.
    ``onnx``
        torch's ONNX exporter (``torch.onnx.export(dynamo=True)``; needs ``dclsify[onnx]``),
        checked with onnxruntime. Class names, front-end settings and the rest are in the
        model's ``metadata_props``.
    ``torchscript``
        ``torch.jit.trace``, checked after ``torch.jit.load``; the same metadata is the
        extra file ``dclsify.json`` (``torch.jit.load(path, _extra_files={"dclsify.json": ""})``).

    The exported model gives logits, for any batch size. It takes ``(batch, in_chans, mels,
    frames)`` normalised log-mels, or with ``with_frontend`` (ONNX and TorchScript, for a
    checkpoint that records its front-end settings) ``(batch, samples)`` float32 waveforms in
    [-1, 1] (int16 / 32768) at the checkpoint's sample rate and clip length.

    The original model (eval mode, float32, on the CPU) and the export are run on the same
    random batch; when their logits differ by more than ``tolerance`` an :class:`ExportError`
    is raised and nothing is written, as when anything else fails.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}: use {', '.join(FORMATS)}")
    if Path(path).is_dir():
        raise ExportError(f"{path} is a folder: name the file to write")
    if format == "onnx":
        require_onnx()
    if with_frontend and format == "dense":
        raise ExportError(
            "the front-end (--with-frontend) goes into onnx and torchscript exports: a dense checkpoint keeps "
            "its front-end settings, and dclsify (Tagger, dclsify predict) runs the front-end"
        )
    if isinstance(checkpoint, nn.Module):
        model, named = copy.deepcopy(checkpoint).cpu().float(), "the model"
    else:
        model, named = load(checkpoint, trust_code=trust_code), str(checkpoint)
    model.eval()
    if getattr(model, "dclsify", None) is None:
        raise ExportError(f"{named} was not made by dclsify (convert, load): it has no input size or settings")
    class_names, audio, multi_label = (getattr(model, key, None) for key in ("class_names", "audio", "multi_label"))
    if with_frontend and audio is None:
        raise ExportError(
            f"{named} records no front-end settings (an untrained checkpoint): the front-end (--with-frontend) "
            "needs them; export without it (the model then takes log-mels)"
        )
    reference = WaveformModel(model, audio).eval() if with_frontend else model
    name, shape, described = _input(model, audio, with_frontend)
    generator = torch.Generator().manual_seed(0)
    example, check = (
        torch.rand(batch, *shape, generator=generator) * 2 - 1  # waveforms in [-1, 1]
        if with_frontend
        else torch.randn(batch, *shape, generator=generator)  # log-mels, normalised to mean 0 and std 1
        for batch in (_EXAMPLE_BATCH, _CHECK_BATCH)
    )
    metadata = {
        "dclsify_version": __version__,
        "source": model.dclsify.source or "",
        "class_names": json.dumps(class_names),
        "multi_label": json.dumps(multi_label),
        "audio": "null" if audio is None else audio.to_json(),
        "input": f"{name} (batch, {', '.join(map(str, shape))}): {described}",
        "output": "logits (batch, classes): a sigmoid gives multi-label scores, a softmax single-label ones",
    }
    with torch.no_grad():
        expected = reference(check)
    opset = None
    path = Path(path)
    with atomic_path(path) as temporary:
        if format == "dense":
            save(bake(model), temporary, class_names, audio, multi_label)
            with torch.no_grad():
                actual = load(temporary, trust_code=trust_code).eval()(check)
        else:
            exported = plain_convolutions(reference).eval()
            writer = _write_onnx if format == "onnx" else _write_torchscript
            actual, opset = writer(exported, example, check, name, metadata, temporary)
        difference = (actual - expected).abs().max().item()
        if not difference <= tolerance:  # a NaN fails too
            raise ExportError(
                f"the exported model's logits differ from the original's by up to {difference:.3g}, "
                f"more than {tolerance:g}: nothing written"
            )
    return ExportReport(
        format, path, difference, name, ("batch", *shape), described, ("batch", expected.shape[-1]), opset
    )


def _input(model: nn.Module, audio, with_frontend: bool) -> tuple[str, tuple[int, ...], str]:
    """The exported model's input: its name, shape without the batch axis, and what it is."""
    if with_frontend:
        described = (
            f"float32 mono waveforms of {audio.seconds:g} s at {audio.sample_rate} Hz in [-1, 1] (int16 / 32768)"
        )
        return "waveform", (audio.samples,), described
    channels = example_input(model, model.dclsify.config).shape[1]
    size = model.dclsify.config.input_size if audio is None else audio.input_size
    return "log_mel", (channels, *size), "normalised log-mels (dclsify's LogMel)"


@contextmanager
def _quiet():
    """Silence what torch says about its own exporters while they run (TorchScript's deprecation,
    pytree's): a user who asked for the format has nothing to do about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=FutureWarning)
        yield


def _failed(tool: str, error: Exception) -> ExportError:
    detail = " ".join(str(error).split())
    detail = detail if len(detail) <= 300 else detail[:300] + "..."
    return ExportError(f"{tool} failed on the exported model ({type(error).__name__}: {detail})")


def _write_onnx(module, example, check, name, metadata, path) -> tuple[Tensor, int]:
    import onnxruntime

    # The dynamo exporter: the TorchScript-based one cannot export torch.stft's complex output.
    with _quiet():
        try:
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                input_names=[name],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
        except Exception as error:  # noqa: BLE001 - torch's own error, about a model it cannot export
            raise _failed("torch.onnx.export", error) from None
    program.model.metadata_props.update(metadata)
    program.save(path)
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {name: check.numpy()})
    except Exception as error:  # noqa: BLE001 - onnxruntime's own error, about the model torch wrote
        raise _failed("onnxruntime", error) from None
    return torch.from_numpy(logits), program.model.opset_imports[""]


def _write_torchscript(module, example, check, name, metadata, path) -> tuple[Tensor, None]:
    with _quiet(), torch.no_grad():
        try:
            traced = torch.jit.trace(module, (example,), check_trace=False)  # export() checks it
        except Exception as error:  # noqa: BLE001 - torch's own error, about a model it cannot trace
            raise _failed("torch.jit.trace", error) from None
        torch.jit.save(traced, path, _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)})
        try:
            return torch.jit.load(path)(check), None
        except Exception as error:  # noqa: BLE001 - torch's own error, about the model it traced
            raise _failed("torch.jit.load", error) from None
