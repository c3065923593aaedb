"""The ``dclsify`` command line: thin layers over the documented Python functions."""

# The package's own modules are imported inside the commands: `dclsify --help` then skips
# torchaudio and h5py. Measured on a 2-core CPU (10 runs, median): 3.61 s this way,
# 3.95 s with every import at the top of this file (+9 %); 3.64 s before the layers moved.

from __future__ import annotations

import functools
import inspect
import json
import os
import textwrap
import warnings
from contextlib import contextmanager
from pathlib import Path

import typer
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Model surgery for audio tagging with Dilated Convolution with Learnable Spacings (DCLS).",
)
console = Console()
error_console = Console(stderr=True)  # warnings beside output that machines read (tsv, csv, json)


ALGORITHM_HELP = (
    "How DCLS layers convolve: auto (timed per shape), direct, channels_last, fft, toeplitz, or triton "
    "(depthwise, CUDA; never chosen by auto)."
)
COMPACT = dict(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)  # 2 spaces between columns


def print_table(table: Table) -> None:
    """Print a ``COMPACT`` table with no word cut, piped output being 80 columns wide: a ``no_wrap`` column or one of
    single words (node names, module types) keeps its width, the others wrap between words where that adds fewest lines;
    a table whose words cannot fit is printed whole, wider than the console (where rich would cut words)."""
    cells = [
        [Text.from_markup(c).plain if isinstance(c, str) else c.plain for c in (column.header, *column.cells)]
        for column in table.columns
    ]

    @functools.cache
    def lines(index: int, width: int) -> int:
        return sum(len(textwrap.wrap(cell, width, break_on_hyphens=False)) for cell in cells[index])

    widths = [max(map(cell_len, column)) for column in cells]
    narrowest = [
        width if column.no_wrap else max((cell_len(word) for cell in texts for word in cell.split()), default=1)
        for column, texts, width in zip(table.columns, cells, widths, strict=True)
    ]
    gaps = 2 * (len(widths) - 1)
    if sum(narrowest) + gaps > console.width:  # the words cannot fit: the whole table, wider than the console
        table.width = sum(widths) + gaps
    excess = sum(widths) + gaps - (table.width or console.width)
    while excess > 0:  # narrow the column that wraps into the fewest new lines per character it gives up
        _, index, narrower = min(
            ((lines(i, narrower) - lines(i, width)) / (width - narrower), i, narrower)
            for i, width in enumerate(widths)
            for narrower in range(max(narrowest[i], width - excess), width)
        )
        excess -= widths[index] - narrower
        widths[index] = narrower
    for column, width in zip(table.columns, widths, strict=True):
        column.width = width
    console.print(table, crop=False)


@contextmanager
def clips_bar(description: str, rate_format: str):
    """A transient progress bar of clips done, with their rate; yields it and the
    ``progress(done, total)`` callback that long library calls (pack, score_to_file) take."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} clips/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=None, rate="-")

        def progress(done: int, total: int) -> None:
            speed = bar.tasks[0].speed
            bar.update(task, completed=done, total=total, rate="-" if speed is None else format(speed, rate_format))

        yield bar, progress


def fail(message: str, to: Console | None = None) -> None:
    """End the command with one clear line (on ``to``, by default the console) and exit status 1."""
    (to or console).print(f"[bold red]error:[/] {escape(message)}")  # brackets in a message are text, not markup
    raise typer.Exit(1)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` is never half-written; a failure ends the command."""
    from dclsify.surgery.checkpoint import atomic_path

    try:
        with atomic_path(path) as temporary:
            temporary.write_text(text)
    except OSError as error:
        fail(f"cannot write {path}: {error.strerror or error}")


def _check_device(device: str, to: Console | None = None) -> None:
    """Refuse a device torch does not know or cannot use (the message on ``to``: see :func:`fail`)."""
    import torch

    try:
        device_ = torch.device(device)
    except RuntimeError:
        device_ = None
    if device_ is None or device_.type not in ("cpu", "cuda"):
        fail(f"unknown device {device!r}: use cpu, cuda or cuda:N", to)
    if device_.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda asked for, but torch sees no CUDA device here", to)
    if device_.type == "cuda" and (device_.index or 0) >= torch.cuda.device_count():
        fail(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)", to)


def _parse_shapes(text: str) -> list[tuple[int, int, int]]:
    try:
        shapes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise typer.BadParameter(f"expected CxHxW[,CxHxW...] with positive integers, got {text!r}")
    return shapes


