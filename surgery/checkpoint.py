"""Self-describing safetensors checkpoints: the weights plus what it takes to rebuild the model."""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from packaging.version import InvalidVersion, Version
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model
from torch import nn

from .. import backbones
from .._version import __version__
from .audio import AudioConfig
from .dcls import Dcls2d, LargeKernelConv2d, bake
from .files import CheckpointError, atomic_path, read_safetensors, read_state_dict, unreadable
from .heads import FRAME_POOLINGS, FrameError, attach_frame_head, frame_head_of
from .rewrite import RewriteConfig, SurgeryError, example_input, rewrite
from .weights import ImportReport, check_strict, load_timm_weights

FORMAT = "dclsify"
METADATA_KEYS = (
    "format",
    "dclsify_version",
    "timm_version",
    "torch_version",
    "source",
    "model_kwargs",
    "rewrite",
    "class_names",
    "pretrained",
)
JSON_METADATA = ("model_kwargs", "rewrite", "class_names", "pretrained")
AUDIO_KEY = "audio"  # the front-end settings a trained model hears with; absent from untrained checkpoints
MULTI_LABEL_KEY = "multi_label"  # sigmoid (true) or softmax (false) scores; absent from untrained checkpoints
BAKED_KEY = "baked"  # "true": every Dcls2d is stored as its built kernel (dclsify.bake); absent otherwise
FRAME_HEAD_KEY = "frame_head"  # a frame-wise head's pooling (surgery.heads); absent for a clip head

# The timm model arguments a checkpoint may record: what shapes the architecture (generic
# timm arguments, then those of the registered families' classes). Everything else is
# refused, first among them what makes timm read a file or the network (pretrained,
# pretrained_cfg*, checkpoint_path, cache_dir) and what changes what the model returns
# (features_only, out_indices, fork_feat) or where it lives (device, dtype).
ARCHITECTURE_KWARGS = frozenset(
    {
        *("num_classes", "in_chans", "global_pool", "output_stride", "img_size", "patch_size"),
        *("drop_rate", "drop_path_rate", "proj_drop_rate", "attn_drop_rate", "pos_drop_rate"),
        *("depth", "depths", "dim", "dims", "base_dim", "embed_dims", "layers", "heads", "num_heads"),
        *("kernel_size", "kernel_sizes", "repmixer_kernel_size", "mlp_ratio", "mlp_ratios"),
        *("expand_ratio", "expansion_ratio", "conv_ratio", "cls_ratio", "global_block_counts", "d2_scales"),
        *("act_layer", "mlp_act", "norm_layer", "norm_layers", "norm_eps", "token_mixers", "mlp_bias"),
        *("stem_type", "stem_mid_norm", "stem_use_scale_branch", "lkc_use_act", "use_pos_emb", "pos_embs"),
        *("downsample", "downsamples", "se_downsamples", "down_patch_size", "down_stride", "downsample_block"),
        *("downsample_norm", "conv_mlp", "conv_bias", "use_grn", "output_norm", "use_mlp_head", "head_fn"),
        *("ls_init_value", "layer_scale_init_value", "layer_scale_init_values", "res_scale_init_values"),
        *("head_init_scale", "head_norm_first", "head_hidden_size", "growth_rates", "num_blocks_list"),
        *("block_type", "is_downsample_block", "bottleneck_width_ratio", "transition_compression_ratio"),
        "num_init_features",
    }
)


def code_path(source: str) -> Path | None:
    """The Python file a ``file:PATH.py:FACTORY`` source runs; None for a timm source."""
    if not source.startswith("file:"):
        return None
    return Path(source.removeprefix("file:").rpartition(":")[0])


def require_trust(source: str, trust_code: bool, named_by: str | os.PathLike) -> None:
    """Refuse to go on where ``named_by`` (a checkpoint, a recipe, a run directory) asks
    to build its model from a Python file, unless the caller trusts that file.

    timm sources run nothing but timm, so they need no consent; a ``file:`` source runs
    whatever its file holds, which whoever sent the checkpoint may have sent along.
    """
    path = code_path(source)
    if path is not None and not trust_code:
        raise CheckpointError(
            f"{named_by} would run the Python file {path.absolute()} to build its model: refused; "
            "if you trust that file, pass trust_code=True (--trust-code on the command line)"
        )


