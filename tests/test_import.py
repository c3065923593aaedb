"""The converter: the paper's ConvNeXt checkpoints (against our own implementation of the
authors' model), timm ImageNet weights, the report, --strict, and the import command."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
import torch.nn.functional as F
from dcls_audio import check_exports, check_layout, random_state_dict
from safetensors.torch import save_file
from timm.layers import resample_patch_embed
from torch import nn
from typer.testing import CliRunner

import dclsify
from dclsify.cli import app
from dclsify.surgery.checkpoint import CheckpointError, read_metadata


class GaussDcls(nn.Module):
    """DCLS-Gauss as NOTES section 1 states it, written out densely: each element a 2-D
    Gaussian of std |SIG| + 0.27 at P + window//2 (P[0] along the width), normalised over
    the window (+1e-7), times its weight; the kernel is their sum."""

    def __init__(self, channels: int, count: int = 26, window: int = 23, shared=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, 1, count) * 0.3)
        self.P = shared[0] if shared else nn.Parameter(torch.randn(2, channels, 1, count) * 4)
        self.SIG = shared[1] if shared else nn.Parameter(torch.rand(2, channels, 1, count) * 2)
        self.bias = nn.Parameter(torch.randn(channels) * 0.1)
        self.window = window

    def kernel(self) -> torch.Tensor:
        grid = torch.arange(self.window, dtype=torch.float64)
        centre = (self.P.double() + self.window // 2).unsqueeze(-1)
        std = (self.SIG.double().abs() + 0.27).unsqueeze(-1)
        along = torch.exp(-0.5 * ((grid - centre) / std) ** 2)  # (2, C, 1, N, window)
        element = along[1].unsqueeze(-1) * along[0].unsqueeze(-2)  # (C, 1, N, height, width)
        element = element / (element.sum((-2, -1), keepdim=True) + 1e-7)
        return (self.weight.double()[..., None, None] * element).sum(2).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel(), self.bias, padding=self.window // 2, groups=x.shape[1])


class ChannelsFirstNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map, written out."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + torch.randn(channels) * 0.2)
        self.bias = nn.Parameter(torch.randn(channels) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        variance = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(variance + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Block(nn.Module):
    def __init__(self, dim: int, dcls: bool, shared) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        if dcls:
            self.dwconv = GaussDcls(dim, shared=shared)
        else:
            self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class AuthorsConvNeXt(nn.Module):
    """ConvNeXt-T audio as DCLS-Audio computes it (its names, hence its state-dict layout):
    a (2, 16) stem + channels-first LayerNorm, LayerNorm + 2x2 conv between stages, blocks of
    depthwise conv (or DCLS-Gauss 23/26, positions shared within a stage), LayerNorm, MLP,
    layer scale; global mean, LayerNorm, linear head."""

    def __init__(self, dcls: bool, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), classes: int = 527) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(1, dims[0], (2, 16), (2, 16)), ChannelsFirstNorm(dims[0]))]
            + [nn.Sequential(ChannelsFirstNorm(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, 2)) for i in range(3)]
        )
        self.stages = nn.ModuleList()
        for depth, dim in zip(depths, dims, strict=True):
            first = Block(dim, dcls, None)
            shared = (first.dwconv.P, first.dwconv.SIG) if dcls else None
            self.stages.append(nn.Sequential(first, *(Block(dim, dcls, shared) for _ in range(depth - 1))))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], classes)
        with torch.no_grad():  # every term matters: no zero biases, no unit norms
            for name, parameter in self.named_parameters():
                if name.endswith("bias") or name.startswith("norm."):
                    parameter.normal_(0, 0.2)
            self.head.weight.normal_(0, 0.1)  # logits of a few units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for downsample, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(downsample(x))
        return self.head(self.norm(x.mean((-2, -1))))


def test_reference_dcls_layer_is_the_dcls_package():
    modules = pytest.importorskip("DCLS.construct.modules")
    torch.manual_seed(0)
    ours = GaussDcls(8)
    theirs = modules.Dcls2d(8, 8, kernel_count=26, dilated_kernel_size=23, padding=11, groups=8, version="gauss")
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 12, 30)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dcls", [False, True], ids=["dsc", "dcls"])
def test_paper_convnext_checkpoint_imports_with_the_same_logits(tmp_path, dcls):
    torch.manual_seed(1)
    reference = AuthorsConvNeXt(dcls).eval()
    name = "convnext_dcls_audio_tiny" if dcls else "convnext_audio_tiny"
    check_layout(reference.state_dict(), name)  # the released file's keys, shapes, sharing and size
    path = tmp_path / "released.pth"
    torch.save({"model": reference.state_dict(), "epoch": 59}, path)

    model = dclsify.import_checkpoint(path).eval()

    assert model.imported.model == name
    assert model.imported.problems == model.imported.initialised == []
    assert len(model.imported.loaded) == len(reference.state_dict())
    assert len(model.class_names) == 527 and model.class_names[0] == "Speech" and model.multi_label
    assert model.audio.sample_rate == 32000 and model.audio.n_mels == 128
    x = torch.randn(2, 1, 128, 256)
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert expected.abs().max() > 1  # logits of a size that would show a wrong term
    assert (got - expected).abs().max() <= 1e-4
    if dcls:
        check_exports(model, reference, tmp_path)


def test_import_writes_a_checkpoint_with_the_weights_and_settings(tmp_path):
    released = random_state_dict("convnext_dcls_audio_tiny")
    path = tmp_path / "released.pth"
    torch.save({"model": released}, path)
    result = CliRunner().invoke(app, ["import", str(path), "-o", str(tmp_path / "audio.safetensors")])
    assert result.exit_code == 0, result.output
    assert "convnext_dcls_audio_tiny (timm:convnext_tiny)" in result.output and "loaded 218 tensors" in result.output
    model = dclsify.load(tmp_path / "audio.safetensors")
    own = model.state_dict()
    for theirs, ours in [
        ("stages.2.8.dwconv.P", "stages.2.blocks.8.conv_dw.P"),
        ("stages.2.8.dwconv.weight", "stages.2.blocks.8.conv_dw.weight"),
        ("downsample_layers.0.0.weight", "stem.0.weight"),
        ("head.weight", "head.fc.weight"),
    ]:
        assert torch.equal(own[ours], released[theirs])
    assert len(model.class_names) == 527 and model.audio.hop_length == 320 and model.multi_label
    assert read_metadata(tmp_path / "audio.safetensors")["pretrained"] == str(path)  # provenance


def test_a_file_that_does_not_fit_is_reported_and_refused_by_strict(tmp_path):
    state_dict = random_state_dict("convnext_dcls_audio_tiny")
    state_dict["stages.0.1.dwconv.P"] = state_dict["stages.0.1.dwconv.P"] + 1  # no longer the stage's shared P
    state_dict["stages.3.2.gamma"] = torch.ones(5)
    state_dict["stages.3.2.extra"] = torch.ones(5)
    state_dict["stages.2.9.pwconv1.weight"] = torch.ones(1536, 384)  # a tenth block (ConvNeXt-S has 27)
    del state_dict["head.bias"]
    path = tmp_path / "damaged.pth"
    torch.save({"model": state_dict}, path)

    problems = dict(dclsify.import_checkpoint(path).imported.problems)

    assert problems == {
        "stages.0.blocks.1.conv_dw.P": "differs from stages.0.blocks.0.conv_dw.P, which this model shares with it",
        "stages.3.blocks.2.gamma": "shape (5,) in the file, (768,) in the model",
        "stages.3.blocks.2.extra": "in the file, but the model has no such tensor",
        "stages.2.9.pwconv1.weight": "in the file, but the model has no such tensor",
        "head.fc.bias": "the model's, missing from the file: left as initialised",
    }
    result = CliRunner().invoke(app, ["import", str(path), "-o", str(tmp_path / "x.safetensors"), "--strict"])
    assert result.exit_code == 1
    assert "damaged.pth: 5 tensors do not fit convnext_dcls_audio_tiny" in " ".join(result.output.split())
    assert not (tmp_path / "x.safetensors").exists()


def test_model_named_and_files_refused(tmp_path):
    state_dict = random_state_dict("convnext_audio_tiny")
    torch.save({"model": state_dict}, tmp_path / "dsc.pth")
    # --model overrides detection: a DSC file read as the DCLS model leaves the Dcls2d tensors out
    model = dclsify.import_checkpoint(tmp_path / "dsc.pth", model="convnext_dcls_audio_tiny")
    assert any("shape (96, 1, 7, 7) in the file" in why for _, why in model.imported.problems)
    torch.save({"model": {"a.weight": torch.ones(1)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not one of the paper's released models.*--model"):
        dclsify.import_checkpoint(tmp_path / "other.pth")
    rgb = {**state_dict, "downsample_layers.0.0.weight": torch.ones(96, 3, 4, 4)}  # the original ImageNet layout
    torch.save({"model": rgb}, tmp_path / "imagenet.pth")
    with pytest.raises(CheckpointError, match="not one of the paper's released models"):
        dclsify.import_checkpoint(tmp_path / "imagenet.pth")
    with pytest.raises(CheckpointError, match="imported as released: kernel=17, stem='init' apply to timm weights"):
        dclsify.import_checkpoint(tmp_path / "dsc.pth", kernel=17, stem="init")
    result = CliRunner().invoke(app, ["import", str(tmp_path / "dsc.pth"), "-o", str(tmp_path)])
    assert result.exit_code == 1 and "is a folder" in " ".join(result.output.split())
    out = tmp_path / "dsc.pth" / "x.safetensors"  # a file where a folder should be: mkdir said "File exists"
    result = CliRunner().invoke(app, ["import", str(tmp_path / "dsc.pth"), "-o", str(out)])
    assert result.exit_code == 1 and "dsc.pth is a file, not a folder" in " ".join(result.output.split())
    with pytest.raises(CheckpointError, match="unknown model 'convnext'"):
        dclsify.import_checkpoint(tmp_path / "dsc.pth", model="convnext")
    # another model's file: nothing fits, refused whatever --strict says (it used to write an untrained model)
    other = {"conv1.weight": torch.ones(64, 3, 7, 7), "fc.weight": torch.ones(1000, 512)}  # resnet's names
    torch.save(other, tmp_path / "resnet.pth")
    for named in ("convnext_dcls_audio_tiny", "timm:convnext_atto"):  # timm's own filter failed on fc.weight
        written = tmp_path / "resnet.safetensors"
        result = CliRunner().invoke(app, ["import", str(tmp_path / "resnet.pth"), "--model", named, "-o", str(written)])
        assert result.exit_code == 1 and result.output.startswith("error:") and "Traceback" not in result.output
        assert f"resnet.pth: none of its tensors fit {named} (conv1.weight: in the file, but the model has no such" in (
            " ".join(result.output.split())
        )
        assert not written.exists()
    # a training script's arguments beside the weights: unpickling them would run argparse's code
    torch.save({"model": state_dict, "args": argparse.Namespace(lr=4e-3)}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match=r"pickled Python objects.*refused \(the first: argparse.Namespace\)"):
        dclsify.import_checkpoint(tmp_path / "pickled.pth")


@pytest.fixture(scope="module")
def imagenet_convnext(tmp_path_factory):
    """A timm convnext_atto with random "ImageNet" weights (RGB stem, 1000 classes), as a file."""
    torch.manual_seed(2)
    model = timm.create_model("convnext_atto")
    path = tmp_path_factory.mktemp("imagenet") / "convnext_atto.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model.state_dict(), path


def test_imagenet_weights_adapted_into_the_dcls_model(imagenet_convnext):
    weights, path = imagenet_convnext
    model = dclsify.import_checkpoint(path, model="timm:convnext_atto", strict=True, num_classes=10)
    report, own = model.imported, model.state_dict()

    assert own["stem.0.weight"].shape == (40, 1, 2, 16)
    assert report.adapted == [("stem.0.weight", "summed over its 3 input channels, resized 4x4 -> 2x16")]
    assert dict(report.dropped) == {
        "head.fc.weight": "the ImageNet head",
        "head.fc.bias": "the ImageNet head",
        **{f"{r.name}.weight": "the dense 7x7 kernel (now a Dcls2d)" for r in model.dclsify.replaced},
    }
    assert {key for key, _ in report.initialised} == {"head.fc.weight", "head.fc.bias"} | {
        f"{r.name}.{t}" for r in model.dclsify.replaced for t in ("weight", "P", "SIG")
    }
    for key in ("stages.2.blocks.3.mlp.fc1.weight", "stages.1.downsample.1.weight", "head.norm.bias", "stem.1.weight"):
        assert torch.equal(own[key], weights[key])
    assert torch.equal(own["stages.0.blocks.0.conv_dw.bias"], weights["stages.0.blocks.0.conv_dw.bias"])
    assert own["head.fc.weight"].shape == (10, 320)


def test_the_rgb_stem_is_summed_over_colours_then_resized(tmp_path):
    colour = torch.randn(40, 1, 4, 4)
    stems = {}
    for name, rgb in (
        ("grey", torch.cat([colour] * 3, 1)),
        ("red", torch.cat([3 * colour, 0 * colour, 0 * colour], 1)),
    ):
        save_file({"stem.0.weight": rgb}, tmp_path / f"{name}.safetensors")
        stems[name] = dclsify.import_checkpoint(tmp_path / f"{name}.safetensors", model="timm:convnext_atto")
    grey, red = (stems[n].state_dict()["stem.0.weight"] for n in ("grey", "red"))
    torch.testing.assert_close(grey, red)  # the same sum over colours: the same audio stem
    torch.testing.assert_close(grey, resample_patch_embed(3 * colour, [2, 16]))  # the sum, not the mean
    save_file({"stem.0.weight": torch.cat([colour, -colour, 0 * colour], 1)}, tmp_path / "cancel.safetensors")
    cancelled = dclsify.import_checkpoint(tmp_path / "cancel.safetensors", model="timm:convnext_atto")
    assert cancelled.state_dict()["stem.0.weight"].abs().max() == 0


def test_imagenet_stem_for_three_input_channels_keeps_its_colours(imagenet_convnext):
    weights, path = imagenet_convnext  # summed to one channel, it did not fit a 3-channel audio stem
    model = dclsify.import_checkpoint(path, model="timm:convnext_atto", strict=True, in_chans=3)
    assert model.imported.adapted == [("stem.0.weight", "resized 4x4 -> 2x16")]
    torch.testing.assert_close(
        model.state_dict()["stem.0.weight"], resample_patch_embed(weights["stem.0.weight"], [2, 16])
    )


def test_a_stem_that_is_not_rgb_starts_afresh_and_is_reported(tmp_path):
    # timm's adapt_input_conv asserts (4 colours) or raises (one channel made two): neither may reach the user
    for colours, in_chans in ((4, 1), (1, 2)):
        path = tmp_path / f"stem{colours}.safetensors"
        save_file({"stem.0.weight": torch.randn(40, colours, 4, 4), "stem.1.weight": torch.ones(40)}, path)
        model = dclsify.import_checkpoint(path, model="timm:convnext_atto", in_chans=in_chans)
        assert model.imported.adapted == []
        assert dict(model.imported.dropped)["stem.0.weight"] == "the RGB stem"
        assert dict(model.imported.initialised)["stem.0.weight"] == "new: the RGB stem has another form"
        assert model.state_dict()["stem.0.weight"].shape == (40, in_chans, 2, 16)
    save_file({"stem.0.weight": torch.randn(40, 1, 2, 16)}, tmp_path / "audio.safetensors")  # already fits
    fits = dclsify.import_checkpoint(tmp_path / "audio.safetensors", model="timm:convnext_atto")
    assert fits.imported.adapted == [] and "stem.0.weight" in fits.imported.loaded


def test_imagenet_weights_into_the_dsc_twin_and_a_fresh_stem(imagenet_convnext):
    weights, path = imagenet_convnext
    model = dclsify.import_checkpoint(path, model="timm:convnext_atto", stem="init", dcls=False)
    own = model.state_dict()
    assert torch.equal(own["stages.3.blocks.1.conv_dw.weight"], weights["stages.3.blocks.1.conv_dw.weight"])
    assert model.imported.adapted == [] and model.imported.problems == []
    assert dict(model.imported.initialised)["stem.0.weight"] == "re-initialised (stem=init)"
    assert dict(model.imported.dropped)["stem.0.weight"] == "the RGB stem"
    assert own["head.fc.weight"].shape == (527, 320)


def test_import_command_reports_timm_weights(imagenet_convnext, tmp_path):
    _, path = imagenet_convnext
    out = tmp_path / "audio.safetensors"
    result = CliRunner().invoke(app, ["import", str(path), "--model", "timm:convnext_atto", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = [line.split()[0] for line in result.output.splitlines() if line.strip()]
    assert rows.count("adapted") == 1 and rows.count("dropped") == 2 and rows.count("initialised") == 2
    assert "stem.0.weight" in result.output and "(12 each)" in result.output
    assert dclsify.load(out).class_names is None and read_metadata(out)["pretrained"] == str(path)


def test_convert_pretrained_is_the_import_of_timm_weights(imagenet_convnext, tmp_path):
    """`convert --pretrained` and `import --model timm:NAME` are one path: the same weights, the same report."""
    _, path = imagenet_convnext
    converted, imported = tmp_path / "converted.safetensors", tmp_path / "imported.safetensors"
    args = ["--model", "timm:convnext_atto", "--num-classes", "10", "--kernel", "9", "--count", "5"]
    result = CliRunner().invoke(app, ["import", str(path), "-o", str(imported), *args])
    assert result.exit_code == 0, result.output
    report = result.output[result.output.index("loaded") : result.output.index("wrote")]
    args = ["timm:convnext_atto", "--pretrained", str(path), "--num-classes", "10", "--kernel", "9", "--count", "5"]
    result = CliRunner().invoke(app, ["convert", *args, "-o", str(converted)])
    assert result.exit_code == 0, result.output
    assert f"{path}: timm:convnext_atto's weights" in " ".join(result.output.split())
    assert report in result.output and "summed over its 3 input" in report and "the ImageNet head" in report
    ours, theirs = dclsify.load(converted).state_dict(), dclsify.load(imported).state_dict()
    fresh = ("conv_dw.weight", "conv_dw.P", "conv_dw.SIG", "head.fc.weight", "head.fc.bias")  # Dcls2d, head
    loaded = [k for k in ours if not k.endswith(fresh)]
    assert len(loaded) == 114 and all(torch.equal(ours[k], theirs[k]) for k in loaded)
    assert "loaded 113 tensors as they are" in report  # and the stem, adapted
    assert read_metadata(converted)["pretrained"] == read_metadata(imported)["pretrained"] == str(path)
