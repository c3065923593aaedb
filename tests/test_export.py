"""Export: dense checkpoints, ONNX (onnxruntime) and TorchScript give the original model's logits, with and
without the front-end; a wrong export, a missing extra or a bad input is one clear error and leaves no file."""

import copy
import json
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import soundfile
import torch
from rich.console import Console
from safetensors import safe_open
from typer.testing import CliRunner

from dclsify import CheckpointError, Dcls2d, LargeKernelConv2d, cli, convert, load, save
from dclsify.cli import app
from dclsify.pipeline import export as export_module
from dclsify.pipeline.export import ExportError, export
from dclsify.pipeline.frontend import AudioConfig, LogMel
from dclsify.pipeline.predict import Tagger
from dclsify.pipeline.synth import make_clip
from dclsify.surgery.checkpoint import read_metadata

runner = CliRunner()
AUDIO = AudioConfig(sample_rate=8000, seconds=0.5, n_fft=256, hop_length=64, n_mels=32)  # (32, 63) log-mels
CLASSES = ["low", "middle", "high", "chirp"]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=300))


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A tiny DCLS model, saved as a trained one is: class names, front-end settings, single-label. Its blocks'
    layer scales are 1, not timm's 1e-6, so that every kernel moves the logits, as in a trained model."""
    model = convert(
        "timm:convnext_atto", {"ls_init_value": 1.0}, num_classes=4, kernel=9, count=5, stem="4x4", input_size=(32, 63)
    )
    with torch.no_grad():  # positions and spreads away from their start, so that each stage's kernels are its own
        for layer in (m for m in model.modules() if isinstance(m, Dcls2d)):
            layer.P.add_(torch.randn_like(layer.P)).clamp_(-4, 4)
            layer.SIG.uniform_(0.1, 1.0)
    path = tmp_path_factory.mktemp("export") / "tiny.safetensors"
    return save(model, path, class_names=CLASSES, audio=AUDIO, multi_label=False)


@pytest.fixture(scope="module")
def model(original):
    """The original model, as load() rebuilds it (tests leave it as it is)."""
    return load(original).eval()


def logits(model, inputs):
    with torch.no_grad():
        return model.eval()(inputs)


def waveforms(batch: int) -> torch.Tensor:
    """Tones and noise, as a sound file would give them (int16 / 32768)."""
    t = torch.arange(AUDIO.samples) / AUDIO.sample_rate
    tones = 0.3 * torch.sin(2 * torch.pi * torch.linspace(200, 3000, batch)[:, None] * t)
    return ((tones + 0.05 * torch.randn(batch, AUDIO.samples)) * 32768).round().clamp(-32768, 32767) / 32768


def test_a_dense_checkpoint_loads_baked_with_its_settings(original, model, tmp_path):
    report = export(original, tmp_path / "dense.safetensors")
    assert report.format == "dense" and report.max_abs_diff <= 1e-4 and report.input_shape == ("batch", 1, 32, 63)
    dense = load(report.path)
    assert not any(isinstance(m, Dcls2d) for m in dense.modules())
    baked = [m for m in dense.modules() if isinstance(m, LargeKernelConv2d)]
    assert len(baked) == 12 and baked[0].weight.shape == (40, 1, 9, 9)  # convnext_atto: 12 depthwise convs
    with safe_open(report.path, framework="pt") as reader:
        assert not any(name.endswith((".P", ".SIG")) for name in reader.keys())
    assert (dense.class_names, dense.audio, dense.multi_label) == (CLASSES, AUDIO, False)
    assert read_metadata(report.path)["baked"] and not read_metadata(original)["baked"]
    x = torch.randn(5, 1, 32, 63)
    torch.testing.assert_close(logits(dense, x), logits(model, x), rtol=0, atol=1e-5)
    sound = waveforms(1)  # one clip: the Tagger reads a dense checkpoint as any other
    scores = Tagger(report.path, "cpu")(sound[0], sample_rate=AUDIO.sample_rate).scores
    expected = logits(model, LogMel(AUDIO)(sound)).softmax(-1)[0]  # single-label: a softmax
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-5)
    mixed = copy.deepcopy(model)
    mixed.set_submodule("stages.0.blocks.0.conv_dw", mixed.stages[0].blocks[0].conv_dw.bake())
    with pytest.raises(CheckpointError, match="every Dcls2d baked .* or none: this one is mixed"):
        save(mixed, tmp_path / "mixed.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.safetensors"]


def onnx_logits(path, inputs: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(["logits"], {name: inputs.numpy()})[0])


def test_onnx_takes_log_mels_for_any_batch(original, model, tmp_path):
    report = export(original, tmp_path / "tiny.onnx", "onnx")
    assert report.max_abs_diff <= 1e-4 and report.input_name == "log_mel" and report.opset >= 17
    for batch in (1, 5):
        x = torch.randn(batch, 1, 32, 63)
        torch.testing.assert_close(onnx_logits(report.path, x), logits(model, x), rtol=0, atol=1e-4)
    graph = onnx.load(str(report.path))
    assert [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim] == ["batch", 1, 32, 63]
    assert not any(node.op_type in ("STFT", "DFT") for node in graph.graph.node)
    props = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(props["class_names"]) == CLASSES and json.loads(props["multi_label"]) is False
    assert AudioConfig.from_dict(json.loads(props["audio"])) == AUDIO and props["source"] == "timm:convnext_atto"


