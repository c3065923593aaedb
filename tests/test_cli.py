"""The command line: real runs on tiny shapes, and one clear line for every user error."""

import io
import json
import subprocess
import sys

import pytest
import typer
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from dclsify import __version__, cli
from dclsify.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Tables and errors unwrapped, whatever COLUMNS the shell exported (rich reads it once, at import)."""
    monkeypatch.setattr(cli, "console", Console(width=300))


def test_help_of_the_app_and_of_every_command():
    commands = typer.main.get_command(app).commands  # from the app, so that a command added later is covered too
    assert {"bench", "bench-model", "convert", "diff", "models"} <= set(commands)
    for args in [["--help"], *([name, "--help"] for name in commands)]:
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and result.exception is None, (args, result.exception, result.output)
        assert "Usage" in result.output and "Traceback" not in result.output, args
    assert "KHxKW/SHxSW" in runner.invoke(app, ["convert", "--help"]).output  # help text is not read as markup


def test_bench_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "results" / "bench.json"
    args = ["bench", "--shapes", "8x10x9,16x5x4", "--batch", "2", "--repeats", "1", "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "8x10x9" in result.output and "16x5x4" in result.output
    rows = json.loads(out.read_text())
    assert [(r["channels"], r["height"], r["width"]) for r in rows] == [(8, 10, 9), (16, 5, 4)]
    for row in rows:
        assert row["algorithm"] in {"direct", "channels_last", "fft", "toeplitz"}
        assert row["ours_ms"] > 0 and row["dense7_ms"] > 0
        assert row["dense7_ops"] == 2 and 10 < row["ours_ops"] < 80  # conv and its backward; the kernel's too
        if row["reference_ms"] is not None:  # with the oracle installed: faster and far leaner
            assert row["speedup"] > 1 and 0 < row["memory_ratio"] < 0.1
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # no temporary left behind
    even = ["bench", "--shapes", "4x6x5", "--kernel", "4", "--count", "5", "--batch", "1", "--repeats", "1"]
    assert runner.invoke(app, even).exit_code == 0  # an even kernel: the output is one larger than the input


def test_bench_user_errors_are_one_line_and_non_zero():
    for args, expected in [
        (["--shapes", "96x64"], "expected CxHxW"),
        (["--shapes", "0x4x4"], "expected CxHxW"),
        (["--version", "max"], "gauss, v1"),
        (["--kernel", "3", "--count", "10"], "at most kernel^2 = 9"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--device", "meta"], "unknown device 'meta'"),
        (["--device", "cuda:7"], "--device cuda"),
        (["--algorithm", "fast"], "unknown --algorithm 'fast': use auto, direct, channels_last, fft, toeplitz, triton"),
    ]:
        result = runner.invoke(app, ["bench", *args])
        assert result.exit_code != 0, args
        assert expected in result.output, result.output
        assert "Traceback" not in result.output


def test_bench_times_the_algorithm_asked_for(tmp_path, monkeypatch):
    from dclsify.surgery import conv

    out = tmp_path / "bench.json"
    args = ["bench", "--shapes", "4x6x5", "--kernel", "7", "--count", "5", "--batch", "1", "--repeats", "1"]
    result = runner.invoke(app, [*args, "--algorithm", "toeplitz", "--json", str(out), "--no-reference"])
    assert result.exit_code == 0, result.output
    assert [row["algorithm"] for row in json.loads(out.read_text())] == ["toeplitz"]
    too_large = ["bench", "--shapes", "8x64x62", "--kernel", "7", "--count", "5", "--batch", "1", "--repeats", "1"]
    result = runner.invoke(app, [*too_large, "--algorithm", "toeplitz", "--no-reference"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert " ".join(result.output.split()) == (
        "error: algorithm 'toeplitz' does not apply here: its matrices would hold more than 67108864 elements"
    )
    monkeypatch.setattr(conv, "triton_refusal", lambda device: "it runs on CUDA tensors")
    for command in ("bench", "bench-model"):
        result = runner.invoke(app, [command, "--algorithm", "triton"])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.output.strip() == "error: --algorithm triton cannot run here: it runs on CUDA tensors"


def test_python_dash_m_and_version():
    result = subprocess.run([sys.executable, "-m", "dclsify", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"dclsify {__version__}"


def test_convert_summarises_and_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "atto.safetensors"
    args = ["convert", "timm:convnext_atto", "--kernel", "11", "--count", "9", "--num-classes", "7", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "12 depthwise convs replaced by Dcls2d 11x11/9" in result.output
    assert "64x62" in result.output and "8x7" in result.output  # stage map sizes
    assert "parameters: 3,695,520 before" in result.output
    assert "output on (1, 1, 128, 1001): (1, 7)" in result.output
    from dclsify import load

    model = load(out)
    assert model.head.fc.out_features == 7 and model.stages[0].blocks[0].conv_dw.kernel_count == 9


def test_convert_no_dcls_is_the_baseline(tmp_path):
    out = tmp_path / "dsc.safetensors"
    result = runner.invoke(app, ["convert", "convnext_atto", "--no-dcls", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "depthwise convs replaced" not in result.output and out.exists()


def test_convert_errors_are_one_line_and_write_nothing(tmp_path):
    cases = [
        (["timm:convnext_tny"], "unknown timm model 'convnext_tny'; did you mean convnext_tiny"),
        (["timm:resnet18"], "nothing to replace in ResNet"),
        (["timm:convnext_atto", "--kernel", "5", "--count", "9"], "kernel 5 is smaller than matched kernels"),
        (["timm:convnext_atto", "--count", "600"], "count must be from 1 to kernel^2 = 529"),
        (["timm:convnext_atto", "--sync", "block"], "sync must be one of"),
        (["hub:convnext"], "unknown model source 'hub:convnext'"),
        ([__file__], "is a file, not a model name"),
        (["timm:[/x]"], "unknown timm model '[/x]'"),  # printed as given, not read as rich markup
    ]
    for args, expected in cases:
        result = runner.invoke(app, ["convert", *args, "-o", str(tmp_path / "x.safetensors")])
        assert result.exit_code == 1, (args, result.output)
        assert expected in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
    blocked = tmp_path / "file"
    blocked.write_text("a file where a folder should be")
    result = runner.invoke(app, ["convert", "timm:convnext_atto", "-o", str(blocked / "x.safetensors")])
    assert result.exit_code == 1 and "cannot write" in result.output and "Traceback" not in result.output


def test_diff_table_unified_and_json():
    table = runner.invoke(app, ["diff", "timm:fastvit_t8"])
    assert table.exit_code == 0, table.output
    assert "removed" in table.output and "added" in table.output and "Dcls2d" in table.output
    assert "Conv2d 7x7 -> Dcls2d 23x23" in table.output
    unified = runner.invoke(app, ["diff", "timm:fastvit_t8", "--format", "unified"]).output.splitlines()
    assert unified[:2] == ["--- before", "+++ after"]
    removed, added = _changed_lines(unified)
    assert removed[0].startswith("-stem_0_conv_scale_conv = stem.0.conv_scale.conv(x)  # Conv2d(3, 48, kernel=1x1, ")
    assert added[:2] == [  # the MobileOne stem, 23 nodes, is one conv, which the first stage now reads
        "+stem = stem(x)  # Conv2d(1, 48, kernel=2x16, stride=2x16, padding=0x0, groups=1, bias=False)",
        "+stages_0_downsample = stages.0.downsample(stem)  # Identity",
    ]
    # and nothing else changed: the nodes after the smaller stem are not renumbered
    assert len(added) == 13 and sum("# Dcls2d(" in line for line in added) == 10
    assert added[-1] == "+head_fc = head.fc(head_drop)  # Linear(in_features=768, out_features=527, bias=True)"
    data = json.loads(runner.invoke(app, ["diff", "timm:convnext_atto", "--format", "json"]).output)
    assert data["output_shape"] == [1, 527]
    changes = {c["target"]: c for c in data["changes"]}
    assert changes["stem.0"]["kernel_after"] == "2x16" and changes["stem.0"]["output_shape"] == [1, 40, 64, 62]
    dcls = [c for c in data["changes"] if c["after"] == "Dcls2d"]
    assert len(dcls) == 12 and {c["stage_group"] for c in dcls} == {0, 1, 2, 3}
    # the parameter column adds up: shared P/SIG are charged once, to the first layer of a stage
    delta = sum(c["params_after"] - c["params_before"] for c in data["changes"])
    assert delta == data["parameters_after"] - data["parameters_before"]


def _changed_lines(diff: list[str]) -> tuple[list[str], list[str]]:
    """The ``-`` and ``+`` lines of a unified diff, without its ``---``/``+++`` header."""
    removed = [line for line in diff[2:] if line.startswith("-")]
    return removed, [line for line in diff[2:] if line.startswith("+")]


def test_unified_diff_shows_each_replaced_conv_and_the_stem():
    result = runner.invoke(app, ["diff", "timm:convnext_atto", "--format", "unified"])
    assert result.exit_code == 0, result.output
    diff = result.output.splitlines()
    assert diff[:3] == ["--- before", "+++ after", "@@ -1,12 +1,12 @@"]
    removed, added = _changed_lines(diff)
    assert "-stem_0 = stem.0(x)  # Conv2d(3, 40, kernel=4x4, stride=4x4, padding=0x0, groups=1)" in removed
    assert "+stem_0 = stem.0(x)  # Conv2d(1, 40, kernel=2x16, stride=2x16, padding=0x0, groups=1)" in added
    for stage, (blocks, c) in enumerate([(2, 40), (2, 80), (6, 160), (2, 320)]):
        for block in range(blocks):
            call = f" = stages.{stage}.blocks.{block}.conv_dw("
            [old] = [line for line in removed if call in line]
            [new] = [line for line in added if call in line]
            assert old.endswith(f"# Conv2d({c}, {c}, kernel=7x7, stride=1x1, padding=3x3, groups={c})")
            dcls = f"# Dcls2d({c}, {c}, window=23x23, count=26, stride=1x1, padding=11x11, groups={c}, version=gauss"
            assert new.endswith(f"{dcls}, P/SIG group {stage})")
    assert len(removed) == len(added) == 14  # the stem, 12 convs and head.fc: nothing else
    assert " stages_0_blocks_0_norm_permute = stages_0_blocks_0_conv_dw.permute(0, 2, 3, 1)" in diff  # context


def test_tables_piped_at_80_columns_keep_every_name_whole(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=80))  # what rich falls back to when output is not a terminal
    result = runner.invoke(app, ["diff", "timm:convnext_atto"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= 80  # the module and params columns wrap instead
    words = result.output.split()
    names = [f"stages.{s}.blocks.{b}.conv_dw" for s, blocks in enumerate([2, 2, 6, 2]) for b in range(blocks)]
    for name in ["stem.0", *names, "head.fc"]:
        assert name in words
    assert words.count("Dcls2d") == 12 and words.count("Conv2d") == 14 and words.count("Linear") == 2


def test_a_table_whose_words_cannot_fit_is_printed_whole(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(width=80, file=out))
    table = Table(**cli.COMPACT)
    table.add_column("node")
    table.add_column("module")
    name = "dense_stages.0.0.dense_block0.layers.layers.0.token_mixer.reparam_conv"  # with the longest word: 86 wide
    table.add_row(name, "BatchNormAct2d -> Dcls2d 23x23")
    cli.print_table(table)
    assert out.getvalue().splitlines()[-1].split() == [name, "BatchNormAct2d", "->", "Dcls2d", "23x23"]  # not cut


def test_models_lists_the_families():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    for family in ("convnext", "metaformer", "fastvit", "mambaout", "rdnet", "starnet", "convmixer", "edgenext"):
        assert family in result.output
    assert "12 x 7x7" in result.output  # convnext_atto


def test_bench_model_prints_table_1_and_writes_json(tmp_path, monkeypatch):
    import statistics

    import torch

    from dclsify.pipeline import bench

    real = bench.bench_models
    # convnext_atto on a short spectrogram keeps this a smoke test; the figures are for the benchmark
    monkeypatch.setattr(bench, "bench_models", lambda *a, **k: real(*a, **k, input_size=(64, 160)))
    out = tmp_path / "results" / "model.json"
    args = ["bench-model", "--models", "timm:convnext_atto", "--batch", "1", "--repeats", "2", "--warmup", "0"]
    result = runner.invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert f"torch {torch.__version__}" in result.output and "batch 1 of 1x64x160, fp32" in result.output
    assert "convnext_atto" in result.output and "DCLS/DSC" in result.output and "un-baked" in result.output
    assert [p.name for p in out.parent.iterdir()] == ["model.json"]  # no temporary left behind
    data = json.loads(out.read_text())
    assert data["setup"]["device"] == "cpu" and data["setup"]["threads"] == torch.get_num_threads()
    assert (data["setup"]["batch"], data["setup"]["repeats"], data["setup"]["input_shape"]) == (1, 2, [1, 64, 160])
    assert data["setup"]["algorithm"] == "auto" and "DCLS algorithm auto" in result.output
    [model] = data["models"]
    dsc, dcls, ratio = model["dsc"], model["dcls"], model["ratio"]
    assert model["model"] == "convnext_atto" and set(dsc) == {"params", "gflops", "training", "inference"}
    for measured in (dsc["training"], dsc["inference"], dcls["training"], dcls["inference"], dcls["inference_unbaked"]):
        assert len(measured["samples"]) == 2 and min(measured["samples"]) > 0
        assert measured["median"] == statistics.median(measured["samples"]) == sum(measured["samples"]) / 2
    assert ratio["training"] == pytest.approx(dcls["training"]["median"] / dsc["training"]["median"])
    assert ratio["inference"] == pytest.approx(dcls["inference"]["median"] / dsc["inference"]["median"])
    assert ratio["inference_unbaked"] == pytest.approx(dcls["inference_unbaked"]["median"] / dsc["inference"]["median"])
    # 12 depthwise layers over 1840 channels lose 49 - 26 weights each; the four stages (40 + 80 + 160
    # + 320 channels) gain P and SIG, 2 x 2 x 26 per channel, shared by the stage's layers
    assert dcls["params"] - dsc["params"] == -23 * 1840 + 104 * 600
    assert dsc["params"] == 3_543_047  # timm's convnext_atto, 1-channel 2x16 stem, 527 classes
    assert dcls["gflops"] > dsc["gflops"] > 0 and ratio["gflops"] == pytest.approx(dcls["gflops"] / dsc["gflops"])


def test_bench_model_user_errors_come_before_any_measurement(monkeypatch):
    from dclsify.pipeline import bench

    monkeypatch.setattr(bench, "bench_model", lambda *a, **k: pytest.fail("measured before checking its arguments"))
    for args, expected in [
        (["--models", "convnext_atto,convnext_tny"], "unknown timm model 'convnext_tny'; did you mean convnext_tiny"),
        (["--models", "convnext_atto,,fastvit_sa24"], "has an empty name"),
        (["--models", "file:net.py:build"], "'file:net.py:build' is not a timm model"),
        (["--dtype", "fp64"], "unknown --dtype 'fp64': use fp32, bf16, fp16"),
        (["--dtype", "fp16"], "--dtype fp16 is for CUDA devices"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--batch", "0"], "Invalid value for '--batch'"),
    ]:
        result = runner.invoke(app, ["bench-model", *args])
        assert result.exit_code in (1, 2), args  # 2: typer's usage errors
        assert expected in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output


def test_diff_of_a_checkpoint_against_its_source(tmp_path):
    out = tmp_path / "atto.safetensors"
    assert runner.invoke(app, ["convert", "timm:convnext_atto", "--count", "9", "-o", str(out)]).exit_code == 0
    data = json.loads(runner.invoke(app, ["diff", str(out), "--format", "json"]).output)
    assert data["model"] == "ConvNeXt" and len([c for c in data["changes"] if c["after"] == "Dcls2d"]) == 12
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["diff", str(broken)])
    assert result.exit_code == 1 and "not a readable safetensors file" in result.output


def test_convert_keeping_the_stem_and_head_and_unwritable_json(tmp_path):
    out = tmp_path / "kept.safetensors"
    args = ["convert", "timm:convnext_atto", "--stem", "none", "--num-classes", "0", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "output on (1, 3, 128, 1001): (1, 1000)" in result.output and "classifier: kept" in result.output
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    json_args = ["bench", "--shapes", "4x8x8", "--no-reference", "--repeats", "1", "--json", str(blocker / "x.json")]
    result = runner.invoke(app, json_args)
    assert result.exit_code == 1 and "cannot write" in result.output and "Traceback" not in result.output


@pytest.fixture(scope="module")
def atto_checkpoint(tmp_path_factory):
    from dclsify import convert, save

    model = convert("timm:convnext_atto", kernel=11, count=9, num_classes=7)
    return save(model, tmp_path_factory.mktemp("atto") / "atto.safetensors")


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda data: b"", "it is empty (0 bytes)"),
        (lambda data: data[:-100], "its tensors do not fill the file"),
        (lambda data: data[:8] + b"#" + data[9:], "its header is not JSON"),
    ],
    ids=["zero bytes", "truncated", "header not JSON"],
)
def test_diff_of_a_damaged_checkpoint_is_one_error_line(atto_checkpoint, tmp_path, damage, expected):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(damage(atto_checkpoint.read_bytes()))
    result = runner.invoke(app, ["diff", str(damaged)])
    assert result.exit_code == 1
    assert result.output.startswith("error:") and result.output.count("\n") == 1, result.output
    assert expected in result.output and "Traceback" not in result.output


def test_diff_runs_a_checkpoints_python_file_only_with_trust_code(atto_checkpoint, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    marker = tmp_path / "ran"
    script = tmp_path / "model.py"
    script.write_text(
        f"import pathlib, timm\npathlib.Path({str(marker)!r}).touch()\n"
        "def build():\n    return timm.create_model('convnext_atto')\n"
    )
    with safe_open(atto_checkpoint, framework="pt") as reader:
        tensors = {k: reader.get_tensor(k) for k in reader.keys()}
        metadata = {**reader.metadata(), "source": f"file:{script}:build"}
    path = tmp_path / "shared.safetensors"
    save_file(tensors, path, metadata=metadata)
    refused = runner.invoke(app, ["diff", str(path)])
    assert refused.exit_code == 1 and f"would run the Python file {script}" in refused.output
    assert "--trust-code" in refused.output and not marker.exists()
    trusted = runner.invoke(app, ["diff", str(path), "--trust-code", "--format", "json"])
    assert trusted.exit_code == 0, trusted.output
    assert marker.exists() and json.loads(trusted.output)["model"] == "ConvNeXt"


def test_error_messages_are_text_not_markup(atto_checkpoint, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(atto_checkpoint, framework="pt") as reader:
        tensors = {k: reader.get_tensor(k) for k in reader.keys()}
        metadata = {**reader.metadata(), "source": "hub:[/b]"}  # rich would take [/b] for a closing tag
    save_file(tensors, tmp_path / "odd.safetensors", metadata=metadata)
    result = runner.invoke(app, ["diff", str(tmp_path / "odd.safetensors")])
    assert result.exit_code == 1 and "got 'hub:[/b]'" in result.output and "Traceback" not in result.output
