"""Files, safely: weights read tensors-only (nothing unpickled runs), and every file written through a
temporary file, so that an interrupted write never leaves a half-written one."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or rebuilt."""


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; it replaces ``path`` when the block
    succeeds and disappears when it fails, so ``path`` is never half-written."""
    path = Path(path)
    existing = next(folder for folder in (path.parent, *path.parent.parents) if folder.exists())
    if not existing.is_dir():  # mkdir would say "File exists"
        raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file, not a folder", str(path))
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
        return read_safetensors(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's weights-only unpickler stops, running nothing, at the first thing that is not plain data
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else "")
        found = re.search(r"GLOBAL ([\w.]+)", reason)
        if found is None:
            raise CheckpointError(f"{path} is not a readable PyTorch weights file ({reason[:200]})") from None
        raise CheckpointError(
            f"{path} holds pickled Python objects, not only tensors, and unpickling them could run code: "
            f"refused (the first: {found.group(1)}); if you trust the file, load it yourself and save its "
            "state dict with safetensors"
        ) from None
    except OSError as error:  # the file could not be read at all (permissions, a device error)
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    except Exception as error:  # noqa: BLE001 - what torch's unpickler raises on damaged bytes (even a KeyError)
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path} is empty (0 bytes): not a PyTorch weights file") from None
        # torch's first sentence says what failed; the rest is advice about its own format
        detail = " ".join(str(error).split()).split(". ")[0][:200]
        if not (isinstance(error, RuntimeError) and detail):  # a bare EOFError or KeyError: name it
            detail = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
        raise CheckpointError(
            f"{path} is not a readable PyTorch weights file, truncated or damaged? ({detail})"
        ) from None
    if isinstance(loaded, dict):
        loaded = next((loaded[k] for k in ("state_dict", "model") if isinstance(loaded.get(k), dict)), loaded)
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return loaded


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise unreadable(path, error) from None


TORCH_PICKLES = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))  # a pickle's first two bytes


def unreadable(path: Path, error: Exception) -> CheckpointError:
    """What is wrong with a file safetensors cannot read, in words (the format: 8 bytes giving
    the JSON header's length, the header, then the tensors' bytes)."""
    if isinstance(error, OSError):
        return CheckpointError(f"cannot read {path}: {error.strerror or error}")
    size = path.stat().st_size
    with open(path, "rb") as file:
        start = file.read(8)
        header_length = int.from_bytes(start, "little")
        header = file.read(min(header_length, size))
    if size == 0:
        reason = "it is empty (0 bytes)"
    elif start[:4] == b"PK\x03\x04" or start[:2] in TORCH_PICKLES:
        # a zip archive or a pickle: what torch.save writes
        renamed = "once renamed .pth, " if path.suffix == ".safetensors" else ""
        reason = f"it is a PyTorch (torch.save) file; {renamed}`dclsify import` makes a dclsify checkpoint of it"
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