def test_onnx_with_the_frontend_takes_waveforms(original, model, tmp_path):
    report = export(original, tmp_path / "tiny.onnx", "onnx", with_frontend=True)
    assert report.max_abs_diff <= 1e-4 and report.input_shape == ("batch", 4000)
    assert report.input_description.startswith("float32 mono waveforms of 0.5 s at 8000 Hz")
    sounds = waveforms(3)
    expected = logits(model, LogMel(AUDIO)(sounds))
    torch.testing.assert_close(onnx_logits(report.path, sounds), expected, rtol=0, atol=1e-4)
    props = {p.key: p.value for p in onnx.load(str(report.path)).metadata_props}
    assert props["input"].startswith("waveform (batch, 4000): float32 mono waveforms of 0.5 s at 8000 Hz")


def test_torchscript_with_the_frontend_from_a_model(original, model, tmp_path):
    report = export(model, tmp_path / "tiny.pt", "torchscript", with_frontend=True)  # a model, not a file
    assert report.max_abs_diff <= 1e-4 and report.input_name == "waveform"
    assert any(isinstance(m, Dcls2d) for m in model.modules())  # the caller's model is left as it was
    extra = {"dclsify.json": ""}
    scripted = torch.jit.load(str(report.path), _extra_files=extra)
    sounds = waveforms(4)
    with torch.no_grad():
        torch.testing.assert_close(scripted(sounds), logits(model, LogMel(AUDIO)(sounds)), rtol=0, atol=1e-4)
    assert json.loads(json.loads(extra["dclsify.json"])["class_names"]) == CLASSES
    # a synthesized clip, as a sound file: the export's scores are those `dclsify predict` gives it
    clip, _ = make_clip(0, "eval", 3, seconds=AUDIO.seconds, sample_rate=AUDIO.sample_rate)
    soundfile.write(tmp_path / "clip.wav", clip, AUDIO.sample_rate, subtype="PCM_16")
    predicted = Tagger(original, "cpu")(tmp_path / "clip.wav").scores
    with torch.no_grad():
        exported = scripted(torch.from_numpy(clip / 32768).float()[None]).softmax(-1)[0]  # single-label
    assert predicted.max() - predicted.min() > 0.05  # scores that tell the classes apart
    np.testing.assert_allclose(exported.numpy(), predicted, rtol=0, atol=1e-5)


def test_what_cannot_be_exported_is_one_clear_error_and_no_file(original, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="goes into onnx and torchscript exports: a dense checkpoint keeps"):
        export(original, out, "dense", with_frontend=True)
    with pytest.raises(ExportError, match="unknown export format 'tflite': use dense, onnx, torchscript"):
        export(original, out, "tflite")
    with pytest.raises(ExportError, match=f"{tmp_path} is a folder: name the file to write"):
        export(original, tmp_path, "dense")
    untrained = convert("timm:convnext_atto", num_classes=4, kernel=9, count=5, stem="4x4", input_size=(32, 63))
    with pytest.raises(ExportError, match="records no front-end settings .* export without it"):
        export(untrained, out, "onnx", with_frontend=True)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.txt is not a readable safetensors file"):
        export(tmp_path / "notes.txt", out, "torchscript")
    torch.save({"w": torch.ones(1)}, tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match=r"weights.pth .*: it is a PyTorch \(torch.save\) file; `dclsify import`"):
        export(tmp_path / "weights.pth", out, "dense")
    (tmp_path / "weights.pth").rename(tmp_path / "misnamed.safetensors")
    with pytest.raises(CheckpointError, match=r"torch.save\) file; once renamed .pth, `dclsify import` makes"):
        export(tmp_path / "misnamed.safetensors", out, "dense")
    with pytest.raises(NotADirectoryError, match="notes.txt is a file, not a folder"):
        export(original, tmp_path / "notes.txt" / "model.onnx", "torchscript")
    for module in ("onnx", "onnxruntime", "onnxscript"):  # as if the extra were not installed
        with monkeypatch.context() as hidden:
            hidden.setitem(sys.modules, module, None)
            with pytest.raises(ExportError, match=rf"needs {module} \(not installed\): pip install 'dclsify\[onnx\]'"):
                export(original, out, "onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["misnamed.safetensors", "notes.txt"]


def spoiled(plain_convolutions):
    """plain_convolutions with one kernel tap changed: the bug an export's check is there to catch."""

    def spoil(model):
        model = plain_convolutions(model)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (9, 9))
        with torch.no_grad():
            conv.weight[0, 0, 4, 4] += 0.01
        return model

    return spoil


def test_export_command(original, model, tmp_path, monkeypatch):
    out = tmp_path / "tiny.pt"
    result = runner.invoke(app, ["export", str(original), "-o", str(out), "--format", "torchscript"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (TorchScript)" in result.output and "input: log_mel (batch, 1, 32, 63)" in result.output
    assert float(result.output.split("against the original model: ")[1].split()[0]) <= 1e-4
    x = torch.randn(2, 1, 32, 63)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(out))(x), logits(model, x), rtol=0, atol=1e-4)
    out.unlink()
    monkeypatch.setattr(export_module, "plain_convolutions", spoiled(export_module.plain_convolutions))
    result = runner.invoke(app, ["export", str(original), "-o", str(out), "--format", "torchscript"])
    assert result.exit_code == 1 and "error: the exported model's logits differ from the original's" in result.output
    assert "more than 0.0001: nothing written" in result.output and not out.exists()
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    result = runner.invoke(app, ["export", str(original), "-o", str(out), "--format", "onnx"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "ONNX export needs onnxscript (not installed): pip install 'dclsify[onnx]'" in result.output
    result = runner.invoke(app, ["export", str(original), "-o", str(out), "--format", "tflite"])
    assert result.exit_code == 2 and "must be dense, onnx or torchscript" in result.output
    result = runner.invoke(app, ["export", str(original), "-o", str(original / "tiny.pt"), "--format", "torchscript"])
    assert result.exit_code == 1
    assert f"error: cannot write {original / 'tiny.pt'}: {original} is a file, not a folder" in result.output
    assert list(tmp_path.iterdir()) == []
