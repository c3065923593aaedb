"""Counting the aten operators a computation dispatches: on a GPU each one that is not a
view is a kernel launch, and a step made of many small ones is bound by the CPU that
launches them (NOTES.md section 7).

:class:`OpCounter` sees every operator below autograd (forward, backward, optimiser)
and sorts them into views (no work), kernels (device work), copies (kernels that only
move data: casts, pads, contiguous copies) and host syncs (an operator whose output
size or value the host must read back, which a CUDA graph cannot capture).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# Neither a view nor device work: allocations and dtype arithmetic.
_NO_KERNEL = {
    _aten.empty.memory_format,
    _aten.empty_strided.default,
    _aten.new_empty.default,
    _aten.new_empty_strided.default,
    _aten.empty_like.default,
    _aten.promote_types.default,
    _aten.result_type.Tensor,
    _aten.result_type.Scalar,
}
COPY_OPS = frozenset(
    {
        "aten._to_copy",
        "aten.copy_",
        "aten.clone",
        "aten.constant_pad_nd",
        "aten.cat",
        "aten.stack",
        "aten.roll",
        "aten.repeat",
        "aten.repeat_interleave",
        "aten.slice_scatter",
        "aten.select_scatter",
        "aten.index_put_",
    }
)


class OpCounter(TorchDispatchMode):
    """Counts of the aten operators run while the mode is active, by name (``aten.mul.Tensor``).

    ``kernels`` excludes views and allocations; ``copies`` are the kernels in :data:`COPY_OPS`;
    ``syncs`` names every operator that makes the host wait for the device's data
    (``.item()``, ``bool(tensor)``, ``nonzero``: output values or sizes known only on the device).
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.views = self.kernels = self.copies = 0
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.ops[name] += 1
        if func.is_view:
            self.views += 1
        elif func not in _NO_KERNEL:
            self.kernels += 1
            self.copies += name.rsplit(".", 1)[0] in COPY_OPS
        if torch.Tag.data_dependent_output in func.tags or torch.Tag.dynamic_output_shape in func.tags:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_ops(fn: Callable[[], object]) -> OpCounter:
    """The operators ``fn()`` runs, counted by an :class:`OpCounter`."""
    with OpCounter() as counter:
        fn()
    return counter