def _version_callback(value: bool) -> None:
    if value:
        from dclsify._version import __version__

        console.print(f"dclsify {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    pass


@app.command()
def bench(
    shapes: str = typer.Option(
        "96x64x62,192x32x31,384x16x15,768x8x7",
        help="Depthwise layer shapes CxHxW (default: ConvNeXt-T's four stages on a 128x1001 log-mel).",
    ),
    batch: int = typer.Option(8, min=1),
    kernel: int = typer.Option(23, min=1, help="DCLS kernel (window) size."),
    count: int = typer.Option(26, min=1, help="Kernel elements per channel."),
    version: str = typer.Option("gauss", help="gauss or v1."),
    repeats: int = typer.Option(3, min=1, help="Timed runs per measurement (the best is kept)."),
    reference: bool = typer.Option(True, help="Also time DCLS==0.1.1, when installed."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    algorithm: str = typer.Option("auto", help=ALGORITHM_HELP),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the results to this JSON file."),
) -> None:
    """Time Dcls2d forward+backward against DCLS 0.1.1 and a dense 7x7 depthwise conv."""
    from dclsify.surgery import VERSIONS
    from dclsify.surgery.bench import bench_op

    parsed = _parse_shapes(shapes)
    if version not in VERSIONS:
        raise typer.BadParameter(f"must be one of {', '.join(VERSIONS)}", param_hint="--version")
    if count > kernel * kernel:
        raise typer.BadParameter(f"at most kernel^2 = {kernel * kernel}", param_hint="--count")
    _check_device(device)
    _check_algorithm(algorithm, device)

    with console.status("measuring") as status, _value_errors_fail():
        results = bench_op(
            parsed,
            batch,
            kernel,
            count,
            version,
            repeats,
            reference,
            device,
            progress=lambda shape: status.update(f"measuring {shape}"),
            algorithm=algorithm,
        )
    table = Table(
        title=f"Dcls2d forward+backward: batch {batch}, kernel {kernel}, count {count}, {version}, {device}",
        caption="ms: ours; ref: DCLS 0.1.1; 7x7: a dense depthwise 7x7 conv; MiB: our kernel construction's peak; "
        "ops: operators that do work (GPU kernel launches) per forward+backward, a layer alone",
        **COMPACT,
    )
    headings = ("layer", "algorithm", "ms", "ref ms", "ref/ours", "7x7 ms", "ms/7x7", "MiB", "MiB/ref")
    for heading in (*headings, "ops", "7x7 ops"):
        table.add_column(heading, justify="right", no_wrap=True)
    for r in results:
        missing = r.reference_ms is None
        table.add_row(
            f"{r.channels}x{r.height}x{r.width}",
            r.algorithm,
            f"{r.ours_ms:.1f}",
            "-" if missing else f"{r.reference_ms:.1f}",
            "-" if missing else f"{r.speedup:.1f}x",
            f"{r.dense7_ms:.1f}",
            f"{r.vs_dense7:.2f}x",
            f"{r.ours_kernel_bytes / 2**20:.1f}",
            "-" if missing else f"{r.memory_ratio:.3f}",
            str(r.ours_ops),
            str(r.dense7_ops),
        )
    print_table(table)
    if reference and results and results[0].reference_ms is None:
        console.print("DCLS==0.1.1 is not installed: no reference timings (pip install 'dclsify[test]').", markup=False)
    if json_path is not None:
        write_atomically(json_path, json.dumps([r.as_dict() for r in results], indent=2) + "\n")
        console.print(f"wrote {json_path}", markup=False)


@app.command("bench-model")
def bench_model_command(
    models: str = typer.Option(
        "convnext_tiny,convformer_s18,fastvit_sa24",
        help="timm models, comma-separated (timm:NAME or NAME). Default: the paper's Table 1, "
        "convnext_tiny, convformer_s18, fastvit_sa24.",
        show_default=False,
    ),
    batch: int | None = typer.Option(None, min=1, help="Clips per step (default: 4 on the CPU, 64 on CUDA)."),
    repeats: int | None = typer.Option(
        None,
        min=1,
        help="Timed repetitions of each step, for the median and spread (default: 5 on the CPU, 10 on CUDA).",
    ),
    warmup: int | None = typer.Option(
        None, min=0, help="Untimed calls of each step first (default: 1 on the CPU, 5 on CUDA)."
    ),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("fp32", help="Autocast precision: fp32, bf16 or fp16 (CUDA only)."),
    algorithm: str = typer.Option("auto", help=ALGORITHM_HELP),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the results to this JSON file."),
) -> None:
    """Table 1: parameters, GFLOPs and throughput (training step, baked and un-baked inference) of DCLS
    audio models against their DSC twins."""
    from dclsify.pipeline.bench import DTYPES, bench_models

    _check_device(device)
    _check_algorithm(algorithm, device)
    if dtype not in DTYPES:
        fail(f"unknown --dtype {dtype!r}: use {', '.join(DTYPES)}")
    if dtype == "fp16" and not device.startswith("cuda"):
        fail("--dtype fp16 is for CUDA devices: use bf16 or fp32 on the CPU")
    names = [name.strip() for name in models.split(",")]
    if not all(names):
        fail(f"--models {models!r} has an empty name: give timm names separated by commas")
    with console.status("measuring") as status, _value_errors_fail():
        result = _or_fail(
            bench_models,
            names,
            batch=batch,
            warmup=warmup,
            repeats=repeats,
            device=device,
            dtype=dtype,
            progress=lambda what: status.update(f"measuring {what}"),
            algorithm=algorithm,
        )
    s = result.setup
    if s["cuda"] is None:
        console.print(f"{s['device']}: {s['device_name']}, {s['threads']} threads", markup=False)
    else:
        console.print(
            f"{s['device']}: {s['device_name']}, {s['device_memory'] / 2**30:.0f} GiB, CUDA {s['cuda']}, "
            f"cuDNN {s['cudnn']} (benchmark mode {'on' if s['cudnn_benchmark'] else 'off'})",
            markup=False,
        )
    console.print(f"torch {s['torch']}, timm {s['timm']}, dclsify {s['dclsify']}, Python {s['python']}", markup=False)
    console.print(
        f"batch {s['batch']} of {'x'.join(map(str, s['input_shape']))}, {s['dtype']}, 527 classes, "
        f"DCLS algorithm {s['algorithm']}; "
        f"warm-up {s['warmup']}, {s['repeats']} repetitions of {s['steps_per_repeat']} step(s)",
        markup=False,
    )
    table = Table(
        caption="samples/s: median of the repetitions ± half their range. DCLS: 23x23 kernels of 26 elements; "
        "un-baked: kernels built every call, ratio against the DSC inference. Parameters: shared ones counted "
        "once. GFLOPs per clip: 2 x multiply-accumulates of convolutions and matrix products "
        "(torch.utils.flop_counter), DCLS as its baked 23x23 depthwise conv computed directly.",
        caption_justify="left",
        **COMPACT,
    )
    for heading in ("model", "", "M params", "GFLOPs", "training", "inference", "un-baked inference"):
        table.add_column(heading, justify="left" if heading in ("model", "") else "right")

    def rate(variant, kind: str) -> str:
        throughput = variant.throughput.get(kind)
        return "-" if throughput is None else f"{throughput.median:.2f}±{throughput.spread:.0%}"

    for r in result.models:
        for label, v in (("DSC", r.dsc), ("DCLS", r.dcls)):
            name = r.model if label == "DSC" else ""
            cells = (rate(v, "training"), rate(v, "inference"), rate(v, "inference_unbaked"))
            table.add_row(name, label, f"{v.params / 1e6:.2f}", f"{v.gflops:.2f}", *cells)
        q = r.ratios
        table.add_row(
            "",
            "DCLS/DSC",
            *(f"{q[k]:.2f}" for k in ("params", "gflops", "training", "inference", "inference_unbaked")),
            end_section=True,
        )
    if result.models:
        print_table(table)
    peaks = [f"{r.model} {r.peak_memory / 2**30:.1f} GiB" for r in result.models if r.peak_memory is not None]
    if peaks:
        console.print(f"peak {s['device']} memory per model (both twins): {', '.join(peaks)}", markup=False)
    if json_path is not None:
        write_atomically(json_path, json.dumps(result.as_dict(), indent=2) + "\n")
        console.print(f"wrote {json_path}", markup=False)
    for message in result.failed.values():
        console.print(f"[bold red]error:[/] {escape(message)}")
    if result.failed:
        raise typer.Exit(1)


KERNEL = typer.Option(23, help="Dcls2d window size.")
COUNT = typer.Option(26, help="Kernel elements per channel.")
VERSION = typer.Option("gauss", help="gauss or v1.")
MATCH = typer.Option("7", help="Depthwise kernel sizes to replace: 7, '5,7' or '>=5'.")
SYNC = typer.Option("stage", help="Share P/SIG per stage, per channel count (model) or not at all (none).")
STEM = typer.Option(
    "audio", help="audio (2x16, stride 2x16), KHxKW (stride = kernel), KHxKW/SHxSW, or none to keep the original."
)
IN_CHANS = typer.Option(1, help="Input channels of the new stem.")
NUM_CLASSES = typer.Option(527, min=0, help="Classifier outputs (527 = AudioSet); 0 keeps the model's head.")
DCLS = typer.Option(True, "--dcls/--no-dcls", help="--no-dcls: only the stem and head (the DSC baseline).")
TRUST_CODE = typer.Option(
    False,
    "--trust-code",
    help="Let a checkpoint whose source is file:PATH.py:FACTORY run that file to rebuild its model.",
)
REWRITE_OPTIONS = [
    inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option, annotation=kind)
    for name, option, kind in (
        ("kernel", KERNEL, int),
        ("count", COUNT, int),
        ("version", VERSION, str),
        ("match", MATCH, str),
        ("sync", SYNC, str),
        ("stem", STEM, str),
        ("in_chans", IN_CHANS, int),
        ("num_classes", NUM_CLASSES, int),
        ("dcls", DCLS, bool),
    )
]


def with_rewrite_options(command):
    """Give ``command`` the rewrite's options (--kernel ... --dcls) where its ``rewrite`` parameter
    stands; it is called with them as one ``rewrite`` dict of :func:`dclsify.rewrite` arguments."""
    signature = inspect.signature(command, eval_str=True)
    at = list(signature.parameters).index("rewrite")
    others = [parameter for parameter in signature.parameters.values() if parameter.name != "rewrite"]
    parameters = [*others[:at], *REWRITE_OPTIONS, *others[at:]]

    @functools.wraps(command)
    def wrapper(**values):
        options = {option.name: values.pop(option.name) for option in REWRITE_OPTIONS}
        return command(**values, rewrite=_rewrite_arguments(**options))

    wrapper.__signature__ = signature.replace(parameters=parameters)
    wrapper.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    return wrapper


def _rewrite_arguments(
    kernel: int, count: int, version: str, match: str, sync: str, stem: str, in_chans: int, num_classes, dcls: bool
) -> dict:
    """CLI spellings to :func:`dclsify.rewrite` arguments."""
    if match.isdigit():
        match_arg = int(match)
    elif all(part.strip().isdigit() for part in match.split(",")):
        match_arg = [int(part) for part in match.split(",")]
    else:
        match_arg = match  # ">=N"; rewrite() says what else it accepts
    return dict(
        kernel=kernel,
        count=count,
        version=version,
        match=match_arg,
        sync=sync,
        stem=None if stem.lower() == "none" else stem,
        in_chans=in_chans,
        num_classes=num_classes or None,
        dcls=dcls,
    )


def _check_algorithm(algorithm: str, device: str) -> None:
    """Refuse an unknown DCLS algorithm, or the Triton kernel where it cannot run."""
    from dclsify.surgery.conv import ALGORITHMS, triton_refusal

    if algorithm not in ALGORITHMS:
        fail(f"unknown --algorithm {algorithm!r}: use {', '.join(ALGORITHMS)}")
    if algorithm == "triton" and (refusal := triton_refusal(device)) is not None:
        fail(f"--algorithm triton cannot run here: {refusal}")


@contextmanager
def _value_errors_fail():
    """An algorithm that does not apply to a benchmarked shape: one line, not a traceback."""
    try:
        yield
    except ValueError as error:
        fail(str(error))


def _or_fail(function, *args, **kwargs):
    """Call a dclsify function; a user error it raises ends the command with its message."""
    from dclsify.surgery.checkpoint import CheckpointError
    from dclsify.surgery.rewrite import SurgeryError

    try:
        return function(*args, **kwargs)
    except (SurgeryError, CheckpointError) as error:
        fail(str(error))


@app.command("convert")
@with_rewrite_options
def convert_command(
    model: str = typer.Argument(..., help="timm:NAME, e.g. timm:convnext_tiny."),
    rewrite: dict | None = None,
    output: Path | None = typer.Option(None, "-o", "--output", help="Checkpoint (default: NAME_dcls.safetensors)."),
    pretrained: Path | None = typer.Option(
        None,
        help="Local weights of the timm model (e.g. ImageNet: .safetensors, .pth, .bin) to start from, loaded as "
        "`dclsify import --model timm:NAME` loads them (the stem adapted, a report of what went where).",
    ),
) -> None:
    """Rewrite a timm model into an audio tagger and save it as a self-describing checkpoint."""
    from dclsify.surgery.checkpoint import convert_to_file
    from dclsify.surgery.diff import count_parameters

    with console.status(f"converting {escape(model)}"):
        converted = _or_fail(convert_to_file, model, output, pretrained=pretrained, **rewrite)
    report = converted.model.dclsify
    table = Table(**COMPACT)
    for heading in ("P/SIG group", "channels", "map (HxW)", "kernel", "layers"):
        table.add_column(heading, justify="right")
    groups: dict[int, list] = {}
    for replacement in report.replaced:
        groups.setdefault(replacement.group, []).append(replacement)
    for group, members in groups.items():
        first = members[0]
        size = "?" if first.input_shape is None else f"{first.input_shape[-2]}x{first.input_shape[-1]}"
        kernel_size = f"{first.kernel_size[0]}x{first.kernel_size[1]}"
        table.add_row(str(group), str(first.channels), size, kernel_size, str(len(members)))
    if groups:
        config = report.config
        console.print(
            f"{escape(model)}: {len(report.replaced)} depthwise convs replaced by "
            f"Dcls2d {config.kernel}x{config.kernel}/{config.count}"
        )
        print_table(table)
    classes = rewrite["num_classes"]
    console.print(f"stem: {report.stem or 'kept'}; classifier: {f'{classes} classes' if classes else 'kept'}")
    console.print(f"parameters: {report.parameters_before:,} before, {count_parameters(converted.model):,} after")
    console.print(f"output on {converted.input_shape}: {converted.output_shape}")
    if pretrained is not None:
        console.print(f"{pretrained}: {report.source}'s weights", markup=False)
        _print_import_report(converted.model.imported)
    console.print(f"wrote {converted.path}", markup=False)


def _key_patterns(keys: list[str]) -> str:
    """State-dict keys in short: the tensors of one module in braces, and modules that differ
    only in their numbers as one pattern with ``*``, e.g. ``stages.*.blocks.*.conv_dw.{weight, P, SIG} (18 each)``."""
    import re
    from collections import Counter

    by_module: dict[str, list[str]] = {}
    for key in keys:
        module, _, tensor = key.rpartition(".")
        by_module.setdefault(module, []).append(tensor)
    numbered = {module: re.sub(r"\d+", "*", module) for module in by_module}
    sharing = Counter(numbered.values())
    patterns: Counter = Counter(
        (numbered[module] if sharing[numbered[module]] > 1 else module, tuple(tensors))
        for module, tensors in by_module.items()
    )
    parts = []
    for (module, tensors), count in patterns.items():
        names = tensors[0] if len(tensors) == 1 else "{" + ", ".join(tensors) + "}"
        times = "" if count == 1 else f" ({count}{' each' if len(tensors) > 1 else ''})"
        parts.append(f"{module}.{names}{times}" if module else f"{names}{times}")
    return ", ".join(parts)


@app.command("import")
def import_command(
    checkpoint: Path = typer.Argument(..., help="Weights made elsewhere: .pth, .pt, .bin or .safetensors."),
    output: Path = typer.Option(..., "-o", "--output", help="The dclsify checkpoint to write (.safetensors)."),
    model: str | None = typer.Option(
        None, help="One of the paper's six models (found from the keys when not given), or timm:NAME for timm weights."
    ),
    strict: bool = typer.Option(False, "--strict", help="Refuse a file with any tensor that does not fit."),
    stem: str = typer.Option("adapt", help="timm weights: adapt the RGB stem (sum, resize to 2x16) or init it."),
    num_classes: int = typer.Option(527, min=1, help="timm weights: classes of the new head."),
    kernel: int = KERNEL,
    count: int = COUNT,
    dcls: bool = DCLS,
) -> None:
    """Import foreign weights: the paper's released DCLS-Audio checkpoints, or a timm model's ImageNet weights."""
    from dclsify.pipeline.importer import PAPER_MODELS, import_to_file

    options = dict(strict=strict, stem=stem, num_classes=num_classes, kernel=kernel, count=count, dcls=dcls)
    with console.status(f"importing {escape(str(checkpoint))}"):
        try:
            imported = _or_fail(import_to_file, checkpoint, output, model, **options)
        except OSError as error:
            fail(f"cannot write {output}: {error.strerror or error}")
    report = imported.imported
    described = "" if report.model not in PAPER_MODELS else f" ({PAPER_MODELS[report.model].source})"
    console.print(f"{checkpoint}: {report.model}{described}", markup=False)
    _print_import_report(report)
    console.print(f"wrote {output}", markup=False)


def _print_import_report(report) -> None:
    """What an import did (:class:`~dclsify.surgery.weights.ImportReport`): tensors loaded, then
    those adapted, dropped or initialised by reason, and each one that does not fit by name."""
    adapted = {key for key, _ in report.adapted}
    console.print(f"loaded {sum(key not in adapted for key in report.loaded)} tensors as they are", markup=False)
    table = Table(**COMPACT)
    for heading in ("", "why", "tensors"):
        table.add_column(heading)
    for what in ("adapted", "dropped", "initialised"):
        by_reason: dict[str, list[str]] = {}
        for key, why in getattr(report, what):
            by_reason.setdefault(why, []).append(key)
        for why, keys in by_reason.items():
            table.add_row(what, escape(why), escape(_key_patterns(keys)))
    for key, why in report.problems:  # each by its name: these are what --strict refuses
        table.add_row("[red]does not fit[/]", escape(why), escape(key))
    if table.row_count:
        print_table(table)


@app.command("diff")
@with_rewrite_options
def diff_command(
    model: str = typer.Argument(..., help="timm:NAME (rewritten with the options), or a dclsify checkpoint."),
    rewrite: dict | None = None,
    format: str = typer.Option(
        "table", "--format", help="table, unified (a diff of the two graphs, one line per node) or json."
    ),
    trust_code: bool = TRUST_CODE,
) -> None:
    """Show what a rewrite changes in the model's FX graph."""
    from dclsify.surgery.diff import diff_source

    if format not in ("table", "unified", "json"):
        raise typer.BadParameter("must be table, unified or json", param_hint="--format")
    with console.status(f"tracing {escape(model)}"):
        result = _or_fail(diff_source, model, trust_code, **rewrite)
    if format == "json":
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    if format == "unified":
        typer.echo(result.unified(), nl=False)
        return
    table = Table(title=f"{escape(model)}: {len(result.changes)} modules changed", **COMPACT)
    for heading in ("node", "change", "module", "output", "params", "group"):
        table.add_column(heading, justify="left" if heading in ("node", "change", "module") else "right")
    styles = {"replaced": "yellow", "added": "green", "removed": "red"}
    for c in result.changes:
        before = " ".join(part for part in (c.before, c.kernel_before) if part)
        after = " ".join(part for part in (c.after, c.kernel_after) if part)
        table.add_row(
            c.target,
            f"[{styles[c.change]}]{c.change}[/]",
            " -> ".join(part for part in (before, after) if part),
            "" if c.output_shape is None else "x".join(map(str, c.output_shape[1:])),
            f"{c.params_before:,} -> {c.params_after:,}",
            "" if c.stage_group is None else str(c.stage_group),
        )
    print_table(table)
    console.print(
        f"parameters: {result.parameters_before:,} -> {result.parameters_after:,}; output {result.output_shape}"
    )


@app.command("models")
def models_command() -> None:
    """List the model families known to work, and what a default rewrite replaces in each."""
    from dclsify.surgery.rewrite import survey_families

    with console.status("inspecting") as status:
        surveyed = survey_families(progress=lambda name: status.update(f"inspecting {name}"))
    table = Table(title="Families known to work (timm)", **COMPACT)
    for heading in ("family", "models", "depthwise convs in the first (replaced: 7x7)", "stem"):
        table.add_column(heading)
    for family, sizes in surveyed:
        found = ", ".join(f"{n} x {k}" for k, n in sizes.items())
        table.add_row(family.name, ", ".join(family.examples), found, family.stem_note)
    print_table(table)


def _audio_config(sample_rate: int | None, seconds: float | None):
    """The run's clip format from CLI options; None where neither is given (the data's own)."""
    from dclsify.surgery.audio import AudioConfig

    if sample_rate is None and seconds is None:
        return None
    try:
        return AudioConfig(sample_rate=sample_rate or 32000, seconds=seconds or 10.0)
    except ValueError as error:
        fail(str(error))


def _open_data(source: str, audio_dir: Path | None, labels: Path | None, audio):
    from dclsify.pipeline.datasets import open_source
    from dclsify.pipeline.sources import DataError

    try:
        return open_source(source, audio, audio_dir, labels)
    except DataError as error:
        fail(str(error))


DATA_HELP = "HDF5 (a,b or a glob), a segment CSV, a manifest, or a dataset folder (ROOT#fold=1,2)"
SAMPLE_RATE = typer.Option(
    None, "--sample-rate", min=1, help="Resample clips to this rate (default 32000; packed data: its own)."
)
SECONDS = typer.Option(
    None, "--seconds", min=0.01, help="Pad or cut clips to this length (default 10; packed data: its own)."
)
AUDIO_DIR = typer.Option(
    None, "--audio-dir", help="Folder of the clips a segment CSV names (default: the CSV's folder)."
)
LABELS = typer.Option(
    None, "--labels", help="Class list for a manifest: class_labels_indices.csv-like, or one name a line."
)
BLACKLIST = typer.Option(
    None,
    "--blacklist",
    help="Leave out the clips this file names: one clip id a line (a YouTube id or a clip name), "
    "as AudioSet black lists come; # comments; of a CSV, the first column.",
)


# How frame scores become events (dclsify.pipeline.events.EventRules): eval --strong's, shareable
EVENT_THRESHOLD = typer.Option(
    0.5, "--threshold", min=0, max=1, help="Events: a frame score at or above this starts an event."
)
EVENT_LOW = typer.Option(
    None,
    "--low",
    min=0,
    max=1,
    help="Events: an event lasts while its score stays at or above this (default: 0.6 x --threshold).",
)
MEDIAN_FILTER = typer.Option(
    0.25, "--median-filter", min=0, help="Events: seconds of the median filter over frame scores (0: none)."
)
MIN_DURATION = typer.Option(0.1, "--min-duration", min=0, help="Events: shorter events (seconds) are dropped.")
MIN_GAP = typer.Option(0.1, "--min-gap", min=0, help="Events: events of a class closer (seconds) are merged.")


def _event_rules(
    threshold: float, low: float | None, median_filter: float, min_duration: float, min_gap: float, to=None
):
    """The EventRules of the event options, checked (low at most the threshold); a bad value ends the command
    (the message on ``to``: see :func:`fail`)."""
    from dclsify.pipeline.events import EventRules

    try:
        rules = EventRules(threshold, low, median_filter, min_duration, min_gap)
        rules.thresholds(1)
    except ValueError as error:
        fail(str(error), to)
    return rules


CLASSES_SHOWN = 60  # of a longer class list (AudioSet's 527), `dclsify data` prints the first ones


@app.command("data")
def data_command(
    source: str = typer.Argument(
        ..., help=f"The data: {DATA_HELP}; after #: split=train, fold=1,2, subset=esc10, kfold=5 (& between keys)."
    ),
    audio_dir: Path | None = AUDIO_DIR,
    labels: Path | None = LABELS,
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object: layout, classes, multi_label, clips, and splits or folds."
    ),
) -> None:
    """What a --data path holds: its layout, its classes and the clips of each split or fold (nothing is decoded)."""
    from dclsify.pipeline.datasets import LAYOUT_TITLES, describe_data
    from dclsify.pipeline.sources import DataError

    try:
        found = describe_data(source, audio_dir, labels)
    except DataError as error:
        fail(str(error))
    if as_json:
        typer.echo(json.dumps(found.as_dict(), indent=2))
        return
    labels_per_clip = "several labels a clip" if found.multi_label else "one label a clip"
    title = LAYOUT_TITLES.get(found.layout, found.layout)
    say = functools.partial(console.print, markup=False, highlight=False)
    classes = f"{len(found.classes)} class" + ("" if len(found.classes) == 1 else "es")
    say(f"{source}: {title} ({found.layout}), {classes}, {labels_per_clip}")
    parts = [(name, counts) for name, counts in (("split", found.splits), ("fold", found.folds)) if counts]
    total = sum(parts[0][1].values()) if parts else found.clips
    say(f"{found.clips:,} clips" + (f" selected, of {total:,}" if total != found.clips else ""))
    for name, counts in parts:
        table = Table(**COMPACT)
        table.add_column(name, no_wrap=True)
        table.add_column("clips", justify="right", no_wrap=True)
        for part, clips in counts.items():
            table.add_row(escape(part), f"{clips:,}")
        print_table(table)
    more = len(found.classes) - CLASSES_SHOWN
    shown = ", ".join(found.classes[:CLASSES_SHOWN]) + (f", ... and {more} more (--json lists all)" if more > 0 else "")
    say(f"classes: {shown}")


