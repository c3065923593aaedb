"""Importing DCLS-Audio's ConvFormer-S18 audio checkpoints (DSC and DCLS): a file in the released
layout, made by our own implementation of the authors' computation, gives the same logits once
imported into our rewritten timm model."""

import logging

import pytest
import torch
import torch.nn.functional as F
from dcls_audio import check_exports, check_layout
from torch import nn

import dclsify
from dclsify import CheckpointError, Dcls2d, import_checkpoint

DEPTHS, DIMS = (3, 3, 9, 3), (64, 128, 320, 512)
WINDOW, COUNT = 23, 26  # the paper's DCLS-Gauss setting
LOG_MEL = (2, 1, 128, 160)  # a short normalised log-mel batch


class GaussDcls(nn.Module):
    """A depthwise DCLS-Gauss conv from its definition: the dense kernel is the sum over
    ``COUNT`` elements of weight x a 2-D Gaussian of std ``|SIG| + 0.27`` centred at
    ``P + WINDOW // 2``, normalised to sum 1 over the window (+1e-7); ``P[0]`` runs along the
    width, ``P[1]`` along the height."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, 1, COUNT) * 0.02)
        self.P = nn.Parameter(torch.randn(2, channels, 1, COUNT) * 0.5)
        self.SIG = nn.Parameter(torch.full((2, channels, 1, COUNT), 0.23))

    def kernel(self) -> torch.Tensor:
        # exp(-(h^2 + w^2) / 2) = exp(-h^2 / 2) exp(-w^2 / 2): each element's Gaussian is an outer
        # product, and its sum over the window the product of the two factors' sums
        taps = torch.arange(WINDOW, dtype=self.P.dtype)
        centre, std = (self.P + WINDOW // 2).unsqueeze(-1), (self.SIG.abs() + 0.27).unsqueeze(-1)
        along_w, along_h = torch.exp(-0.5 * ((taps - centre) / std) ** 2)  # each (C, 1, N, WINDOW)
        scale = self.weight / (along_h.sum(-1) * along_w.sum(-1) + 1e-7)
        return torch.einsum("cin,cinh,cinw->cihw", scale, along_h, along_w)

    def forward(self, x):
        return F.conv2d(x, self.kernel(), padding=WINDOW // 2, groups=x.shape[1])


class Scale(nn.Module):  # the residual scale of stages 2 and 3
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.scale


class StarReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale, self.bias = nn.Parameter(torch.ones(1)), nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.scale * F.relu(x) ** 2 + self.bias


def channels_last_norm(dim: int) -> nn.LayerNorm:  # the blocks' and downsamplings' LayerNorm: no bias
    return nn.LayerNorm(dim, eps=1e-6, bias=False)


class Downsampling(nn.Module):
    """NCHW (the stem) or NHWC in, NHWC out: [pre_norm], conv, [post_norm]."""

    def __init__(self, conv: nn.Conv2d, pre_norm: bool):
        super().__init__()
        self.pre_norm = channels_last_norm(conv.in_channels) if pre_norm else None
        self.conv = conv
        self.post_norm = None if pre_norm else channels_last_norm(conv.out_channels)

    def forward(self, x):
        if self.pre_norm is not None:
            x = self.pre_norm(x).permute(0, 3, 1, 2)
        x = self.conv(x).permute(0, 2, 3, 1)
        return x if self.post_norm is None else self.post_norm(x)


class SepConv(nn.Module):
    def __init__(self, dim: int, dcls: bool):
        super().__init__()
        mid = 2 * dim
        self.pwconv1 = nn.Linear(dim, mid, bias=False)
        self.act1 = StarReLU()
        self.dwconv = GaussDcls(mid) if dcls else nn.Conv2d(mid, mid, 7, padding=3, groups=mid, bias=False)
        self.pwconv2 = nn.Linear(mid, dim, bias=False)

    def forward(self, x):
        x = self.act1(self.pwconv1(x))
        return self.pwconv2(self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.act = nn.Linear(dim, 4 * dim, bias=False), StarReLU()
        self.fc2 = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, dcls: bool, res_scale: bool):
        super().__init__()
        self.norm1, self.token_mixer = channels_last_norm(dim), SepConv(dim, dcls)
        self.res_scale1 = Scale(dim) if res_scale else nn.Identity()
        self.norm2, self.mlp = channels_last_norm(dim), Mlp(dim)
        self.res_scale2 = Scale(dim) if res_scale else nn.Identity()

    def forward(self, x):
        x = self.res_scale1(x) + self.token_mixer(self.norm1(x))
        return self.res_scale2(x) + self.mlp(self.norm2(x))


class MlpHead(nn.Module):
    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(dim, 4 * dim), nn.LayerNorm(4 * dim), nn.Linear(4 * dim, classes)

    def forward(self, x):
        return self.fc2(self.norm(F.relu(self.fc1(x)) ** 2))


class ConvFormerAudio(nn.Module):
    """ConvFormer-S18 for (B, 1, 128, T) log-mels as DCLS-Audio builds it: a bias-free (2, 16) stem
    conv, channels-last blocks, residual scales in stages 2 and 3, the mean over time and
    frequency, a LayerNorm and an MLP head; with ``dcls``, every depthwise 7x7 conv a GaussDcls
    whose P and SIG the stage's blocks share."""

    def __init__(self, dcls: bool, classes: int = 527):
        super().__init__()
        stem = nn.Conv2d(1, DIMS[0], (2, 16), stride=(2, 16), bias=False)
        downs = [nn.Conv2d(DIMS[i - 1], DIMS[i], 3, stride=2, padding=1) for i in range(1, 4)]
        self.downsample_layers = nn.ModuleList(Downsampling(conv, i > 0) for i, conv in enumerate([stem, *downs]))
        self.stages = nn.ModuleList(
            nn.Sequential(*(Block(dim, dcls, res_scale=i >= 2) for _ in range(depth)))
            for i, (depth, dim) in enumerate(zip(DEPTHS, DIMS, strict=True))
        )
        if dcls:
            for stage in self.stages:
                for block in stage[1:]:
                    block.token_mixer.dwconv.P = stage[0].token_mixer.dwconv.P
                    block.token_mixer.dwconv.SIG = stage[0].token_mixer.dwconv.SIG
        self.norm = nn.LayerNorm(DIMS[-1], eps=1e-6)
        self.head = MlpHead(DIMS[-1], classes)

    def forward(self, x):
        for downsample, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(downsample(x))
        return self.head(self.norm(x.mean((1, 2))))


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Values under which every term of the computation shows: no scale near 0 or 1, norms with
    random weights and biases, positions over the whole window, spreads of both signs."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(shape, low, high):
        return torch.rand(shape, generator=generator) * (high - low) + low

    with torch.no_grad():
        for name, p in model.named_parameters():  # a shared P or SIG comes once
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "P":
                value = uniform(p.shape, -(WINDOW // 2) + 1, WINDOW // 2 - 1)
            elif leaf == "SIG":
                value = uniform(p.shape, -1.5, 1.5)
            elif leaf == "weight" and p.ndim == 3:  # a DCLS layer's elements
                value = torch.randn(p.shape, generator=generator) * 0.3
            elif name == "head.fc1.weight":  # hidden variance ~1e-5, near the head norm's eps: its eps shows
                value = torch.randn(p.shape, generator=generator) * 0.05 / p.shape[1] ** 0.5
            elif name == "head.fc1.bias":
                value = torch.randn(p.shape, generator=generator) * 0.01
            elif p.ndim >= 2:
                value = torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5
            elif name.endswith((".scale", "norm.weight", "norm1.weight", "norm2.weight")):
                value = uniform(p.shape, 0.4, 1.6) * torch.where(uniform(p.shape, 0, 1) < 0.1, -1, 1)
            else:  # biases: of norms, convs, StarReLUs, linears
                value = uniform(p.shape, -0.5, 0.5)
            p.copy_(value)
    return model


@pytest.mark.parametrize("dcls, name", [(False, "convformer_audio_s18"), (True, "convformer_dcls_audio_s18")])
def test_released_layout_imports_with_the_reference_logits(dcls, name, tmp_path):
    reference = randomise(ConvFormerAudio(dcls)).eval()
    check_layout(reference.state_dict(), name)  # keys, order, shapes, sharing, parameter count
    torch.save({"model": reference.state_dict()}, tmp_path / "released.pth")

    model = import_checkpoint(tmp_path / "released.pth").eval()  # found from its keys
    for layer in model.modules():
        if isinstance(layer, Dcls2d):
            layer.algorithm = "direct"  # "auto" would time every algorithm at this input's shapes first
    assert model.imported.model == name and model.imported.problems == []
    assert len(model.imported.loaded) == len(reference.state_dict())
    x = torch.randn(LOG_MEL, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert expected.abs().max() > 1  # logits that carry the weights, not a constant
    assert (got - expected).abs().max() <= 1e-4
    if dcls:
        check_exports(model, reference, tmp_path)


def test_the_audio_convformer_head_norms_as_dcls_audio():
    # set by the rewrite, so that a saved and loaded model (rebuilt by the rewrite) keeps it
    assert dclsify.convert("timm:convformer_s18", num_classes=5).get_classifier().norm.eps == 1e-5
    assert dclsify.convert("timm:convformer_s18", num_classes=5, stem=None).get_classifier().norm.eps == 1e-6


def test_gauss_layer_is_dcls_reference():
    modules = pytest.importorskip("DCLS.construct.modules", reason="DCLS==0.1.1 (the oracle) is not installed")
    logging.disable(logging.WARNING)  # it warns about its CUDA kernel on every construction
    try:
        oracle = modules.Dcls2d(16, 16, COUNT, padding=WINDOW // 2, dilated_kernel_size=WINDOW, groups=16, bias=False)
    finally:
        logging.disable(logging.NOTSET)
    ours = randomise(GaussDcls(16), seed=2)
    oracle.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 12, 20)
    with torch.no_grad():
        expected = oracle(x)
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_a_key_out_of_place_is_reported_and_strict_refuses(tmp_path):
    state_dict = ConvFormerAudio(dcls=False).state_dict()
    state_dict["stages.1.0.mlp.fc_1.weight"] = state_dict.pop("stages.1.0.mlp.fc1.weight")
    del state_dict["norm.bias"]
    torch.save({"model": state_dict}, tmp_path / "odd.pth")

    problems = dict(import_checkpoint(tmp_path / "odd.pth").imported.problems)
    assert problems == {
        "stages.1.0.mlp.fc_1.weight": "in the file, but the model has no such tensor",
        "stages.1.blocks.0.mlp.fc1.weight": "the model's, missing from the file: left as initialised",
        "head.norm.bias": "the model's, missing from the file: left as initialised",
    }
    with pytest.raises(CheckpointError, match="3 tensors do not fit convformer_audio_s18"):
        import_checkpoint(tmp_path / "odd.pth", strict=True)
