"""What a DCLS model learned: per-group statistics with known answers, and the kernels plot."""

import json

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import dclsify
from dclsify import cli
from dclsify.cli import app
from dclsify.surgery.kernels import dcls_groups, kernel_stats, plot_kernels

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=200))


def test_group_statistics_have_the_known_answers():
    model = dclsify.convert("timm:convnext_atto", kernel=11, count=9, num_classes=5)
    groups = dcls_groups(model)
    assert [len(members) for members in groups.values()] == [2, 2, 6, 2]  # convnext_atto's stages
    fresh = kernel_stats(model)
    assert [g.channels for g in fresh] == [40, 80, 160, 320] and all(g.count == 9 and g.window == 11 for g in fresh)
    assert all(g.mean_sigma == pytest.approx(0.23 + 0.27) for g in fresh)  # SIG's initial value, plus the floor
    assert all(0.4 < g.position_spread < 0.6 for g in fresh)  # P ~ N(0, 0.5) at first
    layer = groups[0][0][1]
    with torch.no_grad():
        layer.P.zero_()
        layer.P[0, :, :, :3] = 5.0  # three of nine elements pushed to the right edge (11 // 2 = 5)
        layer.P[1, :, :, :3] = 0.0
        for _, member in groups[0]:
            member.weight.fill_(-0.5)
    first = kernel_stats(model)[0]
    assert first.at_edge == pytest.approx(3 / 9) and first.mean_distance == pytest.approx(5 * 3 / 9)
    assert first.mean_abs_weight == pytest.approx(0.5) and first.layers == 2


def test_kernels_command_draws_and_reports(tmp_path):
    dcls, dsc = tmp_path / "dcls.safetensors", tmp_path / "dsc.safetensors"
    dclsify.save(dclsify.convert("timm:convnext_atto", kernel=11, count=9, num_classes=5), dcls)
    dclsify.save(dclsify.convert("timm:convnext_atto", dcls=False, num_classes=5), dsc)
    png = tmp_path / "new" / "folder" / "k.png"
    result = runner.invoke(
        app, ["kernels", str(dcls), "-o", str(png), "--stats", "--channels", "50"]
    )  # > 40 in stage 0
    assert result.exit_code == 0, result.output
    assert "mean sigma" in result.output and png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 30_000
    assert [p.name for p in png.parent.iterdir()] == ["k.png"]  # no temporary left behind
    data = json.loads(runner.invoke(app, ["kernels", str(dcls), "-o", str(png), "--json"]).output)  # --json alone
    assert [g["group"] for g in data] == [0, 1, 2, 3] and data[2]["layers"] == 6
    assert data[1]["first_layer"] == "stages.1.blocks.0.conv_dw"
    refused = runner.invoke(app, ["kernels", str(dsc), "-o", str(tmp_path / "none.png")])
    assert refused.exit_code == 1 and "no Dcls2d layer" in refused.output and not (tmp_path / "none.png").exists()
    with pytest.raises(ValueError, match="no Dcls2d layer"):
        plot_kernels(dclsify.load(dsc), tmp_path / "x.png")


def test_the_figure_draws_an_element_where_its_built_kernel_peaks(tmp_path, monkeypatch):
    # P[0] is the offset across (columns: time), P[1] up (rows: frequency): in the scatter of positions
    # and in the image of the built kernel, both must land at (3, -2) in the figure's data frame
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure plot_kernels would close
    layer = dclsify.Dcls2d(1, 1, 1, dilated_kernel_size=(9, 11), groups=1)
    with torch.no_grad():
        layer.P.copy_(torch.tensor([3.0, -2.0]).view(2, 1, 1, 1))
        layer.weight.fill_(1.0)
    plot_kernels(torch.nn.Sequential(layer), tmp_path / "one.png", channels=1)
    positions, built = figures[0].axes[:2]
    assert positions.collections[-1].get_offsets().tolist() == [[3.0, -2.0]]
    image = built.images[0]
    rows, columns = image.get_array().shape
    left, right, bottom, top = image.get_extent()
    row, column = divmod(int(image.get_array().argmax()), columns)
    peak = (left + (column + 0.5) * (right - left) / columns, bottom + (row + 0.5) * (top - bottom) / rows)
    assert (rows, columns) == (9, 11) and peak == (3.0, -2.0) and image.origin == "lower"
    assert built.collections[-1].get_offsets().tolist() == [[3.0, -2.0]]  # the element drawn on its kernel
