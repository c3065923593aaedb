"""The command line: real runs on tiny shapes, and one clear line for every user error."""

import json
import subprocess
import sys

from typer.testing import CliRunner

from dclsify import __version__
from dclsify.cli import app

runner = CliRunner()


def test_bench_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "results" / "bench.json"
    args = ["bench", "--shapes", "8x10x9,16x5x4", "--batch", "2", "--repeats", "1", "--json", str(out)]
    result = runner.invoke(app, args, env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "8ch 10x9" in result.output and "16ch 5x4" in result.output
    rows = json.loads(out.read_text())
    assert [(r["channels"], r["height"], r["width"]) for r in rows] == [(8, 10, 9), (16, 5, 4)]
    for row in rows:
        assert row["algorithm"] in {"direct", "channels_last", "fft", "toeplitz"}
        assert row["ours_ms"] > 0 and row["dense7_ms"] > 0
        if row["reference_ms"] is not None:  # with the oracle installed: faster and far leaner
            assert row["speedup"] > 1 and 0 < row["memory_ratio"] < 0.1
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # no temporary left behind


def test_bench_user_errors_are_one_line_and_non_zero():
    for args, expected in [
        (["--shapes", "96x64"], "expected CxHxW"),
        (["--shapes", "0x4x4"], "expected CxHxW"),
        (["--version", "max"], "gauss, v1"),
        (["--kernel", "3", "--count", "10"], "at most kernel^2 = 9"),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ]:
        result = runner.invoke(app, ["bench", *args], env={"COLUMNS": "200"})
        assert result.exit_code != 0, args
        assert expected in result.output, result.output
        assert "Traceback" not in result.output


def test_python_dash_m_and_version():
    result = subprocess.run([sys.executable, "-m", "dclsify", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"dclsify {__version__}"