def check_model_kwargs(source: str, model_kwargs: dict) -> None:
    """``model_kwargs`` that a checkpoint may record for ``source``: for a timm model, only
    :data:`ARCHITECTURE_KWARGS` with JSON scalar or list values, so that rebuilding one
    reads no other file and nothing from the network; for a ``file:`` factory, whose code
    runs only with consent, any keyword but ``pretrained`` (``convert``'s own)."""
    if not isinstance(model_kwargs, dict):
        raise SurgeryError(f"model_kwargs must be a mapping of keyword arguments, got {model_kwargs!r}")
    for key, value in model_kwargs.items():
        if code_path(source) is not None:
            if not isinstance(key, str) or not key.isidentifier() or key == "pretrained":
                raise SurgeryError(f"model_kwargs {key!r} cannot be a keyword argument of {source}")
        elif key not in ARCHITECTURE_KWARGS:
            raise SurgeryError(
                f"model_kwargs {key!r} is not an architecture argument of a timm model: a checkpoint may only "
                "record what shapes the model (weights travel in the checkpoint; pretrained= is convert's)"
            )
        elif not _is_json_scalar_or_list(value):
            raise SurgeryError(f"model_kwargs {key!r} must be a number, string, bool, null or list, got {value!r}")


def _is_json_scalar_or_list(value) -> bool:
    if isinstance(value, list):
        return all(map(_is_json_scalar_or_list, value))
    return value is None or isinstance(value, (bool, int, float, str))


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


def timm_name(source: str) -> str:
    """The timm model that ``timm:NAME`` (or a bare ``NAME``) names; an unknown one is a
    :class:`SurgeryError` naming the closest known names."""
    name = source.removeprefix("timm:")
    if ":" in name:
        raise SurgeryError(f"unknown model source {source!r}: use timm:NAME or file:PATH.py:FACTORY")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `timm.list_models('*pattern*')` lists them"
        raise SurgeryError(f"unknown timm model {name!r}{hint}")
    return name


def create_source(source: str, **model_kwargs) -> nn.Module:
    """The model a source names, with random weights: ``timm:NAME`` (or a bare timm name), built
    with its family's ``model_kwargs`` where ``model_kwargs`` does not set them (FastViT's layer
    scales start at DCLS-Audio's 1e-6), or ``file:PATH.py:FACTORY`` (``FACTORY(**model_kwargs)``
    from a Python file). Nothing is downloaded."""
    if source.startswith("file:"):
        return _from_file(source, **model_kwargs)
    if Path(source).is_file():
        raise SurgeryError(
            f"{source} is a file, not a model name: use timm:NAME or file:PATH.py:FACTORY (a dclsify "
            "checkpoint is read with dclsify.load, and `dclsify diff` compares it with its source)"
        )
    name = timm_name(source)
    family = backbones.family_of_name(name)
    defaults = {} if family is None else family.model_kwargs
    return timm.create_model(name, pretrained=False, **{**defaults, **model_kwargs})


def convert(
    source: str, model_kwargs: dict | None = None, pretrained: str | os.PathLike | None = None, **rewrite_args
) -> nn.Module:
    """``rewrite(create_source(source))``, remembering the source so that :func:`save` can
    describe it (the weights themselves travel in the checkpoint).

    ``model_kwargs`` are those :func:`check_model_kwargs` allows: what a checkpoint may record.
    ``pretrained`` is a local file of the timm model's weights (e.g. ImageNet: .safetensors,
    .pth or .bin, read tensors-only by :func:`read_state_dict`), loaded into the rewritten
    model as ``dclsify import --model timm:NAME`` does it
    (:func:`~dclsify.surgery.weights.load_timm_weights`: the RGB stem adapted to the audio
    stem, the head and the new Dcls2d layers started afresh); the model's ``imported`` says
    what went where. A file with any tensor that no rule explains is refused
    (:func:`~dclsify.import_checkpoint` is lenient unless ``strict``).
    """
    model_kwargs = dict(model_kwargs or {})
    check_model_kwargs(source, model_kwargs)
    if pretrained is not None and code_path(source) is not None:
        raise SurgeryError("pretrained= is for timm models: a file: factory loads its own weights")
    state_dict = None if pretrained is None else read_state_dict(pretrained)  # a bad file fails before any build
    model = rewrite(create_source(source, **model_kwargs), **rewrite_args)
    model.dclsify.source = source if source.startswith(("timm:", "file:")) else f"timm:{source}"
    model.dclsify.model_kwargs = model_kwargs
    model.dclsify.pretrained = None if pretrained is None else str(pretrained)
    if state_dict is not None:
        model.imported = ImportReport(str(pretrained), model.dclsify.source)
        load_timm_weights(model, state_dict, model.imported)
        check_strict(model.imported, strict=True)
    return model


