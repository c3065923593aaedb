"""What a rewrite changed, read off the FX graphs of the model before and after."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .rewrite import SurgeryError, example_input, propagate_shapes, trace


@dataclass
class NodeChange:
    """One ``call_module`` node that was replaced, added or removed."""

    target: str
    change: str  # "replaced", "added" or "removed"
    before: str | None
    after: str | None
    kernel_before: str | None
    kernel_after: str | None
    output_shape: list[int] | None
    params_before: int
    params_after: int
    stage_group: int | None


@dataclass
class GraphDiff:
    model: str
    parameters_before: int
    parameters_after: int
    output_shape: list[int] | None
    changes: list[NodeChange] = field(default_factory=list)
    code_before: str = ""
    code_after: str = ""

    def unified(self) -> str:
        """A unified diff of the two graphs' generated code."""
        lines = difflib.unified_diff(
            self.code_before.splitlines(), self.code_after.splitlines(), "before", "after", lineterm=""
        )
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict:
        data = asdict(self)
        del data["code_before"], data["code_after"]
        return data


def count_parameters(module: nn.Module) -> int:
    """Parameters, each shared one counted once."""
    return sum(p.numel() for p in module.parameters())


def _kernel(module: nn.Module | None) -> str | None:
    size = getattr(module, "dilated_kernel_size", None) or getattr(module, "kernel_size", None)
    if size is None:
        return None
    size = (size, size) if isinstance(size, int) else size
    return "x".join(str(s) for s in size)


def _call_modules(graph_module: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    return {node.target: node for node in graph_module.graph.nodes if node.op == "call_module"}


def _try_shapes(graph_module: torch.fx.GraphModule, example: torch.Tensor) -> bool:
    try:
        propagate_shapes(graph_module, example)
    except Exception:  # noqa: BLE001 - the original vision model may not take a spectrogram
        return False
    return True


def _shape(node: torch.fx.Node | None) -> list[int] | None:
    meta = None if node is None else node.meta.get("tensor_meta")
    return list(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def graph_diff(original: nn.Module, rewritten: nn.Module) -> GraphDiff:
    """Compare a model with its rewrite (from :func:`~dclsify.surgery.rewrite.rewrite`)."""
    report = rewritten.dclsify
    try:
        before, after = trace(original), trace(rewritten)
    except Exception as error:  # noqa: BLE001 - any tracing failure: no graph to compare
        raise SurgeryError(
            f"a graph diff needs a model torch.fx can trace, and {type(original).__name__} cannot "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from None
    _try_shapes(after, example_input(rewritten, report.config))
    groups = {r.name: r.group for r in report.replaced}
    first_of_group = {next(r.name for r in report.replaced if r.group == g) for g in set(groups.values())}
    sharing = set(groups) - first_of_group
    nodes_before, nodes_after = _call_modules(before), _call_modules(after)
    changes = []
    for target in list(nodes_before) + [t for t in nodes_after if t not in nodes_before]:
        old = original.get_submodule(target) if target in nodes_before else None
        new = rewritten.get_submodule(target) if target in nodes_after else None
        if old is not None and new is not None:
            same = type(old) is type(new) and old.state_dict().keys() == new.state_dict().keys()
            if same and all(a.shape == b.shape for a, b in zip(old.parameters(), new.parameters(), strict=True)):
                continue
        changes.append(
            NodeChange(
                target=target,
                change="replaced" if old is not None and new is not None else ("removed" if new is None else "added"),
                before=None if old is None else type(old).__name__,
                after=None if new is None else type(new).__name__,
                kernel_before=_kernel(old),
                kernel_after=_kernel(new),
                output_shape=_shape(nodes_after.get(target)),
                params_before=0 if old is None else count_parameters(old),
                params_after=0 if new is None else _own_parameters(new, target in sharing),
                stage_group=groups.get(target),
            )
        )
    output = next(n for n in after.graph.nodes if n.op == "output")
    return GraphDiff(
        model=type(original).__name__,
        parameters_before=count_parameters(original),
        parameters_after=count_parameters(rewritten),
        output_shape=_shape(output.args[0]) if isinstance(output.args[0], torch.fx.Node) else None,
        changes=changes,
        code_before=before.code,
        code_after=after.code,
    )


def _own_parameters(module: nn.Module, shares_positions: bool) -> int:
    """A module's parameters; a synchronised P/SIG counts only at the first layer of its group."""
    skip = {"P", "SIG"} if shares_positions else set()
    return sum(p.numel() for name, p in module.named_parameters() if name not in skip)
