"""The layouts of the paper's six released checkpoints (tests/data/dcls_audio/*.keys.tsv: every
key, shape, dtype and shared tensor of the DCLS-Audio state dicts), for the import tests."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

LAYOUTS = Path(__file__).parent / "data" / "dcls_audio"


@dataclass(frozen=True)
class Entry:
    key: str
    shape: tuple[int, ...]
    dtype: str
    same_as: str | None  # the key whose tensor this one is (shared P/SIG)


def layout(name: str) -> tuple[int, list[Entry]]:
    """The parameter count (shared tensors once) on the file's first line, and its entries."""
    lines = (LAYOUTS / f"{name}.keys.tsv").read_text().splitlines()
    parameters = int(re.search(r"entries, (\d+) parameters", lines[0]).group(1))
    entries = []
    for line in lines[2:]:
        key, shape, dtype, *shared = line.split("\t")
        same_as = shared[0].removeprefix("same tensor as ") if shared else None
        entries.append(Entry(key, tuple(int(v) for v in re.findall(r"\d+", shape)), dtype, same_as))
    return parameters, entries


def check_layout(state_dict: dict[str, torch.Tensor], name: str) -> None:
    """Assert that ``state_dict`` has exactly the released file's keys, in order, shapes,
    dtypes and sharing, and its parameter count."""
    parameters, entries = layout(name)
    assert list(state_dict) == [e.key for e in entries]
    for e in entries:
        tensor = state_dict[e.key]
        assert (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")) == (e.shape, e.dtype), e.key
        if e.same_as is not None:
            assert tensor.data_ptr() == state_dict[e.same_as].data_ptr(), f"{e.key} should share {e.same_as}"
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    distinct = {t.data_ptr(): t for k, t in state_dict.items() if not k.endswith(buffers)}
    assert sum(t.numel() for t in distinct.values()) == parameters


def random_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in the released file's layout (shared ones shared), for checks of keys
    and shapes only (a model's own state dict is what parity tests need)."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for e in layout(name)[1]:
        if e.same_as is not None:
            state_dict[e.key] = state_dict[e.same_as]
        elif e.dtype == "int64":
            state_dict[e.key] = torch.zeros(e.shape, dtype=torch.int64)
        else:
            state_dict[e.key] = torch.randn(e.shape, generator=generator) * 0.1
    return state_dict


def check_exports(model, reference, directory) -> None:
    """Import -> export (dense, and ONNX where onnxruntime is installed) -> the logits of the
    reference implementation of the authors' model, within 1e-4, on a whole 10-s log-mel."""
    import dclsify

    x = torch.randn(1, 1, 128, 1001, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = reference(x)
    dclsify.export(model, directory / "dense.safetensors", "dense")
    dense = dclsify.load(directory / "dense.safetensors").eval()
    assert not any(isinstance(m, dclsify.Dcls2d) for m in dense.modules())
    with torch.no_grad():
        assert (dense(x) - expected).abs().max() <= 1e-4
    import pytest

    onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX export needs dclsify[onnx]")
    dclsify.export(model, directory / "model.onnx", "onnx")
    session = onnxruntime.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"log_mel": x.numpy()})
    assert abs(torch.from_numpy(logits) - expected).max() <= 1e-4