@dataclass(frozen=True)
class Converted:
    """What :func:`convert_to_file` made: the model, where it went, and its output on an example input."""

    model: nn.Module
    path: Path
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


def convert_to_file(
    source: str,
    path: str | os.PathLike | None = None,
    model_kwargs: dict | None = None,
    pretrained: str | os.PathLike | None = None,
    **rewrite_args,
) -> Converted:
    """:func:`convert`, run once on a zero spectrogram (a model that fails on it is a
    :class:`SurgeryError`, and nothing is written), then written by :func:`save` to ``path`` (by
    default ``NAME_dcls.safetensors``, or ``NAME_dsc.safetensors`` with ``dcls=False``, in the
    current folder): what ``dclsify convert`` does."""
    model = convert(source, model_kwargs, pretrained=pretrained, **rewrite_args).eval()
    example = example_input(model, model.dclsify.config)
    try:
        with torch.no_grad():
            output_shape = tuple(model(example).shape)
    except Exception as error:  # noqa: BLE001 - the model's own error, about the example
        raise SurgeryError(
            f"the rewritten model fails on a {tuple(example.shape)} input: {type(error).__name__}: {error}"
        ) from None
    name = source.rsplit(":", 1)[-1]  # the timm name, or a file: source's factory
    path = Path(path or f"{name}_{'dcls' if rewrite_args.get('dcls', True) else 'dsc'}.safetensors")
    try:
        save(model, path)
    except OSError as error:
        raise CheckpointError(f"cannot write {path}: {error.strerror or error}") from None
    return Converted(model, path, tuple(example.shape), output_shape)


def _head_size(model: nn.Module) -> int | None:
    """The number of classes the model's head gives, where the model says it."""
    size = model.dclsify.config.num_classes
    return size if size is not None else getattr(model, "num_classes", None)


def _check_class_names(class_names, head_size: int | None) -> None:
    if class_names is None:
        return
    if not isinstance(class_names, list) or not all(isinstance(name, str) for name in class_names):
        raise CheckpointError(f"class_names must be a list of strings or None, got {class_names!r}"[:300])
    if head_size is not None and len(class_names) != head_size:
        raise CheckpointError(f"class_names holds {len(class_names)} names for a head of {head_size} classes")


def save(
    model: nn.Module,
    path: str | os.PathLike,
    class_names: list[str] | None = None,
    audio=None,
    multi_label: bool | None = None,
) -> Path:
    """Write ``model`` (made by :func:`convert`) to a ``.safetensors`` file that :func:`load` can rebuild.

    ``model`` is trainable, or baked (:func:`~dclsify.surgery.dcls.bake`: every ``Dcls2d`` a
    fixed kernel; the checkpoint is then a *dense* one, without positions and spreads, that
    :func:`load` rebuilds baked); a model with some layers baked and others not is refused.
    Parameters shared between layers (synchronised ``P``/``SIG``) are stored once. The
    write goes through a temporary file: an interrupted save never leaves a partial
    file under ``path``. ``class_names``, when given, name the head's outputs; ``audio``
    (an :class:`~dclsify.surgery.audio.AudioConfig`) records the clip format and log-mel
    settings the model was trained with, and ``multi_label`` whether its scores are sigmoids
    (multi-label, BCE) or a softmax (one label a clip), so that evaluation and inference need no flags.
    A frame-wise head (:func:`~dclsify.surgery.heads.attach_frame_head`) is recorded with its pooling.
    """
    report = getattr(model, "dclsify", None)
    if report is None or getattr(report, "source", None) is None:
        raise CheckpointError("save() needs a model made by dclsify.convert(), which knows its source")
    baked = any(isinstance(m, LargeKernelConv2d) for m in model.modules())
    if baked and any(isinstance(m, Dcls2d) for m in model.modules()):
        raise CheckpointError("save() takes a model with every Dcls2d baked (dclsify.bake) or none: this one is mixed")
    _check_class_names(class_names, _head_size(model))
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
    if audio is not None:
        metadata[AUDIO_KEY] = audio.to_json()
    if multi_label is not None:
        metadata[MULTI_LABEL_KEY] = json.dumps(bool(multi_label))
    if baked:
        metadata[BAKED_KEY] = "true"
    if frame_head_of(model) is not None:
        metadata[FRAME_HEAD_KEY] = frame_head_of(model).pooling
    with atomic_path(path) as temporary:
        save_model(model, str(temporary), metadata=metadata)
    return Path(path)