@app.command("pack")
def pack_command(
    source: str = typer.Argument(
        ..., help="A segment CSV, a manifest (.csv with path,labels or .jsonl), or a dataset folder (ROOT#fold=1,2)."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="The HDF5 file to write."),
    audio_dir: Path | None = AUDIO_DIR,
    labels: Path | None = LABELS,
    sample_rate: int = typer.Option(32000, "--sample-rate", min=1, help="Resample every clip to this rate."),
    seconds: float = typer.Option(10.0, "--seconds", min=0.01, help="Pad or cut every clip to this length."),
    workers: int | None = typer.Option(None, min=0, help="Decoding processes (default: one per core)."),
    blacklist: Path | None = BLACKLIST,
) -> None:
    """Decode a segment CSV + folder, a manifest or a dataset folder into one HDF5 file (PANNs layout). Resumable."""

    from dclsify.pipeline.pack import pack
    from dclsify.pipeline.sources import DataError

    audio = _audio_config(sample_rate, seconds)
    with clips_bar("packing", ".0f") as (bar, progress):
        try:
            report = pack(source, output, audio_dir, labels, audio, workers, progress, blacklist)
        except DataError as error:
            fail(str(error))
        except KeyboardInterrupt:
            done = bar.tasks[0].completed
            fail(f"interrupted after {done:.0f} clips; what was packed is kept: run the same command to continue")
    if report.blacklisted is not None:
        console.print(str(report.blacklisted), markup=False)
    if report.skipped:
        table = Table(
            title=f"{len(report.skipped)} clips skipped (all listed in {escape(str(report.skip_report))})", **COMPACT
        )
        for heading in ("clip", "reason", "path"):
            table.add_column(heading)
        for name, path, reason in report.skipped[:20]:
            table.add_row(escape(name), escape(reason), escape(path))
        if len(report.skipped) > 20:
            table.add_row("...", f"{len(report.skipped) - 20} more", escape(str(report.skip_report)))
        print_table(table)
    resumed = f", continuing {report.resumed_from} done before" if report.resumed_from else ""
    console.print(
        f"packed {report.packed} clips of {audio.seconds:g} s at {audio.sample_rate} Hz to {output} "
        f"({report.clips_per_second:.1f} clips/s{resumed})",
        markup=False,
    )


