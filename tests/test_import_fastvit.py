"""The paper's FastViT-SA24 audio checkpoints (DSC and DCLS) into our timm rewrite.

The reference below is our own implementation of the DCLS-Audio FastViT-SA24 audio model, written
from the facts of its computation (not from its code): the (2, 16) single-conv stem; RepMixer
blocks ``x + ls * (mixer(x) - norm(x))`` then ``x + ls * ffn(x)``; downsampling by a 7x7 + 3x3
large-kernel conv (no activation) and a 1x1 MobileOne block; a conditional positional encoding
``x + pe(x)`` before stage 3; attention blocks ``x + ls1 * mhsa(bn(x))``, ``x + ls2 * ffn(x)``;
a ConvFFN of depthwise 7x7 conv + BN, 1x1, GELU, 1x1; a final 3x3 MobileOne block with
squeeze-excite and GELU, global average pooling and a linear head. MobileOne blocks sum a BN
skip, k x k conv+BN and 1x1 conv+BN branches (train form, as released) and can be folded into
one conv (inference form). The DCLS model makes every depthwise 7x7 (the ConvFFN convs and the
pos-embedding) a DCLS-Gauss 23x23 with 26 elements, positions and spreads shared per stage.
Its state dict has exactly the released files' layout (tests/data/dcls_audio).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from dcls_audio import check_exports, check_layout, random_state_dict
from timm.utils import reparameterize_model
from torch import nn

import dclsify
from dclsify import CheckpointError
from dclsify.pipeline import importer

WINDOW, COUNT = 23, 26
DIMS, DEPTHS = (64, 128, 256, 512), (4, 4, 12, 4)
NAMES = {False: "fastvit_audio_sa24", True: "fastvit_dcls_audio_sa24"}
TIME = 160  # frames of the (2, 1, 128, TIME) test input: 10 after the stem, 2 in stage 3


class GaussDcls(nn.Module):
    """Depthwise DCLS-Gauss: the kernel is the sum over elements of weight x a 2-D Gaussian of
    std |SIG| + 0.27 centred at P + WINDOW // 2 (P[0] along the width, P[1] along the height),
    normalised to sum 1 over the window (+1e-7). With one std per axis the 2-D Gaussian is the
    outer product of two 1-D ones, and its sum over the window the product of theirs."""

    def __init__(self, channels: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, 1, COUNT) * 0.5)
        self.P = nn.Parameter(torch.empty(2, channels, 1, COUNT).uniform_(-(WINDOW // 2), WINDOW // 2))
        self.SIG = nn.Parameter(torch.empty(2, channels, 1, COUNT).uniform_(-1.5, 1.5))
        self.bias = nn.Parameter(torch.randn(channels) * 0.1) if bias else None

    def kernel(self) -> torch.Tensor:
        grid = torch.arange(WINDOW, dtype=self.P.dtype)
        offsets = (grid - (self.P + WINDOW // 2).unsqueeze(-1)) / (self.SIG.abs() + 0.27).unsqueeze(-1)
        across, down = torch.exp(-0.5 * offsets**2)  # (C, 1, N, width), (C, 1, N, height)
        window_sum = across.sum(-1) * down.sum(-1) + 1e-7
        return torch.einsum("cin,cinh,cinw->cihw", self.weight / window_sum, down, across)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel(), self.bias, padding=WINDOW // 2, groups=x.shape[1])


def depthwise7(channels: int, bias: bool, dcls: bool) -> nn.Module:
    if dcls:
        return GaussDcls(channels, bias)
    return nn.Conv2d(channels, channels, 7, padding=3, groups=channels, bias=bias)


def dense_kernel(conv: nn.Module) -> torch.Tensor:
    return conv.kernel() if isinstance(conv, GaussDcls) else conv.weight


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(cout)))


def fold_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the conv that equals ``bn(conv_weight * x)`` in eval mode."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def identity_kernel(channels: int, per_group: int, k: int) -> torch.Tensor:
    kernel = torch.zeros(channels, per_group, k, k)
    kernel[torch.arange(channels), torch.arange(channels) % per_group, k // 2, k // 2] = 1
    return kernel


def pad_to(kernel: torch.Tensor, k: int) -> torch.Tensor:
    return F.pad(kernel, [(k - kernel.shape[-1]) // 2] * 4)


def folded_conv(weight: torch.Tensor, bias: torch.Tensor, stride: int, groups: int) -> nn.Conv2d:
    """A conv holding an inference-form kernel (odd, square) and bias."""
    k = weight.shape[-1]
    conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], k, stride, k // 2, groups=groups)
    conv.weight.data, conv.bias.data = weight.detach().clone(), bias.detach().clone()
    return conv


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // 16, 1)
        self.expand = nn.Conv2d(channels // 16, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class MobileOne(nn.Module):
    """BN skip (same width, stride 1) + ``convs`` k x k conv+BN + 1x1 conv+BN (k > 1), then SE and GELU."""

    def __init__(self, cin, cout, k, stride=1, groups=1, convs=1, scale=True, act=True, se=False):
        super().__init__()
        self.k, self.stride, self.groups, self.cin = k, stride, groups, cin
        self.se = SqueezeExcite(cout) if se else nn.Identity()
        self.rbr_skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_conv = nn.ModuleList(conv_bn(cin, cout, k, stride, groups) for _ in range(convs)) if convs else None
        self.rbr_scale = conv_bn(cin, cout, 1, stride, groups) if k > 1 and scale else None
        self.act = nn.GELU() if act else nn.Identity()
        self.reparam_conv = None

    def branches(self, x):
        out = self.rbr_skip(x) if self.rbr_skip is not None else 0
        for branch in [*(self.rbr_conv or []), self.rbr_scale]:
            if branch is not None:
                out = out + branch(x)
        return out

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [fold_bn(b.conv.weight, b.bn) for b in [*(self.rbr_conv or []), self.rbr_scale] if b is not None]
        if self.rbr_skip is not None:
            parts.append(fold_bn(identity_kernel(self.cin, self.cin // self.groups, self.k), self.rbr_skip))
        return sum(pad_to(w, self.k) for w, _ in parts), sum(b for _, b in parts)

    def reparameterize(self):
        self.reparam_conv = folded_conv(*self.folded(), self.stride, self.groups)
        self.rbr_skip = self.rbr_conv = self.rbr_scale = None

    def forward(self, x):
        out = self.reparam_conv(x) if self.reparam_conv is not None else self.branches(x)
        return self.act(self.se(out))


class RepMixer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1))
        self.norm = MobileOne(dim, dim, 3, groups=dim, convs=0, scale=False, act=False)
        self.mixer = MobileOne(dim, dim, 3, groups=dim, act=False)
        self.reparam_conv = None

    def reparameterize(self):
        (wm, bm), (wn, bn) = self.mixer.folded(), self.norm.folded()
        ls = self.layer_scale.view(-1)
        weight = identity_kernel(len(ls), 1, 3) + ls.view(-1, 1, 1, 1) * (wm - wn)
        self.reparam_conv = folded_conv(weight, ls * (bm - bn), 1, len(ls))
        del self.norm, self.mixer, self.layer_scale

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


class ConvFFN(nn.Module):
    def __init__(self, dim, dcls):
        super().__init__()
        self.conv = nn.Sequential(OrderedDict(conv=depthwise7(dim, False, dcls), bn=nn.BatchNorm2d(dim)))
        self.fc1 = nn.Conv2d(dim, 4 * dim, 1)
        self.fc2 = nn.Conv2d(4 * dim, dim, 1)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.conv(x))))


class RepMixerBlock(nn.Module):
    def __init__(self, dim, dcls):
        super().__init__()
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1))
        self.token_mixer = RepMixer(dim)
        self.convffn = ConvFFN(dim, dcls)

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.layer_scale * self.convffn(x)


class MHSA(nn.Module):
    def __init__(self, dim, head_dim=32):
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = self.qkv(tokens).view(b, h * w, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim**0.5, dim=-1)
        out = (attention @ v).transpose(1, 2).reshape(b, h * w, c)
        return self.proj(out).transpose(1, 2).reshape(b, c, h, w)


class AttentionBlock(nn.Module):
    def __init__(self, dim, dcls):
        super().__init__()
        self.layer_scale_1 = nn.Parameter(torch.ones(dim, 1, 1))
        self.layer_scale_2 = nn.Parameter(torch.ones(dim, 1, 1))
        self.norm = nn.BatchNorm2d(dim)
        self.token_mixer = MHSA(dim)
        self.convffn = ConvFFN(dim, dcls)

    def forward(self, x):
        x = x + self.layer_scale_1 * self.token_mixer(self.norm(x))
        return x + self.layer_scale_2 * self.convffn(x)


class LargeKernelDown(nn.Module):
    """7x7 + 3x3 grouped convs (each + BN), stride 2, summed; no activation."""

    def __init__(self, cin, cout):
        super().__init__()
        self.lkb_origin = conv_bn(cin, cout, 7, 2, cin)
        self.small_conv = conv_bn(cin, cout, 3, 2, cin)
        self.lkb_reparam = None

    def reparameterize(self):
        w7, b7 = fold_bn(self.lkb_origin.conv.weight, self.lkb_origin.bn)
        w3, b3 = fold_bn(self.small_conv.conv.weight, self.small_conv.bn)
        self.lkb_reparam = folded_conv(w7 + pad_to(w3, 7), b7 + b3, 2, self.lkb_origin.conv.groups)
        self.lkb_origin = self.small_conv = None

    def forward(self, x):
        if self.lkb_reparam is not None:
            return self.lkb_reparam(x)
        return self.lkb_origin(x) + self.small_conv(x)


class PatchEmbed(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.proj = nn.Sequential(LargeKernelDown(cin, cout), MobileOne(cout, cout, 1))

    def forward(self, x):
        return self.proj(x)


class PosEmbed(nn.Module):
    def __init__(self, dim, dcls):
        super().__init__()
        self.pe = depthwise7(dim, True, dcls)
        self.reparam_conv = None

    def reparameterize(self):
        kernel = dense_kernel(self.pe)
        weight = kernel + identity_kernel(kernel.shape[0], 1, kernel.shape[-1])
        self.reparam_conv = folded_conv(weight, self.pe.bias, 1, kernel.shape[0])
        del self.pe

    def forward(self, x):
        return self.reparam_conv(x) if self.reparam_conv is not None else x + self.pe(x)


class AudioFastViT(nn.Module):
    """FastViT-SA24 audio (DCLS-Audio), train form; :meth:`reparameterize` folds it."""

    def __init__(self, dcls: bool, classes: int = 527):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, DIMS[0], (2, 16), (2, 16), bias=False)
        network = []
        for stage, (dim, depth) in enumerate(zip(DIMS, DEPTHS, strict=True)):
            if stage:
                network.append(PatchEmbed(DIMS[stage - 1], dim))
            if stage == 3:
                network.append(PosEmbed(dim, dcls))
            block = AttentionBlock if stage == 3 else RepMixerBlock
            network.append(nn.Sequential(*(block(dim, dcls) for _ in range(depth))))
        self.network = nn.ModuleList(network)
        self.conv_exp = MobileOne(DIMS[-1], 2 * DIMS[-1], 3, groups=DIMS[-1], se=True)
        self.head = nn.Linear(2 * DIMS[-1], classes)
        shared = {}  # one P and SIG per stage (per width), those of the stage's first DCLS layer
        for module in self.modules():
            if isinstance(module, GaussDcls):
                module.P, module.SIG = shared.setdefault(module.P.shape[1], (module.P, module.SIG))

    def reparameterize(self) -> AudioFastViT:
        """A copy in inference form: every branch folded, every DCLS layer a dense conv."""
        folded = copy.deepcopy(self)
        for module in list(folded.modules())[1:]:  # a RepMixer's own MobileOnes are folded into it, then dropped
            if hasattr(module, "reparameterize"):
                module.reparameterize()
        for ffn in folded.modules():
            if isinstance(ffn, ConvFFN) and isinstance(ffn.conv.conv, GaussDcls):
                kernel = ffn.conv.conv.kernel()
                ffn.conv.conv = folded_conv(kernel, torch.zeros(len(kernel)), 1, len(kernel))
        return folded

    def forward(self, x):
        x = self.patch_embed(x)
        for part in self.network:
            x = part(x)
        return self.head(self.conv_exp(x).mean((2, 3)))


@torch.no_grad()
def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Every term nontrivial: BN statistics and affines random, layer scales of order 0.1-0.5,
    a head that spreads the logits."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(tensor, low, high):
        tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)

    for name, tensor in model.named_parameters():
        if "layer_scale" in name:
            uniform(tensor, 0.1, 0.5)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            uniform(module.weight, 0.5, 1.5)
            uniform(module.bias, -0.2, 0.2)
            uniform(module.running_mean, -0.2, 0.2)
            uniform(module.running_var, 0.3, 1.5)
            module.num_batches_tracked.fill_(1000)
    uniform(model.head.weight, -1.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def built_once():
    """Each import here builds the same full-size model (seconds of shape propagation): built once
    per variant, then copied."""
    built = {}

    def convert(source, *args, **kwargs):
        key = (source, repr(args), repr(sorted(kwargs.items())))
        if key not in built:
            built[key] = dclsify.convert(source, *args, **kwargs)
        return copy.deepcopy(built[key])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(importer, "convert", convert)
        yield


@pytest.fixture(scope="module", params=[False, True], ids=["dsc", "dcls"])
def reference(request):
    torch.manual_seed(0)
    return randomise(AudioFastViT(dcls=request.param), seed=1)


@pytest.fixture(scope="module")
def spectrogram():
    return torch.randn(2, 1, 128, TIME, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def expected(reference, spectrogram):
    with torch.no_grad():
        return reference(spectrogram)


@pytest.fixture(scope="module")
def imported(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("fastvit") / "released.pth"
    torch.save({"model": reference.state_dict()}, path)
    return dclsify.import_checkpoint(path).eval()


def test_gauss_layer_matches_dcls_package():
    modules = pytest.importorskip("DCLS.construct.modules", reason="DCLS==0.1.1 (the oracle) is not installed")
    torch.manual_seed(3)
    ours = GaussDcls(16, bias=True)
    theirs = modules.Dcls2d(16, 16, COUNT, padding=WINDOW // 2, dilated_kernel_size=WINDOW, groups=16, version="gauss")
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 20, 9)
    with torch.no_grad():
        expected = theirs(x)
        assert (ours(x) - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("dcls", [False, True], ids=["dsc", "dcls"])
def test_reference_has_the_released_layout(dcls):
    check_layout(AudioFastViT(dcls).state_dict(), NAMES[dcls])


def test_import_gives_the_reference_logits(reference, expected, imported, spectrogram):
    dcls = any(isinstance(m, GaussDcls) for m in reference.modules())
    assert imported.imported.model == NAMES[dcls]
    assert imported.imported.problems == []
    assert len(imported.imported.loaded) == len(reference.state_dict())
    assert expected.std() > 1  # logits that vary, not a near-constant
    with torch.no_grad():
        assert (imported(spectrogram) - expected).abs().max() <= 1e-4


def test_import_then_export_gives_the_reference_logits(reference, imported, tmp_path):
    if not any(isinstance(m, dclsify.Dcls2d) for m in imported.modules()):
        pytest.skip("the DSC model has nothing to bake: its export is the DCLS model's, less the baking")
    check_exports(imported, reference, tmp_path)


def test_inference_forms_agree(reference, expected, imported, spectrogram):
    folded_reference = reference.reparameterize()
    # every branch folded: the BNs left are those of the ConvFFNs and the attention blocks' norms
    norms = {name for name, m in folded_reference.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert all(name.endswith("convffn.conv.bn") or name.startswith("network.7.") for name in norms)
    assert len(norms) == sum(DEPTHS) + DEPTHS[-1]
    # Dcls2d first becomes a dense conv (bake); timm's RepConditionalPosEnc then folds its
    # identity in at the centre of the baked kernel (the rewrite told it the window's size)
    ours = dclsify.bake(imported)
    pos_emb = ours.stages[3].pos_emb
    reparameterize_model(ours, inplace=True)
    assert not any(isinstance(m, dclsify.Dcls2d) for m in ours.modules())
    assert not hasattr(pos_emb, "pos_enc") and not hasattr(ours.stages[0].blocks[0].token_mixer, "norm")
    with torch.no_grad():
        folded_expected = folded_reference(spectrogram)
        assert (folded_expected - expected).abs().max() <= 1e-4  # the reference's own folding is right
        assert (ours(spectrogram) - folded_expected).abs().max() <= 1e-4


def test_a_mismapped_file_is_reported(tmp_path):
    state_dict = random_state_dict(NAMES[True])
    state_dict["network.7.0.token_mixer.qkv_weight"] = state_dict.pop("network.7.0.token_mixer.qkv.weight")
    state_dict["head.weight"] = state_dict["head.weight"][:500]
    state_dict["network.7.2.convffn.conv.conv.P"] = state_dict["network.7.2.convffn.conv.conv.P"].clone() + 1
    path = tmp_path / "mismapped.pth"
    torch.save({"model": state_dict}, path)
    problems = dict(dclsify.import_checkpoint(path).imported.problems)
    assert set(problems) == {
        "stages.3.blocks.0.token_mixer.qkv_weight",
        "stages.3.blocks.0.token_mixer.qkv.weight",
        "head.fc.weight",
        "stages.3.blocks.2.mlp.conv.conv.P",
    }
    assert "differs from stages.3.pos_emb.pos_enc.P" in problems["stages.3.blocks.2.mlp.conv.conv.P"]
    with pytest.raises(CheckpointError, match="4 tensors do not fit fastvit_dcls_audio_sa24"):
        dclsify.import_checkpoint(path, strict=True)