def read_metadata(path: str | os.PathLike) -> dict:
    """The decoded metadata of a dclsify checkpoint, checked: every key this dclsify writes
    and no other, each of its type, the rewrite arguments in their ranges, the model
    arguments those :func:`check_model_kwargs` allows. Nothing is built and no code runs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint: {path}")
    try:
        with safe_open(path, framework="pt") as reader:
            raw = reader.metadata() or {}
            tensor_names = set(reader.keys())
    except (SafetensorError, OSError) as error:
        raise unreadable(path, error) from None
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a dclsify checkpoint (no rebuild metadata)")
    try:
        written_by = Version(raw.get("dclsify_version", ""))
    except InvalidVersion:
        version = raw.get("dclsify_version")
        raise CheckpointError(f"{path}: metadata 'dclsify_version' is not a version: {version!r}") from None
    if written_by > Version(__version__):
        raise CheckpointError(
            f"{path} was written by dclsify {written_by}, newer than this dclsify {__version__}: upgrade to load it"
        )
    # besides ours, safetensors records each shared tensor's other names: name -> stored name
    known = (*METADATA_KEYS, AUDIO_KEY, MULTI_LABEL_KEY, BAKED_KEY, FRAME_HEAD_KEY)
    unknown = [key for key, value in raw.items() if key not in known and value not in tensor_names]
    missing = [key for key in METADATA_KEYS if key not in raw]
    if unknown or missing:
        what = f"unknown keys {unknown}" if unknown else f"missing keys {missing}"
        raise CheckpointError(f"{path}: damaged dclsify metadata: {what}"[:500])
    decoded = {key: raw[key] for key in METADATA_KEYS}
    for key in JSON_METADATA:
        try:
            decoded[key] = json.loads(raw[key])
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{path}: damaged dclsify metadata: {key!r} is not JSON ({error})") from None
    decoded[AUDIO_KEY] = _audio_settings(path, raw.get(AUDIO_KEY))
    decoded[MULTI_LABEL_KEY] = {None: None, "true": True, "false": False}.get(raw.get(MULTI_LABEL_KEY), "bad")
    if decoded[MULTI_LABEL_KEY] == "bad":
        raise CheckpointError(f"{path}: damaged dclsify metadata: 'multi_label' must be true or false")
    if raw.get(BAKED_KEY, "true") != "true":
        raise CheckpointError(f"{path}: damaged dclsify metadata: 'baked' must be true where present")
    decoded[BAKED_KEY] = BAKED_KEY in raw
    decoded[FRAME_HEAD_KEY] = raw.get(FRAME_HEAD_KEY)
    if decoded[FRAME_HEAD_KEY] not in (None, *FRAME_POOLINGS):
        raise CheckpointError(
            f"{path}: damaged dclsify metadata: 'frame_head' must be one of {', '.join(FRAME_POOLINGS)} where present"
        )
    source, pretrained = decoded["source"], decoded["pretrained"]
    if not source.startswith(("timm:", "file:")):
        raise CheckpointError(f"{path}: metadata 'source' must be timm:NAME or file:PATH.py:FACTORY, got {source!r}")
    if pretrained is not None and not isinstance(pretrained, str):
        raise CheckpointError(f"{path}: metadata 'pretrained' must be a file name or null, got {pretrained!r}")
    try:
        check_model_kwargs(source, decoded["model_kwargs"])
        config = RewriteConfig.from_dict(decoded["rewrite"])
    except SurgeryError as error:
        raise CheckpointError(f"{path}: metadata: {error}") from None
    try:
        _check_class_names(decoded["class_names"], config.num_classes)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: metadata: {error}") from None
    return decoded


def _audio_settings(path: Path, text: str | None):
    """The checkpoint's front-end settings as an AudioConfig, or None where it records none."""
    if text is None:
        return None
    try:
        values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"expected a mapping, got {values!r}"[:200])
        return AudioConfig.from_dict(values)
    except (json.JSONDecodeError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: damaged dclsify metadata: 'audio': {error}"[:500]) from None


def load(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    trust_code: bool = False,
    model_kwargs: dict | None = None,
) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (strictly).

    ``model_kwargs``, where given, are the model's arguments instead of those recorded: ones
    that change no weight, such as ``drop_path_rate`` for fine-tuning (the weights are checked
    as ever, so one that changes them is refused).

    The metadata is checked (:func:`read_metadata`) before anything is built. A timm
    source is rebuilt freely; a ``file:PATH.py:FACTORY`` source runs that file, so it is
    refused unless ``trust_code=True`` (:func:`require_trust`). A dense checkpoint (saved
    from a baked model) is rebuilt baked, a frame-wise head with its pooling. Every tensor the
    model needs must be in the file, of its dtype and shape, and no other.
    """
    metadata = read_metadata(path)
    require_trust(metadata["source"], trust_code, path)
    try:
        kwargs = metadata["model_kwargs"] if model_kwargs is None else model_kwargs
        model = convert(metadata["source"], kwargs, **metadata["rewrite"])
    except SurgeryError as error:
        raise CheckpointError(f"{path}: the model its metadata describes cannot be built: {error}") from None
    except Exception as error:  # noqa: BLE001 - the model's own error, about arguments the metadata gave it
        detail = " ".join(str(error).split())[:300]
        raise CheckpointError(
            f"{path}: the model its metadata describes cannot be built ({type(error).__name__}: {detail})"
        ) from None
    try:
        _check_class_names(metadata["class_names"], _head_size(model))
        if metadata[FRAME_HEAD_KEY] is not None:
            attach_frame_head(model, metadata[FRAME_HEAD_KEY])
    except (CheckpointError, FrameError) as error:
        raise CheckpointError(f"{path}: metadata: {error}") from None
    if metadata[BAKED_KEY]:
        model = bake(model)  # the layers of a dense checkpoint: their kernels come from the file
    weights = read_safetensors(Path(path))  # whatever its suffix: read_metadata found a safetensors file
    _check_weights(path, weights, model)
    model.load_state_dict(weights, strict=False)  # what strict would call missing: aliases of a stored tensor
    model.class_names = metadata["class_names"]
    model.audio = metadata[AUDIO_KEY]
    model.multi_label = metadata[MULTI_LABEL_KEY]
    return model.to(device)


def _check_weights(path: str | os.PathLike, weights: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Refuse weights that are not exactly the model's: a tensor missing, one too many,
    or one of another dtype or shape (which load_state_dict would silently convert)."""
    expected = model.state_dict(keep_vars=True)
    names_of: dict[int, list[str]] = {}  # a tensor shared between layers is stored under one of its names
    for name, tensor in expected.items():
        names_of.setdefault(id(tensor), []).append(name)
    missing = [names[0] for names in names_of.values() if not any(name in weights for name in names)]
    extra = [name for name in weights if name not in expected]
    wrong = [
        f"{name} is {tensor.dtype} {tuple(tensor.shape)}, the model's {expected[name].dtype} "
        f"{tuple(expected[name].shape)}"
        for name, tensor in weights.items()
        if name in expected and (tensor.dtype, tensor.shape) != (expected[name].dtype, expected[name].shape)
    ]
    for problem, names in (("missing", missing), ("not in the model", extra), ("of the wrong dtype or shape", wrong)):
        if names:
            listed = "; ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise CheckpointError(f"{path}: weights do not fit the rebuilt model: {len(names)} {problem}: {listed}")
