"""The ``dclsify`` command line: thin layers over the documented Python functions."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Model surgery for audio tagging with Dilated Convolution with Learnable Spacings (DCLS).",
)
console = Console()


def fail(message: str) -> None:
    """End the command with one clear line and exit status 1."""
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(1)


def write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder, so ``path`` is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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
        from dclsify import __version__

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
    json_path: Path | None = typer.Option(None, "--json", help="Also write the results to this JSON file."),
) -> None:
    """Time Dcls2d forward+backward against DCLS 0.1.1 and a dense 7x7 depthwise conv."""
    import torch

    from dclsify.surgery import VERSIONS
    from dclsify.surgery.bench import bench_op

    parsed = _parse_shapes(shapes)
    if version not in VERSIONS:
        raise typer.BadParameter(f"must be one of {', '.join(VERSIONS)}", param_hint="--version")
    if count > kernel * kernel:
        raise typer.BadParameter(f"at most kernel^2 = {kernel * kernel}", param_hint="--count")
    try:
        device_ = torch.device(device)
    except RuntimeError:
        fail(f"unknown device {device!r}: use cpu, cuda or cuda:N")
    if device_.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda asked for, but torch sees no CUDA device here")

    with console.status("measuring") as status:
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
        )
    table = Table(
        title=f"Dcls2d forward+backward: batch {batch}, kernel {kernel}, count {count}, {version}, {device}",
        caption="ref = DCLS 0.1.1; 7x7 = dense depthwise 7x7 conv; memory = kernel construction peak",
    )
    headings = ("layer", "algorithm", "ours ms", "ref ms", "ref/ours", "7x7 ms", "ours/7x7", "memory ours/ref")
    for heading in headings:
        table.add_column(heading, justify="right", no_wrap=True)
    for r in results:
        missing = r.reference_ms is None
        table.add_row(
            f"{r.channels}ch {r.height}x{r.width}",
            r.algorithm,
            f"{r.ours_ms:.1f}",
            "-" if missing else f"{r.reference_ms:.1f}",
            "-" if missing else f"{r.speedup:.1f}x",
            f"{r.dense7_ms:.1f}",
            f"{r.vs_dense7:.2f}x",
            f"{r.ours_kernel_bytes / 2**20:.1f} MiB" + ("" if missing else f" / {r.memory_ratio:.3f}"),
        )
    console.print(table)
    if reference and results and results[0].reference_ms is None:
        console.print("DCLS==0.1.1 is not installed: no reference timings (pip install 'dclsify[test]').")
    if json_path is not None:
        write_atomically(json_path, json.dumps([r.as_dict() for r in results], indent=2) + "\n")
        console.print(f"wrote {json_path}")


def main() -> None:
    app()
