"""What a rewrite changed, read off the FX graphs of the model before and after."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import create_source, load
from .dcls import Dcls2d
from .rewrite import SurgeryError, example_input, propagate_shapes, rewrite, trace


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
    nodes_before: list[str] = field(default_factory=list)  # one line per graph node, from :func:`graph_listing`
    nodes_after: list[str] = field(default_factory=list)

    def unified(self) -> str:
        """A unified diff of the two graphs, one line per node with what it calls (see :func:`graph_listing`):
        replaced, added and removed nodes are its ``-``/``+`` lines, with three lines of context."""
        lines = difflib.unified_diff(self.nodes_before, self.nodes_after, "before", "after", lineterm="")
        return "".join(line + "\n" for line in lines)

    def as_dict(self) -> dict:
        data = asdict(self)
        del data["nodes_before"], data["nodes_after"]
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
        nodes_before=graph_listing(before, original),
        nodes_after=graph_listing(after, rewritten, groups),
    )


def diff_source(model: str | os.PathLike, trust_code: bool = False, **rewrite_args) -> GraphDiff:
    """What a rewrite changes, as ``dclsify diff`` shows it: ``model`` is a timm model
    (``timm:NAME``, or ``file:PATH.py:FACTORY``) rewritten with ``rewrite_args``, or a dclsify
    checkpoint, compared with the model its metadata names (``trust_code`` as :func:`load`'s)."""
    if Path(model).is_file():
        rewritten = load(model, trust_code=trust_code)
        original = create_source(rewritten.dclsify.source, **rewritten.dclsify.model_kwargs)
    else:
        original = create_source(str(model))
        rewritten = rewrite(original, **rewrite_args)
    return graph_diff(original, rewritten)


def _own_parameters(module: nn.Module, shares_positions: bool) -> int:
    """A module's parameters; a synchronised P/SIG counts only at the first layer of its group."""
    skip = {"P", "SIG"} if shares_positions else set()
    return sum(p.numel() for name, p in module.named_parameters() if name not in skip)


def _pair(value) -> str:
    return value if isinstance(value, str) else "x".join(str(v) for v in value)  # padding may be "same"


def describe_module(module: nn.Module, group: int | None = None) -> str:
    """A module's type and defining arguments on one line: for convolutions channels, kernel, stride,
    padding and groups (for :class:`Dcls2d` its window, count, version and ``group``, its P/SIG group)."""
    name = type(module).__name__
    if isinstance(module, Dcls2d):
        window = f"window={_pair(module.dilated_kernel_size)}, count={module.kernel_count}"
        args = f"{module.in_channels}, {module.out_channels}, {window}, stride={_pair(module.stride)}"
        args += f", padding={_pair(module.padding)}, groups={module.groups}, version={module.version}"
        args += "" if module.bias is not None else ", bias=False"
        args += "" if group is None else f", P/SIG group {group}"
        return f"{name}({args})"
    if isinstance(module, nn.Conv2d):
        args = f"{module.in_channels}, {module.out_channels}, kernel={_pair(module.kernel_size)}"
        args += f", stride={_pair(module.stride)}, padding={_pair(module.padding)}, groups={module.groups}"
        args += "" if module.dilation == (1, 1) else f", dilation={_pair(module.dilation)}"
        args += "" if module.bias is not None else ", bias=False"
        return f"{name}({args})"
    args = " ".join(module.extra_repr().split())  # one line, whatever the module's own repr
    return f"{name}({args})" if args else name


def _stable_names(graph_module: torch.fx.GraphModule) -> dict[torch.fx.Node, str]:
    # FX numbers function and method nodes model-wide (add, add_1, ...), so a stem that loses six adds
    # would renumber, and show as changed, every later one: number them within their module instead.
    names, seen = {}, {}
    for node in graph_module.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            names[node] = node.name
            continue
        scope, _ = next(reversed((node.meta.get("nn_module_stack") or {"": ("", None)}).values()))
        base = re.sub(r"_\d+$", "", node.name)
        name = f"{scope.replace('.', '_')}_{base}" if scope else base
        seen[name] = seen.get(name, -1) + 1
        names[node] = name if seen[name] == 0 else f"{name}_{seen[name]}"
    return names


def graph_listing(
    graph_module: torch.fx.GraphModule, model: nn.Module, groups: dict[str, int] | None = None
) -> list[str]:
    """One line per node of a traced ``model``: what it computes from which nodes, and for a module
    call the module (:func:`describe_module`; ``groups``: P/SIG group by module name)."""
    names = _stable_names(graph_module)

    def show(value) -> str:
        if isinstance(value, torch.fx.Node):
            return names[value]
        if isinstance(value, (tuple, list)):
            inner = ", ".join(show(v) for v in value) + ("," if isinstance(value, tuple) and len(value) == 1 else "")
            return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k!r}: {show(v)}" for k, v in value.items()) + "}"
        return repr(value)

    lines = []
    for node in graph_module.graph.nodes:
        name = names[node]
        shown = [show(a) for a in node.args] + [f"{k}={show(v)}" for k, v in node.kwargs.items()]
        if node.op == "placeholder":
            lines.append(f"{name} = <input>")
        elif node.op == "output":
            lines.append(f"return {', '.join(shown)}")
        elif node.op == "get_attr":
            lines.append(f"{name} = {node.target}")
        elif node.op == "call_method":  # x.permute(0, 2, 3, 1)
            lines.append(f"{name} = {shown[0]}.{node.target}({', '.join(shown[1:])})")
        elif node.op == "call_function":
            lines.append(f"{name} = {getattr(node.target, '__name__', node.target)}({', '.join(shown)})")
        else:
            description = describe_module(model.get_submodule(node.target), (groups or {}).get(node.target))
            lines.append(f"{name} = {node.target}({', '.join(shown)})  # {description}")
    return lines
