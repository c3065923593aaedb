"""Self-describing safetensors checkpoints: the weights plus what it takes to rebuild the model."""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import pickle
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_model
from torch import nn

from .dcls import LargeKernelConv2d
from .rewrite import RewriteConfig, SurgeryError, rewrite

FORMAT = "dclsify"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or rebuilt."""


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; it replaces ``path`` when the block
    succeeds and disappears when it fails, so ``path`` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 is not what a user expects of a saved file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _from_file(source: str, **model_kwargs) -> nn.Module:
    path, _, factory = source.removeprefix("file:").rpartition(":")
    if not path or not Path(path).is_file():
        raise SurgeryError(f"{source!r}: expected file:PATH.py:FACTORY with an existing PATH.py")
    spec = importlib.util.spec_from_file_location(f"dclsify_source_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, factory, None)):
        raise SurgeryError(f"{path} has no function {factory!r} to build the model")
    return getattr(module, factory)(**model_kwargs)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, on the CPU, unpickling nothing but tensors.

    A ``.safetensors`` file is read with safetensors; anything else (``.pth``, ``.bin``,
    ``.pt``) with ``torch.load(weights_only=True)``, which refuses a file that needs more
    than tensors and plain containers (one that would run code as it unpickles). A
    training checkpoint holding its state dict under ``"state_dict"`` or ``"model"`` works.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such weights file: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's weights-only unpickler stops, running nothing, at the first thing that is not plain data
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else "")
        if "GLOBAL" not in reason:
            raise CheckpointError(f"{path} is not a readable PyTorch weights file ({reason})") from None
        raise CheckpointError(
            f"{path} holds pickled Python objects, not only tensors, and unpickling them could run code: "
            f"refused ({reason}); if you trust it, load it yourself and save its state dict with safetensors"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        detail = " ".join(str(error).split())[:200] or type(error).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch weights file ({detail})") from None
    if isinstance(loaded, dict):
        loaded = next((loaded[k] for k in ("state_dict", "model") if isinstance(loaded.get(k), dict)), loaded)
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return loaded


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise _unreadable(path, error) from None


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    """What is wrong with a file safetensors cannot read, in words (the format: 8 bytes giving
    the JSON header's length, the header, then the tensors' bytes)."""
    if isinstance(error, OSError):
        return CheckpointError(f"cannot read {path}: {error.strerror or error}")
    size = path.stat().st_size
    with open(path, "rb") as file:
        header_length = int.from_bytes(file.read(8), "little")
        header = file.read(min(header_length, size))
    if size == 0:
        reason = "it is empty (0 bytes)"
    elif size < 8:
        reason = f"it is {size} bytes long, too short to hold a header"
    elif header_length > size - 8:
        reason = f"its header says it is {header_length:,} bytes long, but the file holds {size:,} bytes"
    else:
        try:
            json.loads(header)
            reason = f"its tensors do not fill the file as its header says: truncated or damaged ({error})"
        except ValueError:
            reason = "its header is not JSON"
    return CheckpointError(f"{path} is not a readable safetensors file: {reason}")


def create_source(source: str, pretrained: str | os.PathLike | None = None, **model_kwargs) -> nn.Module:
    """The model a source names: ``timm:NAME`` (or a bare timm name), or ``file:PATH.py:FACTORY``
    (``FACTORY(**model_kwargs)`` from a Python file).

    Nothing is downloaded: a timm model starts from random weights, or from ``pretrained``,
    a local weights file (.safetensors, .pth or .bin, as timm publishes them, read by
    :func:`read_state_dict`: tensors only).
    """
    import timm

    if source.startswith("file:"):
        if pretrained is not None:
            raise SurgeryError("pretrained= is for timm models: a file: factory loads its own weights")
        return _from_file(source, **model_kwargs)
    if Path(source).is_file():
        raise SurgeryError(
            f"{source} is a file, not a model name: use timm:NAME or file:PATH.py:FACTORY (a dclsify "
            "checkpoint is read with dclsify.load, and `dclsify diff` compares it with its source)"
        )
    name = source.removeprefix("timm:")
    if ":" in name:
        raise SurgeryError(f"unknown model source {source!r}: use timm:NAME or file:PATH.py:FACTORY")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `timm.list_models('*pattern*')` lists them"
        raise SurgeryError(f"unknown timm model {name!r}{hint}")
    if pretrained is None:
        return timm.create_model(name, pretrained=False, **model_kwargs)
    if not Path(pretrained).is_file():
        raise SurgeryError(f"no such weights file: {pretrained}")
    # timm is handed the tensors, not the file: it never unpickles anything itself
    overlay = {"state_dict": read_state_dict(pretrained)}
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **model_kwargs)
    except (RuntimeError, ValueError, KeyError) as error:
        detail = " ".join(str(error).split()) or type(error).__name__
        detail = detail if len(detail) <= 300 else detail[:300] + "..."
        raise SurgeryError(f"{pretrained} does not fit timm's {name}: {detail}") from None
    model.pretrained_cfg.pop("state_dict", None)  # timm keeps the overlay: every copy of the model would carry it
    return model


def convert(
    source: str, model_kwargs: dict | None = None, pretrained: str | os.PathLike | None = None, **rewrite_args
) -> nn.Module:
    """``rewrite(create_source(source, pretrained))``, remembering the source so that
    :func:`save` can describe it (the weights themselves travel in the checkpoint)."""
    model = rewrite(create_source(source, pretrained, **(model_kwargs or {})), **rewrite_args)
    model.dclsify.source = source if source.startswith(("timm:", "file:")) else f"timm:{source}"
    model.dclsify.model_kwargs = dict(model_kwargs or {})
    model.dclsify.pretrained = None if pretrained is None else str(pretrained)
    return model


def save(model: nn.Module, path: str | os.PathLike, class_names: list[str] | None = None) -> Path:
    """Write ``model`` (made by :func:`convert`) to a ``.safetensors`` file that :func:`load` can rebuild.

    Parameters shared between layers (synchronised ``P``/``SIG``) are stored once. The
    write goes through a temporary file: an interrupted save never leaves a partial
    file under ``path``.
    """
    import timm

    from dclsify import __version__

    report = getattr(model, "dclsify", None)
    if report is None or getattr(report, "source", None) is None:
        raise CheckpointError("save() needs a model made by dclsify.convert(), which knows its source")
    if any(isinstance(m, LargeKernelConv2d) for m in model.modules()):
        raise CheckpointError("save() takes the trainable model, not a baked one: bake() again after load()")
    metadata = {
        "format": FORMAT,
        "dclsify_version": __version__,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "source": report.source,
        "model_kwargs": json.dumps(report.model_kwargs),
        "rewrite": json.dumps(report.config.as_dict()),
        "class_names": json.dumps(class_names),
        "pretrained": json.dumps(report.pretrained),  # provenance only: load() takes the weights from here
    }
    with atomic_path(path) as temporary:
        save_model(model, str(temporary), metadata=metadata)
    return Path(path)


def read_metadata(path: str | os.PathLike) -> dict:
    """The decoded metadata of a dclsify checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint: {path}")
    try:
        with safe_open(path, framework="pt") as reader:
            raw = reader.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a dclsify checkpoint (no rebuild metadata)")
    decoded = dict(raw)
    try:
        for key in ("model_kwargs", "rewrite", "class_names", "pretrained"):
            decoded[key] = json.loads(raw[key])
    except (KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: damaged dclsify metadata ({type(error).__name__}: {error})") from None
    return decoded


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (strictly)."""
    metadata = read_metadata(path)
    try:
        config = RewriteConfig(**metadata["rewrite"])
    except TypeError as error:
        raise CheckpointError(f"{path}: rewrite arguments this dclsify does not know ({error})") from None
    arguments = config.as_dict()
    if arguments["match"] == "predicate":
        raise CheckpointError(f"{path} was rewritten with a Python predicate for match, which cannot be rebuilt")
    model = convert(metadata["source"], metadata["model_kwargs"], **arguments)
    try:
        load_model(model, path, strict=True, device=str(device))
    except (SafetensorError, RuntimeError) as error:
        raise CheckpointError(f"{path}: weights do not fit the rebuilt model ({error})") from None
    model.class_names = metadata["class_names"]
    return model.to(device)