@app.command("show")
def show_command(
    source: str = typer.Argument(..., help=f"The data: {DATA_HELP}."),
    index: int = typer.Option(0, "--index", min=0, help="Which clip."),
    output: Path = typer.Option(Path("spec.png"), "-o", "--output", help="The PNG to write."),
    audio_dir: Path | None = AUDIO_DIR,
    labels: Path | None = LABELS,
    sample_rate: int | None = SAMPLE_RATE,
    seconds: float | None = SECONDS,
    seed: int = typer.Option(0, help="Seed of the augmentation draw."),
) -> None:
    """Draw a clip's waveform and log-mel spectrogram, before and after augmentation."""
    from dclsify.pipeline.show import show_clip

    dataset = _open_data(source, audio_dir, labels, _audio_config(sample_rate, seconds))
    try:
        path = show_clip(dataset, index, output, seed)
    except (IndexError, ValueError) as error:
        fail(str(error))
    except OSError as error:
        fail(f"cannot write {output}: {error.strerror or error}")
    names = ", ".join(dataset.labels(index)) or "no label"
    console.print(f"clip {index} ({dataset.clip_name(index)}: {names}) drawn to {path}", markup=False)


@app.command("bench-data")
def bench_data_command(
    path: str = typer.Argument(..., help=f"The data to read: {DATA_HELP}."),
    batch: int = typer.Option(32, min=1),
    workers: int | None = typer.Option(None, min=0, help="DataLoader workers (default: one per core, at most 8)."),
    device: str = typer.Option("cpu", help="Where the front-end and augmentation run: cpu, cuda, cuda:1, ..."),
    batches: int = typer.Option(20, min=1, help="Batches the loader is timed over."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the results to this JSON file."),
) -> None:
    """Clips per second of the loader (read + collate) and of the front-end + augmentation on the device."""
    from dclsify.pipeline.bench import bench_data
    from dclsify.pipeline.sources import DataError

    _check_device(device)
    with console.status("measuring"):
        try:
            result = bench_data(path, batch, workers, device, batches)
        except DataError as error:
            fail(str(error))
    table = Table(title=f"{escape(path)}: batch {result.batch} of {result.clip_seconds:g}-s clips", **COMPACT)
    for heading in ("stage", "where", "clips/s"):
        table.add_column(heading, justify="right" if heading == "clips/s" else "left", no_wrap=True)
    table.add_row("read + collate (loader)", f"{result.workers} workers", f"{result.loader_clips_per_second:,.0f}")
    table.add_row("log-mel (evaluation)", result.device, f"{result.frontend_clips_per_second:,.0f}")
    table.add_row("augment + log-mel (training)", result.device, f"{result.augment_clips_per_second:,.0f}")
    print_table(table)
    if json_path is not None:
        write_atomically(json_path, json.dumps(result.as_dict(), indent=2) + "\n")
        console.print(f"wrote {json_path}", markup=False)


@app.command("train")
def train_command(
    recipe: str | None = typer.Option(None, help="A built-in recipe (see --list-recipes) or a TOML file."),
    data: str | None = typer.Option(None, help=f"Training data: {DATA_HELP}."),
    eval_data: str | None = typer.Option(
        None, "--eval-data", help="Evaluation data, of the same classes, as --data takes it (ROOT#fold=5)."
    ),
    audio_dir: Path | None = AUDIO_DIR,
    labels: Path | None = LABELS,
    out: Path | None = typer.Option(None, "--out", help="Run directory (default: runs/RECIPE)."),
    overrides: list[str] = typer.Option([], "--set", help="section.key=value, e.g. train.lr=1e-3 (repeatable)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue the run in this directory exactly."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out."),
    trust_code: bool = typer.Option(False, "--trust-code", help="Allow a file: model source to run its Python file."),
    list_keys: bool = typer.Option(False, "--list-keys", help="List every recipe key with its default, and exit."),
    list_recipes: bool = typer.Option(False, "--list-recipes", help="List the built-in recipes, and exit."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Show what the run would use (batch, lr, steps, data, model), without training."
    ),
    processes: int | None = typer.Option(
        None, "--processes", min=1, help="With --dry-run: plan for N processes (default: WORLD_SIZE, else 1)."
    ),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print one JSON object."),
    blacklist: Path | None = BLACKLIST,
    seeds: str | None = typer.Option(
        None, "--seeds", help="Train once per seed (train.seed), e.g. 0,1,2, into OUT/seed-N; summarise the runs."
    ),
) -> None:
    """Train an audio tagger with the paper's recipe (or yours); without --data, on the demo's sound set.
    Knowledge distillation: --set train.teacher=FILE (made by `dclsify logits`), train.kd_weight, kd_temperature.
    Fine-tuning: --recipe finetune (or linear_probe) --set model.source=CHECKPOINT.safetensors."""
    from dclsify.pipeline.cv import STUDY_FILE, repeat_seeds
    from dclsify.pipeline.demo import plan_or_demo, train_or_demo
    from dclsify.pipeline.recipe import RecipeError, default_values, describe_builtin_recipes
    from dclsify.pipeline.sources import DataError
    from dclsify.pipeline.train import TrainError

    if list_recipes:
        for name, description in describe_builtin_recipes().items():
            console.print(f"[bold]{name}[/]: {escape(description)}", soft_wrap=True)
        return
    if list_keys:
        for key, default in default_values().items():
            console.print(f"{key} = {json.dumps(default)}", soft_wrap=True, highlight=False)
        return
    if (processes is not None or as_json) and not dry_run:
        fail("--processes and --json go with --dry-run")
    if dry_run:
        if resume is not None:
            fail("--dry-run plans a new run: --resume continues one as it was recorded")
        try:
            plan = plan_or_demo(
                recipe, overrides, data, out, processes, audio_dir=audio_dir, classes=labels, blacklist=blacklist
            )
        except (RecipeError, DataError, TrainError) as error:
            fail(str(error))
        if as_json:
            print(json.dumps(plan.as_dict(), indent=2))
        else:
            _print_plan(plan)
        return
    if seeds is not None or (resume is not None and (resume / STUDY_FILE).is_file()):
        if blacklist is not None:
            fail("--blacklist does not go with --seeds (or --resume of their study) yet")
        try:
            if resume is not None:
                if seeds or recipe or overrides or data or eval_data or out:
                    fail("--resume continues the runs as they were recorded: give nothing else")
                study = repeat_seeds(None, None, None, resume, (), console=console, resume=True, trust_code=trust_code)
            else:
                if data is None:
                    fail("--seeds needs --data and --eval-data")
                folder = out or Path("runs") / f"seeds-{Path(recipe).stem if recipe else 'default'}"
                options = dict(overwrite=overwrite, trust_code=trust_code, audio_dir=audio_dir, classes=labels)
                study = repeat_seeds(recipe, data, eval_data, folder, seeds, overrides, console, **options)
        except (RecipeError, DataError, TrainError) as error:
            fail(str(error))
        _report_study(study)
        return
    options = dict(overwrite=overwrite, trust_code=trust_code, audio_dir=audio_dir, classes=labels, blacklist=blacklist)
    try:
        result = train_or_demo(recipe, overrides, data, eval_data, out, resume, console, **options)
    except (RecipeError, DataError, TrainError) as error:
        fail(str(error))
    _report_run(result)
    if result.interrupted:
        raise typer.Exit(130)


def _print_plan(plan) -> None:
    """--dry-run's report: the derived values first, then every recipe key as resolved."""
    t, m = plan.recipe.train, plan.recipe.model
    unknown = "? (give --data)"
    lines = [
        (
            "model",
            f"{m.source}, {plan.parameters:,} parameters"
            + ("" if plan.trainable == plan.parameters else f" ({plan.trainable:,} trained)")
            + (f"; frames head ({m.frame_pooling} pooling)" if m.head == "frames" else ""),
        ),
        ("classes", f"{plan.classes} ({plan.classes_from})"),
        ("clips", unknown if plan.clips is None else f"{plan.clips:,}"),
        ("batch", plan.batch.describe()),
        (
            "lr",
            (plan.batch.describe_lr() or "").removeprefix("lr ")
            or f"{plan.batch.lr:.3g}, the recipe's rate at its global batch of {plan.batch.global_batch}",
        ),
        (
            "steps",
            unknown
            if plan.steps is None
            else (
                f"{plan.steps_per_epoch:,} per epoch x {t.epochs} epochs = {plan.steps:,} "
                f"({plan.warmup_steps:,} warm-up)"
            ),
        ),
        (
            "run",
            f"{plan.run_dir}: config.json, metrics.jsonl, curves.png, best.safetensors; "
            f"checkpoints/step_*.pt every {t.checkpoint_every} steps and each epoch, the last {t.keep} kept",
        ),
    ]
    if plan.fine_tuning is not None:
        lines.insert(1, ("source", plan.fine_tuning.describe()))
    for name, text in lines:
        console.print(f"[bold]{name:8}[/]{escape(text)}", soft_wrap=True, highlight=False)
    for section, values in plan.recipe.as_dict().items():
        console.print(f"\n[bold]\\[{section}][/]", highlight=False)
        for key, value in values.items():
            console.print(f"{key} = {json.dumps(value)}", soft_wrap=True, highlight=False)


def _report_study(study) -> None:
    """The table of a cross-validation (or seeds) study: a row per run, then the mean and standard deviation."""
    if study.interrupted:
        command = "cv" if study.folds else "train"
        console.print(f"the study stopped: continue it with `dclsify {command} --resume {escape(str(study.folder))}`")
        raise typer.Exit(130)
    summary = study.summary
    names = list(summary.mean)
    table = Table(**COMPACT)
    folds = any(run.fold is not None for run in summary.runs)
    for heading in (["fold"] if folds else []) + ["seed", *names]:
        table.add_column(heading.replace("_", "-"), justify="right")
    for run in summary.runs:
        figures = [f"{run.metrics[n]:.4f}" if run.metrics.get(n) is not None else "-" for n in names]
        table.add_row(*([run.fold] if folds else []), str(run.seed), *figures)
    lead = [""] if folds else []
    table.add_section()
    table.add_row(*lead, "mean", *(f"{summary.mean[n]:.4f}" for n in names))
    std = [f"{summary.std[n]:.4f}" if summary.std[n] is not None else "-" for n in names]
    table.add_row(*lead, "std", *std)
    print_table(table)
    console.print(
        f"{len(summary.runs)} run{'s' if len(summary.runs) > 1 else ''} in {study.seconds / 60:.1f} min; "
        f"{escape(str(study.folder / 'summary.json'))}, summary.csv"
    )


@app.command("cv")
def cv_command(
    recipe: str | None = typer.Option(None, help="A built-in recipe (see train --list-recipes) or a TOML file."),
    data: str | None = typer.Option(
        None, help="A dataset with folds (ESC-50, UrbanSound8K), or any data to split into --folds k."
    ),
    folds: str = typer.Option(
        "all", help="Held out in turn: all, some folds (1,2,3), or for data without folds their number k."
    ),
    seeds: str = typer.Option("0", help="train.seed of the runs of each fold, e.g. 0,1,2."),
    fold_seed: int = typer.Option(0, "--fold-seed", min=0, help="Seed of the k stratified folds of --folds k."),
    out: Path | None = typer.Option(None, "--out", help="The study's folder (default: runs/cv-RECIPE)."),
    overrides: list[str] = typer.Option([], "--set", help="section.key=value, e.g. train.lr=1e-3 (repeatable)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue the study in this folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the study already in --out."),
    trust_code: bool = typer.Option(False, "--trust-code", help="Allow a file: model source to run its Python file."),
    audio_dir: Path | None = AUDIO_DIR,
    labels: Path | None = LABELS,
) -> None:
    """Cross-validate a recipe: one run per held-out fold (and seed), then the mean +- std of accuracy and mAP.
    Fine-tuning: --recipe finetune --set model.source=CHECKPOINT.safetensors."""
    from dclsify.pipeline.cv import cross_validate
    from dclsify.pipeline.recipe import RecipeError
    from dclsify.pipeline.sources import DataError
    from dclsify.pipeline.train import TrainError

    try:
        if resume is not None:
            if recipe or data or overrides or out or folds != "all" or seeds != "0":
                fail("--resume continues the study as it was recorded: give nothing else")
            study = cross_validate(None, "", resume, console=console, resume=True)
        else:
            if data is None:
                fail("give --data: a dataset with folds, or any data with --folds k")
            folder = out or Path("runs") / f"cv-{Path(recipe).stem if recipe else 'default'}"
            options = dict(trust_code=trust_code, audio_dir=audio_dir, classes=labels)
            study = cross_validate(
                recipe, data, folder, folds, seeds, overrides, fold_seed, console, overwrite=overwrite, **options
            )
    except (RecipeError, DataError, TrainError) as error:
        fail(str(error))
    _report_study(study)


def _report_run(result) -> None:
    minutes = result.seconds / 60
    console.print(
        f"{result.steps} steps in {minutes:.1f} min ({result.clips_per_second:.1f} clips/s); run: "
        + escape(str(result.run_dir))
    )
    if result.best_map is not None:
        console.print(f"best eval mAP {result.best_map:.4f}: {escape(str(result.best_checkpoint))}")
    if result.replaced_clips:
        console.print(f"[yellow]{len(result.replaced_clips)} clips could not be read and were replaced:[/]")
        for path, reason in list(result.replaced_clips.items())[:10]:
            console.print(f"  {escape(path)}: {escape(reason)}", soft_wrap=True)


@app.command("eval")
def eval_command(
    checkpoint: Path = typer.Argument(..., help="A dclsify checkpoint (e.g. a run's best.safetensors)."),
    data: str | None = typer.Option(None, help=f"Evaluation data, of the model's classes: {DATA_HELP}."),
    strong: Path | None = typer.Option(
        None,
        "--strong",
        help="Or strong labels, for event and segment F1 and PSDS: a DCASE TSV (filename onset offset "
        "event_label) of the clips in --audio-dir.",
    ),
    audio_dir: Path | None = typer.Option(
        None, "--audio-dir", help="Folder of the clips a segment CSV or --strong TSV names (default: its folder)."
    ),
    labels: Path | None = LABELS,
    json_output: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    per_class: Path | None = typer.Option(None, "--per-class", help="Write each class's AP to this CSV."),
    batch: int = typer.Option(32, min=1),
    workers: int = typer.Option(0, min=0, help="DataLoader processes."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or fp16 (autocast)."),
    trust_code: bool = typer.Option(False, "--trust-code", help="Allow a file: model source to run its Python file."),
    blacklist: Path | None = BLACKLIST,
    threshold: float = EVENT_THRESHOLD,
    low: float | None = EVENT_LOW,
    median_filter: float = MEDIAN_FILTER,
    min_duration: float = MIN_DURATION,
    min_gap: float = MIN_GAP,
) -> None:
    """mAP, mAUC, d-prime (and accuracy for single-label data) of a checkpoint on evaluation data;
    with --strong, event-based F1, segment-based F1 and PSDS of its sound events."""
    from dclsify.pipeline.evaluate import evaluate
    from dclsify.pipeline.recipe import PRECISIONS
    from dclsify.pipeline.sources import DataError
    from dclsify.surgery.checkpoint import CheckpointError

    _check_device(device)
    if (data is None) == (strong is None):
        fail("give --data (clip-level metrics) or --strong (sound event metrics), one of them")
    if strong is not None:
        given = dict(labels=labels, per_class=per_class, blacklist=blacklist, workers=workers or None)
        for name, value in given.items():
            if value is not None:
                fail(f"--{name.replace('_', '-')} is for --data, not --strong")
        if precision != "fp32":
            fail("--precision is for --data: --strong scores in fp32")
        rules = _event_rules(threshold, low, median_filter, min_duration, min_gap)
        _eval_strong(checkpoint, strong, audio_dir, rules, device, batch, trust_code, json_output)
        return
    if precision not in PRECISIONS:
        raise typer.BadParameter(f"must be one of {', '.join(PRECISIONS)}", param_hint="--precision")
    options = dict(trust_code=trust_code, audio_dir=audio_dir, classes=labels, per_class=per_class, blacklist=blacklist)
    with console.status(f"evaluating {checkpoint}"):
        try:
            result = evaluate(checkpoint, data, batch, workers, device, precision, **options)
        except (CheckpointError, DataError) as error:
            fail(str(error))
        except OSError as error:
            fail(f"cannot write {per_class}: {error.strerror or error}")
    if json_output:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    console.print(f"{escape(str(checkpoint))} on {escape(data)}: {result.clips} clips, {result.classes} classes")
    if result.blacklisted is not None:
        console.print(str(result.blacklisted), markup=False)
    table = Table(**COMPACT)
    for heading in ("metric", "value"):
        table.add_column(heading, justify="right" if heading == "value" else "left")
    table.add_row("mAP", f"{result.mAP:.4f}")
    table.add_row("mAUC", f"{result.mAUC:.4f}")
    table.add_row("d-prime", f"{result.d_prime:.3f}")
    if result.accuracy is not None:
        table.add_row("top-1 accuracy", f"{result.accuracy:.4f}")
    print_table(table)
    if result.unreadable:
        console.print(f"[yellow]{len(result.unreadable)} clips could not be read and were left out:[/]")
        for path, reason in result.unreadable[:10]:
            console.print(f"  {escape(path)}: {escape(reason)}", soft_wrap=True)
    if result.classes_without_positives:
        console.print(
            f"{result.classes_without_positives} classes have no positive clip here: left out of the averages"
        )
    if per_class is not None:
        console.print(f"wrote {per_class}")


def _eval_strong(checkpoint, strong, audio_dir, rules, device, batch, trust_code, json_output) -> None:
    from dclsify.pipeline.sed import ONSET_COLLAR, SEGMENT, SedUnavailable, evaluate_events
    from dclsify.pipeline.sources import DataError
    from dclsify.surgery.checkpoint import CheckpointError

    with clips_bar("scoring", ".1f") as (_, progress):
        try:
            result = evaluate_events(checkpoint, strong, audio_dir, rules, device, trust_code, batch, progress)
        except (CheckpointError, DataError, SedUnavailable) as error:
            fail(str(error))
    if json_output:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    console.print(
        f"{checkpoint} on {strong}: {result.files} files, {result.reference_events} reference events of "
        f"{len(result.classes)} classes, {result.detected_events} detected events",
        markup=False,
        soft_wrap=True,
    )
    table = Table(**COMPACT)
    for heading in ("metric", "value"):
        table.add_column(heading, justify="right" if heading == "value" else "left")
    collar, segment = f"{ONSET_COLLAR * 1000:.0f}-ms collar", f"{SEGMENT:g}-s segments"
    for kind, detail, micro, macro in (
        ("event", collar, result.event_micro, result.event_macro),
        ("segment", segment, result.segment_micro, result.segment_macro),
    ):
        for average, score in (("micro", micro), ("macro", macro)):
            table.add_row(f"{kind}-based F1, {average} ({detail})", f"{score.f1:.4f}")
            table.add_row(f"  precision, {average}", f"{score.precision:.4f}")
            table.add_row(f"  recall, {average}", f"{score.recall:.4f}")
    table.add_row("PSDS1 (DCASE scenario 1)", f"{result.psds1:.4f}")
    table.add_row("PSDS2 (DCASE scenario 2)", f"{result.psds2:.4f}")
    print_table(table)
    if result.unscored_events:
        console.print(f"{result.unscored_events} detected events of classes the labels do not name were left out")


@app.command("demo")
def demo_command(
    folder: Path = typer.Option(Path("dclsify-demo"), "--folder", help="Where the data and the two runs go."),
    overrides: list[str] = typer.Option([], "--set", help="section.key=value for both runs, e.g. train.epochs=2."),
) -> None:
    """Generate a small sound set, train DCLS and its DSC twin on it, and compare them (CPU, minutes)."""
    from dclsify.pipeline.demo import demo
    from dclsify.pipeline.recipe import RecipeError
    from dclsify.pipeline.sources import DataError
    from dclsify.pipeline.train import TrainError

    try:
        result = demo(folder, overrides, console)
    except (RecipeError, DataError, TrainError) as error:
        fail(str(error))
    table = Table(title="held-out evaluation of the demo's sound set", **COMPACT)
    for heading in ("model", "parameters", "mAP", "mAUC", "d-prime", "train + eval"):
        table.add_column(heading, justify="left" if heading == "model" else "right", no_wrap=True)
    for run in result.runs:
        m = run.metrics
        minutes = f"{run.seconds / 60:.1f} min"
        table.add_row(run.name, f"{run.parameters:,}", f"{m.mAP:.3f}", f"{m.mAUC:.3f}", f"{m.d_prime:.2f}", minutes)
    table.add_row("chance", "", f"{result.chance_map:.3f}", "0.500", "0.00", "")
    print_table(table)
    console.print(f"done in {result.seconds / 60:.1f} min; models: {escape(str(folder / 'runs'))}/*/best.safetensors")


@app.command("predict")
def predict_command(
    checkpoint: Path = typer.Argument(..., help="A trained dclsify checkpoint (e.g. a run's best.safetensors)."),
    sounds: list[Path] = typer.Argument(..., help="Sound files, or folders of them (searched recursively)."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Labels shown per sound (with --timeline: classes drawn)."),
    threshold: str | None = typer.Option(
        None,
        help="Show only labels scoring at least this. With --events: a frame score at or above this starts an "
        "event (default 0.5), one number or a CSV of per-class values (columns label, threshold[, low]).",
    ),
    pooling: str = typer.Option("max", help="Pool the windows of a long sound by max or mean."),
    hop: float | None = typer.Option(None, help="Seconds between windows of a long sound (default: half a clip)."),
    json_lines: bool = typer.Option(
        False, "--json", help='One JSON object per sound, for machines ({"source", "error"} for one not read).'
    ),
    events: bool = typer.Option(
        False, "--events", help="Sound events (file, onset, offset, label, score) instead of clip tags."
    ),
    low: float | None = EVENT_LOW,
    median_filter: float = MEDIAN_FILTER,
    min_duration: float = MIN_DURATION,
    min_gap: float = MIN_GAP,
    output_format: str = typer.Option(
        "table",
        "--format",
        help="With --events: table, tsv (DCASE: filename onset offset event_label), csv or json (a line each).",
    ),
    timeline: Path | None = typer.Option(
        None,
        "--timeline",
        help="With --events: draw the log-mel, frame scores and events to this PNG (several sounds: "
        "NAME-<sound>.png beside it).",
    ),
    step: float | None = typer.Option(None, help="With --events: seconds between frames (default: the hop)."),
    device: str = typer.Option("auto", help="auto (cuda where torch sees a GPU), cpu, cuda, cuda:1, ..."),
    workers: int | None = typer.Option(
        None, min=0, help="Processes decoding files ahead (default: none on the CPU, up to 8 with a GPU)."
    ),
    trust_code: bool = typer.Option(False, "--trust-code", help="Allow a file: model source to run its Python file."),
) -> None:
    """Tag sounds with a trained model: the top labels of each, with their scores; or with --events, when
    each sound starts and ends.

    A recording longer than 10 minutes is decoded in blocks as it is scored: memory does not grow with
    its length."""
    from rich.progress import Progress

    from dclsify.pipeline.predict import Tagger, audio_files
    from dclsify.pipeline.sources import AUDIO_EXTENSIONS
    from dclsify.surgery.checkpoint import CheckpointError

    if device != "auto":
        _check_device(device)
    event_only = {"--format": output_format != "table", "--timeline": timeline is not None, "--step": step}
    event_only.update({"--low": low is not None})
    if not events and any(value not in (None, False) for value in event_only.values()):
        given = [name for name, value in event_only.items() if value not in (None, False)]
        fail(f"{', '.join(given)} go with --events")
    if events and output_format not in ("table", "tsv", "csv", "json"):
        fail(f"--format must be table, tsv, csv or json, not {output_format!r}")
    if step is not None and step <= 0:
        fail(f"--step must be positive, got {step:g}")
    try:
        tagger = Tagger(checkpoint, device, pooling, hop, trust_code=trust_code)
    except (CheckpointError, ValueError) as error:
        fail(str(error))
    paths = audio_files(sounds)
    if not paths:
        fail(f"no sound files ({', '.join(AUDIO_EXTENSIONS)}) in {', '.join(map(str, sounds))}")
    if events:
        rules = _predict_event_rules(threshold, low, median_filter, min_duration, min_gap, tagger.class_names)
        kind = "json" if json_lines else output_format
        _print_events(tagger, paths, rules, kind, timeline, step, top_k)
        return
    threshold = None if threshold is None else _number(threshold, "--threshold")
    failures, results = [], []
    quiet = len(paths) < 2 or json_lines or not console.is_terminal  # a bar in piped output is a stray line
    with Progress(console=console, transient=True, disable=quiet) as bar:
        for outcome in bar.track(tagger.predict_files(paths, workers), total=len(paths), description="tagging"):
            if isinstance(outcome, tuple):
                failures.append(outcome)
                if json_lines:  # on stdout, as JSON too: each line of the output parses
                    typer.echo(json.dumps({"source": outcome[0], "error": outcome[1]}))
            elif json_lines:
                typer.echo(json.dumps(outcome.as_dict(top_k, threshold)))
            else:
                results.append(outcome)
    if results:
        table = Table(**COMPACT)
        for heading in ("sound", "label", "score"):
            table.add_column(heading, justify="right" if heading == "score" else "left", overflow="fold")
        for prediction in results:
            top = prediction.top(top_k, threshold) or [("(none above the threshold)", float("nan"))]
            for rank, (label, score) in enumerate(top):
                name = escape(prediction.source) if rank == 0 else ""
                table.add_row(name, escape(label), "" if score != score else f"{score:.3f}")
        print_table(table)
    if not json_lines:
        for path, reason in failures:
            console.print(f"[yellow]warning:[/] {escape(path)}: {escape(reason)}", soft_wrap=True)
    if len(failures) == len(paths):
        if json_lines:
            raise typer.Exit(1)  # the reasons are in the output, one JSON line each
        fail("no sound could be read")


def _number(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        fail(f"{option} must be a number, not {text!r}")
    if not 0 <= value <= 1:
        fail(f"{option} must be in [0, 1], got {value:g}")
    return value


def _predict_event_rules(threshold, low, median_filter, min_duration, min_gap, class_names):
    """predict --events' rules: --threshold a number (default 0.5) or a CSV of per-class thresholds."""
    from dataclasses import replace

    from dclsify.pipeline.events import read_thresholds

    try:
        value = 0.5 if threshold is None else float(threshold)
    except ValueError:  # a file of per-class thresholds
        path = Path(threshold)
        if not path.is_file():
            fail(f"--threshold must be a number or a CSV file; {threshold!r} is neither")
        try:
            thresholds, lows = read_thresholds(path, class_names, 0.5, low)
        except (ValueError, OSError, UnicodeDecodeError) as error:
            fail(f"{path}: {error}" if not str(error).startswith(str(path)) else str(error))
        rules = _event_rules(0.5, None, median_filter, min_duration, min_gap)
        rules = replace(rules, threshold=thresholds, low=lows)
        try:
            rules.thresholds(len(class_names))
        except ValueError as error:
            fail(f"{path}: {error}")
        return rules
    return _event_rules(value, low, median_filter, min_duration, min_gap)


def _print_events(tagger, paths, rules, kind: str, timeline: Path | None, step: float | None, classes: int) -> None:
    """predict --events: each sound's events, as a table or in ``kind`` (tsv, csv, json) on stdout."""
    from rich.progress import Progress

    from dclsify.pipeline.events import detect_events, format_events
    from dclsify.pipeline.predict import LONG_SECONDS
    from dclsify.pipeline.show import draw_timeline
    from dclsify.pipeline.sources import ClipError

    found, failures, drawn = [], [], []
    quiet = len(paths) < 2 or kind != "table" or not console.is_terminal
    header = kind != "json"
    with Progress(console=console, transient=True, disable=quiet) as bar:
        for path in bar.track(paths, description="finding events"):
            try:
                if timeline is None:
                    sound_events = tagger.events(path, rules=rules, step=step)
                else:  # the picture needs the whole sound and its frames: the events come from the same frames
                    mono, source = tagger.mono(path)
                    if len(mono) / tagger.audio.sample_rate > LONG_SECONDS:
                        raise ClipError(
                            f"longer than {LONG_SECONDS / 60:g} minutes: no timeline (leave --timeline out)"
                        )
                    frames = tagger.frames(mono, tagger.audio.sample_rate, step)
                    frames.source = source
                    sound_events = detect_events(
                        frames.times, frames.scores, tagger.class_names, rules, frames.step, frames.seconds, source
                    )
                    picture = timeline if len(paths) == 1 else timeline.with_name(f"{timeline.stem}-{path.stem}.png")
                    high, _ = rules.thresholds(len(tagger.class_names))
                    drawn.append(draw_timeline(mono, tagger.audio, frames, sound_events, picture, classes, high))
            except ClipError as error:
                failures.append((str(path), str(error)))
                continue
            except OSError as error:
                fail(f"cannot write {timeline}: {error.strerror or error}")
            if kind == "table":
                found += sound_events
            else:
                text = format_events(sound_events, kind)
                if not header and kind != "json":
                    text = text.split("\n", 1)[1]  # one header for all the sounds
                typer.echo(text, nl=False)
                header = False
    if kind == "table":
        table = Table(**COMPACT)
        for heading in ("file", "onset", "offset", "label", "score"):
            table.add_column(heading, justify="left" if heading in ("file", "label") else "right", overflow="fold")
        for event in found:
            row = event.as_dict()
            table.add_row(
                escape(row["file"]),
                f"{row['onset']:.3f}",
                f"{row['offset']:.3f}",
                escape(row["label"]),
                f"{row['score']:.3f}",
            )
        if found:
            print_table(table)
        else:
            console.print("no events")
    for path, reason in failures:
        error_console.print(f"[yellow]warning:[/] {escape(path)}: {escape(reason)}", soft_wrap=True)
    for picture in drawn:
        error_console.print(f"wrote {escape(str(picture))}")
    if len(failures) == len(paths):
        fail("no sound could be read")


@app.command("listen")
def listen_command(
    checkpoint: Path = typer.Argument(..., help="A trained dclsify checkpoint (e.g. a run's best.safetensors)."),
    source: str = typer.Argument(..., help="- for standard input (a WAV, or raw PCM with --format), or a sound file."),
    format: str = typer.Option(
        "wav", "--format", help="Standard input: wav (any length; the header gives the rate), or raw PCM: s16le, f32le."
    ),
    rate: int | None = typer.Option(None, "--rate", min=1, help="Raw PCM: its sample rate (required)."),
    channels: int | None = typer.Option(None, "--channels", min=1, help="Raw PCM: interleaved channels (default 1)."),
    realtime: bool = typer.Option(
        False, "--realtime", help="A file: hand it over as it plays, so that the latencies are those of live audio."
    ),
    chunk: float = typer.Option(0.1, "--chunk", help="Seconds of audio read at a time."),
    threshold: float = EVENT_THRESHOLD,
    low: float | None = EVENT_LOW,
    median_filter: float = MEDIAN_FILTER,
    min_duration: float = MIN_DURATION,
    min_gap: float = MIN_GAP,
    step: float | None = typer.Option(None, help="Seconds between frames (default: the front-end's hop)."),
    device: str = typer.Option("auto", help="auto (cuda where torch sees a GPU), cpu, cuda, cuda:1, ..."),
    trust_code: bool = TRUST_CODE,
) -> None:
    """Tag live audio: each sound event as a JSON line on stdout when it starts ({"label", "onset", "score"})
    and again when it ends (with "offset"), times in seconds from the stream's start; at the end, on stderr,
    the latency from a sound's onset (offset) in the input to its start (end) line: min, median, max.

    ffmpeg -i in.mp3 -f wav - | dclsify listen best.safetensors -
    """
    import sys

    from dclsify.pipeline.live import FileStream, StreamError, listen, raw_stream, wav_stream
    from dclsify.pipeline.predict import Tagger
    from dclsify.surgery.checkpoint import CheckpointError

    errors = Console(stderr=True, soft_wrap=True)  # stdout holds the JSON lines alone
    stdin = source == "-"
    if stdin and realtime:
        fail("--realtime paces a file: standard input comes at its own pace", errors)
    if not stdin and (format != "wav" or rate is not None or channels is not None):
        fail("--format, --rate and --channels describe standard input: a file says what it holds", errors)
    if format not in ("wav", "s16le", "f32le"):
        fail(f"--format must be wav, s16le or f32le, not {format!r}", errors)
    if format != "wav" and rate is None:
        fail(f"raw PCM ({format}) needs its rate: --rate", errors)
    if format == "wav" and (rate is not None or channels is not None):
        fail("--rate and --channels are for raw PCM (--format s16le or f32le): a WAV's header gives them", errors)
    if chunk <= 0:
        fail(f"--chunk must be positive, got {chunk:g}", errors)
    if step is not None and step <= 0:
        fail(f"--step must be positive, got {step:g}", errors)
    rules = _event_rules(threshold, low, median_filter, min_duration, min_gap, errors)
    if device != "auto":
        _check_device(device, errors)
    try:
        stream = None if stdin else FileStream(source, chunk, realtime)  # a file is checked before the model loads
        tagger = Tagger(checkpoint, device, trust_code=trust_code)
    except (CheckpointError, ValueError) as error:  # a StreamError too
        fail(str(error), errors)

    def print_line(line) -> None:
        print(json.dumps(line.as_dict()), flush=True)  # at once: a reader of the pipe acts on each line

    try:  # standard input is read once the model is loaded: a live source waits in the pipe meanwhile
        if stream is None:
            stdin_bytes = sys.stdin.buffer
            if format == "wav":
                stream = wav_stream(stdin_bytes, chunk)
            else:
                stream = raw_stream(stdin_bytes, rate, format, channels or 1, chunk)
        report = listen(tagger, stream, stream.sample_rate, rules, step, print_line)
    except StreamError as error:
        fail(str(error), errors)
    except BrokenPipeError:  # the reader of the lines went away (| head): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(1) from None
    if getattr(stream, "dropped_bytes", 0):
        errors.print(
            f"[yellow]warning:[/] the stream ended inside a sample frame: its last {stream.dropped_bytes} bytes "
            "were left out"
        )
    if report.interrupted:
        errors.print("interrupted: the events still open ended there", markup=False)
    errors.print(report.summary(), markup=False, highlight=False, soft_wrap=True)
    errors.print(f"{report.audio_seconds:.2f} s of audio in {report.wall_seconds:.2f} s", markup=False, highlight=False)


@app.command("embed")
def embed_command(
    checkpoint: Path = typer.Argument(..., help="A trained dclsify checkpoint (e.g. a run's best.safetensors)."),
    sounds: list[Path] = typer.Argument(..., help="Sound files, or folders of them (searched recursively)."),
    output: Path = typer.Option(
        ..., "--output", "-o", help="The .npz to write (replaced as a whole, never half-written)."
    ),
    frames: bool = typer.Option(False, "--frames", help="Time-stamped frame embeddings instead of one per file."),
    step: float | None = typer.Option(
        None, help="Seconds between frames with --frames (default: the front-end's hop)."
    ),
    device: str = typer.Option("auto", help="auto (cuda where torch sees a GPU), cpu, cuda, cuda:1, ..."),
    trust_code: bool = typer.Option(False, "--trust-code", help="Allow a file: model source to run its Python file."),
) -> None:
    """Embed sounds with a trained model: what the head's last linear layer sees, in an .npz.

    Without --frames: `names` (the files' paths) and `embeddings` (files x size, float32), a row per name.

    With --frames: `names`, and for the i-th file `embeddings_i` (frames x size, float32) and `timestamps_i`
    (the seconds where each frame starts). Read it with numpy.load.
    """
    from rich.progress import Progress

    from dclsify.pipeline.embed import embed_files
    from dclsify.pipeline.frames import FrameError
    from dclsify.pipeline.predict import Tagger, audio_files
    from dclsify.pipeline.sources import AUDIO_EXTENSIONS
    from dclsify.surgery.checkpoint import CheckpointError

    if device != "auto":
        _check_device(device)
    if step is not None and step <= 0:
        fail(f"--step must be positive, got {step:g}")
    if step is not None and not frames:
        fail("--step is the time between frames: it goes with --frames")
    if output.is_dir():
        fail(f"cannot write {output}: it is a folder")
    try:
        tagger = Tagger(checkpoint, device, trust_code=trust_code)
    except (CheckpointError, ValueError) as error:
        fail(str(error))
    paths = audio_files(sounds)
    if not paths:
        fail(f"no sound files ({', '.join(AUDIO_EXTENSIONS)}) in {', '.join(map(str, sounds))}")
    quiet = len(paths) < 2 or not console.is_terminal  # a bar in piped output is a stray line
    with Progress(console=console, transient=True, disable=quiet) as bar:
        task = bar.add_task("embedding", total=len(paths))
        try:
            report = embed_files(tagger, paths, output, frames, step, lambda done, _: bar.update(task, completed=done))
        except OSError as error:
            fail(f"cannot write {output}: {error.strerror or error}")
        except FrameError as error:  # a head frame outputs do not know: found before any sound is read
            fail(str(error))
    for path, reason in report.failures:
        console.print(f"[yellow]warning:[/] {escape(path)}: {escape(reason)}", soft_wrap=True)
    if not report.written:
        fail("no sound could be read; nothing written")
    kind = "frame embeddings" if frames else "embeddings"
    console.print(f"{kind} of {report.written} files ({report.embedding_size} values each) in {escape(str(output))}")


@app.command("export")
def export_command(
    checkpoint: Path = typer.Argument(..., help="A dclsify checkpoint (e.g. a run's best.safetensors)."),
    output: Path = typer.Option(..., "-o", "--output", help="The file to write."),
    format: str = typer.Option(
        "dense", "--format", help="dense (a dclsify checkpoint of fixed kernels), onnx or torchscript."
    ),
    with_frontend: bool = typer.Option(
        False,
        "--with-frontend",
        help="onnx/torchscript: include the log-mel front-end, so that the model takes (batch, samples) float "
        "waveforms in [-1, 1] at the checkpoint's rate and clip length.",
    ),
    trust_code: bool = TRUST_CODE,
) -> None:
    """Bake every Dcls2d into a fixed kernel and write the model as a dense checkpoint, ONNX or TorchScript,
    checked against the original on random input."""
    from dclsify.pipeline.export import FORMATS, TOLERANCE, ExportError, export
    from dclsify.surgery.checkpoint import CheckpointError

    if format not in FORMATS:
        raise typer.BadParameter("must be dense, onnx or torchscript", param_hint="--format")
    with console.status(f"exporting {escape(str(checkpoint))} to {format}"):
        try:
            report = export(checkpoint, output, format, with_frontend, trust_code)
        except (CheckpointError, ExportError) as error:
            fail(str(error))
        except OSError as error:
            fail(f"cannot write {output}: {error.strerror or error}")
    kind = {"dense": "a dense dclsify checkpoint", "onnx": f"ONNX, opset {report.opset}", "torchscript": "TorchScript"}
    console.print(f"wrote {report.path} ({kind[report.format]})", markup=False)
    shape = ", ".join(map(str, report.input_shape))
    console.print(f"input: {report.input_name} ({shape}): {report.input_description}", markup=False)
    console.print(f"output: logits ({', '.join(map(str, report.output_shape))})", markup=False)
    console.print(
        f"max abs diff of the logits against the original model: {report.max_abs_diff:.2e} (at most {TOLERANCE:.0e})",
        markup=False,
    )


@app.command("kernels")
def kernels_command(
    checkpoint: Path = typer.Argument(..., help="A dclsify checkpoint with Dcls2d layers."),
    output: Path = typer.Option(Path("kernels.png"), "-o", "--output", help="The PNG to write."),
    channels: int = typer.Option(3, min=0, help="Built kernels drawn per group."),
    stats: bool = typer.Option(
        False, "--stats", help="Also print per-group statistics of positions, spreads, weights."
    ),
    json_output: bool = typer.Option(
        False, "--json", help="Print the statistics as JSON (alone on stdout), not a table."
    ),
    trust_code: bool = typer.Option(False, "--trust-code", help="Allow a file: model source to run its Python file."),
) -> None:
    """Draw what a DCLS model learned, per stage (P/SIG group): its elements' positions, sized by |weight| and
    ringed by their spread, and the built kernels of a few channels."""
    from dclsify.surgery.dcls import SIGMA_FLOOR
    from dclsify.surgery.kernels import draw_kernels

    try:
        path, groups = draw_kernels(checkpoint, output, channels, trust_code)
    except ValueError as error:  # a CheckpointError too
        fail(str(error))
    except OSError as error:
        fail(f"cannot write {output}: {error.strerror or error}")
    if json_output:
        typer.echo(json.dumps([group.as_dict() for group in groups], indent=2))
        return
    if stats:
        table = Table(
            caption="group: the layers sharing one P/SIG (a stage), as drawn (its first layer there and in --json). "
            "Positions in taps from the window's centre; at edge: share of elements clamped to the window's border; "
            f"sigma: the std of an element's Gaussian, |SIG| + {SIGMA_FLOOR:g}; |w|: over every layer of the group.",
            caption_justify="left",
            **COMPACT,
        )
        headings = ("group", "layers", "channels", "count", "window", "position std", "mean distance", "at edge")
        for heading in (*headings, "mean sigma", "mean |w|"):
            table.add_column(heading, justify="right")
        for g in groups:
            sigma = "-" if g.mean_sigma is None else f"{g.mean_sigma:.3f}"
            table.add_row(
                str(g.group), str(g.layers), str(g.channels), str(g.count), str(g.window),
                f"{g.position_spread:.2f}", f"{g.mean_distance:.2f}", f"{g.at_edge:.1%}", sigma,
                f"{g.mean_abs_weight:.4f}",
            )  # fmt: skip
        print_table(table)
    console.print(f"drew {escape(str(path))}")


@app.command("logits")
def logits_command(
    checkpoints: list[str] = typer.Argument(
        ...,
        help="The teacher: a trained checkpoint, or several (CHECKPOINT,CHECKPOINT or separate arguments) whose "
        "logits are averaged.",
        show_default=False,
    ),
    data: str = typer.Option(
        ...,
        help=f"The training data to score, as `dclsify train --data` takes it: {DATA_HELP}.",
    ),
    output: Path = typer.Option(..., "-o", "--output", help="The HDF5 file to write, for train.teacher=FILE."),
    audio_dir: Path | None = AUDIO_DIR,
    labels: Path | None = LABELS,
    batch: int = typer.Option(32, min=1),
    workers: int = typer.Option(0, min=0, help="DataLoader processes."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    precision: str = typer.Option(
        "fp32", help="Autocast of the forward pass: fp32, bf16 or fp16 (the logits are stored as float32)."
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace OUTPUT, or an OUTPUT.partial begun with other checkpoints or data.",
    ),
    trust_code: bool = TRUST_CODE,
) -> None:
    """Score every clip of a training set, without augmentation, with a model or the mean logits of several: the
    teacher file of knowledge distillation (dclsify train --set train.teacher=FILE). Resumable: after an
    interruption, the same command continues."""

    from dclsify.pipeline.recipe import PRECISIONS
    from dclsify.pipeline.sources import DataError
    from dclsify.pipeline.teacher import score_to_file
    from dclsify.surgery.checkpoint import CheckpointError

    _check_device(device)
    if precision not in PRECISIONS:
        raise typer.BadParameter(f"must be one of {', '.join(PRECISIONS)}", param_hint="--precision")
    paths = [Path(part.strip()) for argument in checkpoints for part in argument.split(",")]
    if not all(str(path) and str(path) != "." for path in paths):
        fail(f"an empty checkpoint name in {','.join(checkpoints)}: give paths separated by commas")
    options = dict(trust_code=trust_code, audio_dir=audio_dir, classes=labels, overwrite=overwrite)
    with clips_bar("scoring", ".1f") as (bar, progress):
        try:
            report = score_to_file(paths, data, output, batch, workers, device, precision, progress=progress, **options)
        except (DataError, CheckpointError) as error:
            fail(str(error))
        except OSError as error:
            fail(f"cannot write {output}: {error.strerror or error}")
        except KeyboardInterrupt:
            done = bar.tasks[0].completed
            fail(f"interrupted after {done:.0f} clips; what was scored is kept: run the same command to continue")
    models = "one model" if len(paths) == 1 else f"the mean logits of {len(paths)} models"
    resumed = f", continuing {report.resumed_from} done before" if report.resumed_from else ""
    console.print(
        f"scored {report.clips} clips x {report.classes} classes with {models} to {output} "
        f"({report.clips_per_second:.1f} clips/s{resumed})",
        markup=False,
    )
    if report.replaced:
        console.print(
            f"[yellow]{len(report.replaced)} clips could not be read:[/] their rows hold the logits of the clips that "
            "stand in for them in training (the next readable ones): "
            + escape(", ".join(report.replaced[:10]) + (", ..." if len(report.replaced) > 10 else "")),
            soft_wrap=True,
        )
    console.print(f"train with it: dclsify train ... --set train.teacher={escape(json.dumps(str(output)))}")


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    console.print(f"[yellow]warning:[/] {escape(str(message))}")


def main() -> None:
    warnings.showwarning = _print_warning  # one line each, not Python's file:line form
    app()


if __name__ == "__main__":  # python -m dclsify.cli, as python -m dclsify
    main()
