"""FX model surgery: depthwise convs to stage-synchronised Dcls2d, an audio stem, a new head.

:func:`rewrite` traces the model with :class:`SurgeryTracer` (timm's leaf modules and
wrapped functions), propagates the shape of a spectrogram through the graph, matches
depthwise convolutions (``call_module`` nodes), groups them by stage and swaps the
modules in place of the originals: the result is the same timm class, with timm's
module names (and state-dict keys) for everything that was not replaced.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import timm
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .. import backbones
from .dcls import VERSIONS, Dcls2d, LargeKernelConv2d

SYNC_MODES = ("stage", "none", "model")
AUDIO_STEM = ((2, 16), (2, 16))  # (kernel, stride): (1, 128, 1001) -> (C0, 64, 62)
WEIGHT_INIT_STD = 0.02  # DCLS-Audio's new Dcls2d weights (normal), audio stem and head (truncated normal)


class SurgeryError(ValueError):
    """A rewrite that cannot be done, with what to do instead."""


@dataclass
class RewriteConfig:
    """Every argument of a rewrite: enough to redo it on a fresh copy of the source model."""

    kernel: int = 23
    count: int = 26
    version: str = "gauss"
    match: int | list[int] | str = 7
    sync: str = "stage"
    stem: list[list[int]] | None = field(default_factory=lambda: [list(k) for k in AUDIO_STEM])
    in_chans: int = 1
    num_classes: int | None = None
    input_size: tuple[int, int] = (128, 1001)
    dcls: bool = True
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, arguments: dict) -> RewriteConfig:
        """The config that :meth:`as_dict` gave (read back from a checkpoint, say), checked as
        :func:`rewrite` checks its arguments: every field, of its type, in its range, and no other."""
        names = [f.name for f in fields(cls)]
        if not isinstance(arguments, dict):
            raise SurgeryError(f"rewrite arguments must be a mapping, got {type(arguments).__name__}")
        unknown = [key for key in arguments if key not in names]
        missing = [name for name in names if name not in arguments]
        if unknown or missing:
            what = f"unknown rewrite arguments {unknown}" if unknown else f"missing rewrite arguments {missing}"
            raise SurgeryError(what)
        match, stem, num_classes, input_size = (arguments[k] for k in ("match", "stem", "num_classes", "input_size"))
        if match == "predicate":
            raise SurgeryError("match was a Python predicate, which cannot be rebuilt")
        sizes = isinstance(match, list) and match and all(map(_is_int, match))
        if not (_is_int(match) or isinstance(match, str) or sizes):
            raise SurgeryError(f"match must be a kernel size, a list of sizes or '>=N', got {match!r}")
        _kernel_matcher(match)
        pairs = isinstance(stem, list) and len(stem) == 2 and all(isinstance(p, list) and len(p) == 2 for p in stem)
        if stem is not None and not (pairs and all(_is_int(v) and v >= 1 for p in stem for v in p)):
            raise SurgeryError(f"stem must be None or [[kh, kw], [sh, sw]] of positive ints, got {stem!r}")
        if num_classes is not None and not (_is_int(num_classes) and num_classes >= 0):
            raise SurgeryError(f"num_classes must be None or an int >= 0, got {num_classes!r}")
        if not isinstance(arguments["dcls"], bool) or not _is_int(arguments["seed"]):
            raise SurgeryError(f"dcls must be a bool and seed an int, got {arguments['dcls']!r}, {arguments['seed']!r}")
        if not isinstance(input_size, (list, tuple)):
            raise SurgeryError(f"input_size must be (mels, frames), two positive ints, got {input_size!r}")
        _check_arguments(*(arguments[k] for k in ("kernel", "count", "version", "sync", "in_chans")), tuple(input_size))
        return cls(**{**arguments, "input_size": tuple(input_size)})


@dataclass
class Replacement:
    """One replaced depthwise conv."""

    name: str
    channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    input_shape: tuple[int, ...] | None
    group: int


@dataclass
class RewriteReport:
    """What :func:`rewrite` did, attached to the model as ``model.dclsify``."""

    config: RewriteConfig
    family: str | None
    stem: str | None = None
    replaced: list[Replacement] = field(default_factory=list)
    functional_convs: list[str] = field(default_factory=list)
    traced: bool = True
    parameters_before: int = 0  # each shared parameter counted once
    source: str | None = None  # set by convert(): what save() records to rebuild the model
    model_kwargs: dict = field(default_factory=dict)
    pretrained: str | None = None  # the local weights file the source started from, if any


class SurgeryTracer(torch.fx.Tracer):
    """An FX tracer that keeps timm's untraceable modules and functions (and ours) whole."""

    def __init__(self) -> None:
        from timm.layers import _fx

        _fx.register_notrace_module(Dcls2d)  # so that timm's own FX feature extraction keeps it whole
        super().__init__(autowrap_functions=tuple(_fx.get_notrace_functions()))
        self.leaf_types = (Dcls2d, LargeKernelConv2d, *_fx.get_notrace_modules())

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, self.leaf_types) or super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` with :class:`SurgeryTracer`."""
    graph = SurgeryTracer().trace(model)
    return torch.fx.GraphModule(model, graph, type(model).__name__)


def propagate_shapes(graph_module: torch.fx.GraphModule, example: torch.Tensor) -> None:
    """Run ``example`` through the graph in eval mode, recording every node's output shape."""
    training = graph_module.training
    graph_module.eval()
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(example)
    finally:
        graph_module.train(training)


def _kernel_matcher(match) -> Callable[[str, nn.Conv2d], bool]:
    """``match``: a kernel size, a list of sizes, '>=N' (at least N on both sides) or a predicate."""
    if callable(match):
        return match
    if isinstance(match, str):
        found = re.fullmatch(r">=\s*(\d+)", match.strip())
        if not found:
            raise SurgeryError(f"match must be a kernel size, a list of sizes or '>=N', got {match!r}")
        least = int(found.group(1))
        return lambda name, conv: min(conv.kernel_size) >= least
    sizes = {match} if isinstance(match, int) else set(match)
    return lambda name, conv: conv.kernel_size[0] == conv.kernel_size[1] and conv.kernel_size[0] in sizes


def is_depthwise(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.groups == module.in_channels == module.out_channels
        and module.groups > 1
        and module.dilation == (1, 1)
    )


def depthwise_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if is_depthwise(m)}


def survey_families(progress: Callable[[str], None] | None = None) -> list[tuple[backbones.Family, dict[str, int]]]:
    """Each family known to work, with the depthwise convolutions of its first example model
    counted by kernel size (``{"3x3": 1, "7x7": 18}``): what ``dclsify models`` lists.
    ``progress`` is called with each model's name before it is built."""
    surveyed = []
    for family in backbones.FAMILIES.values():
        if progress is not None:
            progress(family.examples[0])
        sizes: dict[str, int] = {}
        for conv in depthwise_convs(timm.create_model(family.examples[0], pretrained=False)).values():
            key = "x".join(map(str, conv.kernel_size))
            sizes[key] = sizes.get(key, 0) + 1
        surveyed.append((family, dict(sorted(sizes.items()))))
    return surveyed


def init_new_layer(module: nn.Module) -> nn.Module:
    """A new stem conv or head layer initialised as DCLS-Audio's (and timm's constructors'): weight
    from a normal of std 0.02 truncated at +-2, bias 0. PyTorch's own default (Kaiming uniform)
    would start the audio stem 5x wider than the paper's."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        with torch.no_grad():
            nn.init.trunc_normal_(module.weight, std=WEIGHT_INIT_STD)
            if module.bias is not None:
                module.bias.zero_()
    return module


def reset_head(model: nn.Module, num_classes: int) -> None:
    """``model.reset_classifier(num_classes)``, every layer it makes initialised by :func:`init_new_layer`."""
    before = set(model.modules())  # the modules themselves, not their ids, which new ones may reuse
    model.reset_classifier(num_classes)
    for module in model.modules():
        if module not in before:
            init_new_layer(module)


def stem_geometry(stem) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(kernel, stride) of the audio stem that :func:`rewrite`'s ``stem`` argument names; None: keep the model's."""
    if stem is None:
        return None
    if stem == "audio":
        return AUDIO_STEM
    if isinstance(stem, str):  # "2x16" or "2x16/2x16" (kernel/stride)
        parts = stem.lower().split("/")
        try:
            pairs = [tuple(int(v) for v in p.split("x")) for p in parts]
        except ValueError:
            pairs = []
        if len(parts) not in (1, 2) or len(pairs) != len(parts) or any(len(p) != 2 or min(p) < 1 for p in pairs):
            raise SurgeryError(f"stem must be 'audio', None, 'KHxKW' or 'KHxKW/SHxSW', got {stem!r}")
        return pairs[0], pairs[-1]
    kernel, stride = (stem, stem) if isinstance(stem[0], int) else stem
    return tuple(kernel), tuple(stride)


def _find_stem_conv(model: nn.Module) -> str:
    """For an unregistered model: the first Conv2d, which is almost always the patch embedding."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name
    raise SurgeryError("no Conv2d in this model to turn into an audio stem: pass stem=None")


def _rewrite_stem(model, family, geometry, in_chans: int) -> str:
    reference = next(model.parameters())
    kernel, stride = geometry
    paper_stem = (tuple(kernel), tuple(stride)) == tuple(tuple(pair) for pair in AUDIO_STEM)

    def conv_factory(out_channels: int, bias: bool) -> nn.Conv2d:
        bias = bias if family is None or family.stem_bias is None else family.stem_bias
        # built on the CPU, so that the seed gives the same weights on every device
        conv = nn.Conv2d(in_chans, out_channels, kernel, stride, bias=bias)
        if paper_stem:  # the authors' init for the authors' stem; with it a 4x4 stem on small
            init_new_layer(conv)  # maps failed to learn in our short tests (PyTorch's default kept there)
        return conv.to(device=reference.device, dtype=reference.dtype)

    if family is not None:
        return family.replace_stem(model, conv_factory)
    name = _find_stem_conv(model)
    warnings.warn(
        f"{type(model).__name__} is not a registered family: replacing its first conv {name!r} as the stem",
        stacklevel=3,
    )
    old = model.get_submodule(name)
    model.set_submodule(name, conv_factory(old.out_channels, old.bias is not None))
    return name


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_arguments(kernel, count, version, sync, in_chans, input_size) -> None:
    if not isinstance(kernel, int) or kernel < 1:
        raise SurgeryError(f"kernel must be a positive int, got {kernel!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise SurgeryError(f"in_chans must be a positive int, got {in_chans!r}")
    if len(input_size) != 2 or not all(isinstance(v, int) and v >= 1 for v in input_size):
        raise SurgeryError(f"input_size must be (mels, frames), two positive ints, got {input_size!r}")
    if not isinstance(count, int) or not 1 <= count <= kernel * kernel:
        raise SurgeryError(f"count must be from 1 to kernel^2 = {kernel * kernel}, got {count!r}")
    if version not in VERSIONS:
        raise SurgeryError(f"version must be one of {VERSIONS}, got {version!r}")
    if sync not in SYNC_MODES:
        raise SurgeryError(f"sync must be one of {SYNC_MODES}, got {sync!r}")


def _input_shapes(model: nn.Module, names: set[str], example: torch.Tensor) -> tuple[dict, list[str], bool]:
    """Input shape of each named module, and the functional convs, from an FX trace; when the
    model cannot be traced, from forward hooks, with a warning."""
    try:
        graph_module = trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure means: fall back
        warnings.warn(
            f"torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "matching modules by walking the module tree instead",
            stacklevel=3,
        )
        return _hooked_input_shapes(model, names, example), [], False
    try:
        propagate_shapes(graph_module, example)
    except Exception as error:  # noqa: BLE001 - the model's own error, about our example input
        raise _example_error(model, example, error) from None
    shapes, functional = {}, []
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and node.target in names:
            shapes[node.target] = tuple(node.args[0].meta["tensor_meta"].shape)
        elif node.op == "call_function" and node.target in (F.conv2d, torch.conv2d):
            functional.append(node.name)
    hidden = names - shapes.keys()  # inside leaf modules: not graph nodes of their own
    if hidden:
        shapes |= _hooked_input_shapes(model, hidden, example)
    return shapes, functional, True


def _hooked_input_shapes(model: nn.Module, names: set[str], example: torch.Tensor) -> dict:
    shapes = {}

    def record(name: str):
        def hook(module, args) -> None:
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in names]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception as error:  # noqa: BLE001 - the model's own error, about our example input
        raise _example_error(model, example, error) from None
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return shapes


def _example_error(model: nn.Module, example: torch.Tensor, error: Exception) -> SurgeryError:
    detail = " ".join(str(error).split())[:300]
    return SurgeryError(
        f"a {tuple(example.shape[1:])} input does not go through the rewritten {type(model).__name__} "
        f"({type(error).__name__}: {detail}): check stem, in_chans and input_size"
    )


def example_input(model: nn.Module, config: RewriteConfig) -> torch.Tensor:
    """A zero spectrogram batch of one, with the channels the model's first conv takes."""
    reference = next(model.parameters())
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = config.in_chans if config.stem is not None or first_conv is None else first_conv.in_channels
    return torch.zeros(1, channels, *config.input_size, device=reference.device, dtype=reference.dtype)


def _group_key(sync: str, name: str, conv: nn.Conv2d, shape) -> tuple:
    if sync == "none":
        return (name,)
    if sync == "model":
        return (conv.in_channels,)
    return (conv.in_channels, *(shape[-2:] if shape is not None else ()))


def _make_dcls(conv: nn.Conv2d, config: RewriteConfig) -> Dcls2d:
    # Keep the output size whatever the old padding: grow it by half the kernel growth.
    old_padding = conv.padding
    if isinstance(old_padding, str):  # "same" (odd kernels) or "valid"
        old_padding = tuple(k // 2 for k in conv.kernel_size) if old_padding == "same" else (0, 0)
    padding = tuple(p + (config.kernel - k) // 2 for p, k in zip(old_padding, conv.kernel_size, strict=True))
    layer = Dcls2d(
        conv.in_channels,
        conv.out_channels,
        config.count,
        stride=conv.stride,
        padding=padding,
        dilated_kernel_size=config.kernel,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        version=config.version,
    )
    with torch.no_grad():  # the paper's: positions and sigmas as the reference, weights N(0, 0.02), no bias
        layer.weight.normal_(0.0, WEIGHT_INIT_STD)
        if layer.bias is not None:
            layer.bias.zero_()
    return layer.to(device=conv.weight.device, dtype=conv.weight.dtype)


def rewrite(
    model: nn.Module,
    kernel: int = 23,
    count: int = 26,
    version: str = "gauss",
    match=7,
    sync: str = "stage",
    stem="audio",
    in_chans: int = 1,
    num_classes: int | None = None,
    input_size: tuple[int, int] = (128, 1001),
    dcls: bool = True,
    seed: int = 0,
) -> nn.Module:
    """Turn a vision backbone into a DCLS audio tagger; the input model is left untouched.

    Args:
        model: a timm model (any ``nn.Module`` that torch.fx can trace works; others
            fall back to walking the module tree, with a warning).
        kernel, count, version: the Dcls2d window size, elements per channel and
            ``"gauss"``/``"v1"``.
        match: which depthwise convs to replace: a kernel size (default 7), a list of
            sizes, ``">=N"``, or a predicate ``(name, conv) -> bool``.
        sync: ``"stage"`` (layers with the same channels and feature-map size share one
            ``P`` and one ``SIG``), ``"model"`` (same channels share), ``"none"``.
        stem: ``"audio"`` (a (2, 16)/(2, 16) conv: (1, 128, 1001) -> (C0, 64, 62)), a
            kernel ``(kh, kw)`` or ``((kh, kw), (sh, sw))`` or ``"KHxKW[/SHxSW]"``, or
            None to keep the original stem.
        in_chans: input channels of the new stem (1 for a spectrogram).
        num_classes: reset the classifier to this many classes (527 for AudioSet); new stem and
            head layers start as DCLS-Audio's (:func:`init_new_layer`).
        input_size: spectrogram (mels, frames) used to find stages by shape.
        dcls: False applies only the stem and head changes (the DSC baseline).
        seed: seeds the new layers' initialisation.

    Returns:
        A rewritten deep copy, of the same class, with ``model.dclsify`` (a
        :class:`RewriteReport`) saying what changed.
    """
    if hasattr(model, "dclsify"):
        raise SurgeryError("this model has been rewritten already: rewrite the original model instead")
    _check_arguments(kernel, count, version, sync, in_chans, tuple(input_size))
    geometry = stem_geometry(stem)
    matcher = _kernel_matcher(match)
    config = RewriteConfig(
        kernel=kernel,
        count=count,
        version=version,
        match="predicate" if callable(match) else match if isinstance(match, (int, str)) else list(match),
        sync=sync,
        stem=None if geometry is None else [list(geometry[0]), list(geometry[1])],
        in_chans=in_chans,
        num_classes=num_classes,
        input_size=tuple(input_size),
        dcls=dcls,
        seed=seed,
    )
    family = backbones.family_of(model)
    model = copy.deepcopy(model)
    report = RewriteReport(
        config=config,
        family=None if family is None else family.name,
        parameters_before=sum(p.numel() for p in model.parameters()),
    )
    # Every new layer (stem, head, Dcls2d) is initialised from the seed, on the CPU, and
    # the caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if geometry is not None:
            report.stem = _rewrite_stem(model, family, geometry, in_chans)
        if num_classes is not None:
            if not hasattr(model, "reset_classifier"):
                raise SurgeryError(
                    f"{type(model).__name__} has no reset_classifier() (not a timm model): pass num_classes=None "
                    "and set its head yourself"
                )
            reset_head(model, num_classes)
        if geometry is not None and family is not None and family.audio_head is not None:
            family.audio_head(model)
        if dcls:
            _replace_depthwise(model, config, matcher, report)
    _describe_input(model, config)
    model.dclsify = report
    return model


def _describe_input(model: nn.Module, config: RewriteConfig) -> None:
    """Keep timm's ``pretrained_cfg`` truthful about what the model now takes and gives."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict):
        return
    cfg = dict(cfg)
    if config.stem is not None:
        cfg["input_size"] = (config.in_chans, *config.input_size)
    if config.num_classes is not None:
        cfg["num_classes"] = config.num_classes
    model.pretrained_cfg = cfg


def _replace_depthwise(model: nn.Module, config: RewriteConfig, matcher, report: RewriteReport) -> None:
    candidates = depthwise_convs(model)
    matched = {name: conv for name, conv in candidates.items() if matcher(name, conv)}
    if not matched:
        found = ", ".join(f"{n} ({c.kernel_size[0]}x{c.kernel_size[1]})" for n, c in list(candidates.items())[:12])
        more = f" and {len(candidates) - 12} more" if len(candidates) > 12 else ""
        raise SurgeryError(
            f"nothing to replace in {type(model).__name__}: no depthwise conv matches {config.match!r}; "
            + (f"its depthwise convs are {found}{more}" if candidates else "it has no depthwise convs")
        )
    too_big = sorted({c.kernel_size for c in matched.values() if max(c.kernel_size) > config.kernel})
    if too_big:
        raise SurgeryError(f"kernel {config.kernel} is smaller than matched kernels {too_big}: use a larger --kernel")
    odd_one_out = sorted(
        {c.kernel_size for c in matched.values() if any((config.kernel - k) % 2 for k in c.kernel_size)}
    )
    if odd_one_out:
        raise SurgeryError(
            f"kernel {config.kernel} and matched kernels {odd_one_out} differ in parity, so the layer's output size "
            "would change: use an odd --kernel for odd matched kernels (the paper's is 23)"
        )
    shapes, report.functional_convs, report.traced = _input_shapes(model, set(matched), example_input(model, config))
    if report.functional_convs:
        warnings.warn(
            f"convs called functionally cannot be rewritten: {', '.join(report.functional_convs)}", stacklevel=3
        )
    shared: dict[tuple, tuple[int, nn.Parameter, nn.Parameter | None]] = {}
    for name, conv in matched.items():
        shape = shapes.get(name)
        layer = _make_dcls(conv, config)
        key = _group_key(config.sync, name, conv, shape)
        if key not in shared:
            shared[key] = (len(shared), layer.P, layer.SIG)
        group, layer.P, layer.SIG = shared[key]
        model.set_submodule(name, layer)
        parent = model.get_submodule(name.rpartition(".")[0])
        if tuple(getattr(parent, "spatial_shape", ())) == tuple(conv.kernel_size):
            # a module that folds an identity into its conv's kernel (timm's RepConditionalPosEnc,
            # when reparameterised) must know the baked kernel's size
            parent.spatial_shape = layer.dilated_kernel_size
        report.replaced.append(Replacement(name, conv.in_channels, conv.kernel_size, conv.stride, shape, group))
