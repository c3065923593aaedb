"""rewrite(): every supported family, stage synchronisation, stems, heads, errors and fallbacks."""

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from timm.models.convmixer import ConvMixer
from torch import nn

from dclsify import Dcls2d, rewrite
from dclsify.surgery.diff import count_parameters
from dclsify.surgery.rewrite import SurgeryError, depthwise_convs

AUDIO = (2, 1, 128, 1001)

# timm name, constructor overrides (to keep the test small), distinct P tensors expected.
# RDNet's blocks grow in width inside a stage; P has one row per channel, so only layers of
# equal width can share one: 21 groups, one per (width, map size).
FAMILIES = [
    ("convnext_atto", {}, 4),
    ("convnextv2_atto", {}, 4),
    ("convformer_s18", {}, 4),
    ("caformer_s18", {}, 2),
    ("fastvit_t8", {}, 4),
    ("fastvit_sa12", {}, 4),
    ("mambaout_femto", {}, 4),
    ("rdnet_tiny", {}, 21),
    ("starnet_s1", {}, 4),
    ("convmixer", {"dim": 32, "depth": 3, "kernel_size": 7, "patch_size": 7}, 1),
    ("edgenext_xx_small", {}, 1),
]


def _distinct(model, name):
    return {id(getattr(m, name)) for m in model.modules() if isinstance(m, Dcls2d)}


@pytest.mark.parametrize("name, overrides, stages", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_rewrites_trains_and_synchronises_by_stage(name, overrides, stages):
    original = ConvMixer(**overrides) if name == "convmixer" else timm.create_model(name, **overrides)
    sevens = [n for n, c in depthwise_convs(original).items() if c.kernel_size == (7, 7)]
    model = rewrite(original, num_classes=527)
    assert not any(c.kernel_size == (7, 7) for c in depthwise_convs(model).values())
    replaced = [n for n, m in model.named_modules() if isinstance(m, Dcls2d)]
    assert replaced == sevens == [r.name for r in model.dclsify.replaced]
    assert model.dclsify.traced and not model.dclsify.functional_convs
    x = torch.randn(AUDIO)
    y = model(x)
    assert y.shape == (2, 527)
    y.square().mean().backward()
    layers = [m for m in model.modules() if isinstance(m, Dcls2d)]
    assert all(m.P.grad is not None and m.P.grad.abs().sum() > 0 for m in layers)
    assert all(m.SIG.grad is not None and m.SIG.grad.abs().sum() > 0 for m in layers)
    assert len(_distinct(model, "P")) == len(_distinct(model, "SIG")) == stages
    groups = {(r.channels, r.input_shape[-2:]) for r in model.dclsify.replaced}
    assert len(groups) == stages  # a group is exactly one (width, map size)


@pytest.mark.parametrize("name, channels", [("convnext_atto", 40), ("convformer_s18", 64), ("fastvit_t8", 48)])
def test_audio_stem_gives_a_64x62_map(name, channels):
    model = rewrite(timm.create_model(name), dcls=False)
    stem = model.stem
    assert isinstance(stem, nn.Sequential | nn.Module)
    out = stem(torch.randn(1, 1, 128, 1001))
    assert tuple(out.shape) == (1, channels, 64, 62)
    conv = next(m for m in stem.modules() if isinstance(m, nn.Conv2d))
    assert (conv.in_channels, conv.kernel_size, conv.stride) == (1, (2, 16), (2, 16))


def test_mambaout_stem_stays_channels_last():
    model = rewrite(timm.create_model("mambaout_femto"))
    assert tuple(model.stem(torch.randn(1, 1, 128, 1001)).shape) == (1, 64, 62, 48)


@pytest.mark.parametrize(
    "name, dsc, dcls",
    [
        # The DCLS-Audio authors' models (../shared/dcls_audio_checkpoints), shared P/SIG counted once.
        ("convnext_tiny", 28_223_855, 28_221_263),
        ("convformer_s18", 25_797_847, 25_781_207),
        ("fastvit_sa24", 21_064_015, 21_016_655),
    ],
)
def test_paper_models_have_the_paper_parameter_counts(name, dsc, dcls):
    original = timm.create_model(name)
    assert count_parameters(rewrite(original, num_classes=527, dcls=False)) == dsc
    assert count_parameters(rewrite(original, num_classes=527)) == dcls


@pytest.fixture(scope="module")
def atto():
    torch.manual_seed(0)
    return timm.create_model("convnext_atto")


def test_input_untouched_names_kept_and_timm_api_intact(atto):
    before = {k: v.clone() for k, v in atto.state_dict().items()}
    model = rewrite(atto, num_classes=10)
    assert not any(isinstance(m, Dcls2d) for m in atto.modules()) and not hasattr(atto, "dclsify")
    assert all(torch.equal(v, atto.state_dict()[k]) for k, v in before.items())
    replaced = {r.name for r in model.dclsify.replaced}
    kept = {k for k in atto.state_dict() if k.rsplit(".", 1)[0] not in replaced | {"stem.0", "head.fc"}}
    assert kept <= set(model.state_dict())
    assert type(model) is type(atto) and model.pretrained_cfg["architecture"] == "convnext_atto"
    assert model.pretrained_cfg["input_size"] == (1, 128, 1001) and model.pretrained_cfg["num_classes"] == 10
    assert atto.pretrained_cfg["input_size"] == (3, 224, 224)
    assert model.forward_features(torch.randn(1, 1, 128, 1001)).shape == (1, 320, 8, 7)
    model.reset_classifier(3)
    assert model(torch.randn(1, 1, 128, 1001)).shape == (1, 3)


def test_rewriting_twice_is_refused(atto):
    model = rewrite(atto)
    with pytest.raises(SurgeryError, match="rewritten already"):
        rewrite(model)


def test_sync_modes_share_the_same_parameter_objects(atto):
    by_stage = rewrite(atto)
    layers = [m for m in by_stage.modules() if isinstance(m, Dcls2d)]
    stage0 = [m for n, m in by_stage.named_modules() if n.startswith("stages.0.") and isinstance(m, Dcls2d)]
    assert stage0[0].P is stage0[1].P and stage0[0].SIG is stage0[1].SIG
    optimizer = torch.optim.AdamW(by_stage.parameters())  # would fail on a duplicate parameter... or count it twice
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == count_parameters(by_stage)
    assert len(_distinct(rewrite(atto, sync="none"), "P")) == len(layers) == 12
    model_wide = rewrite(timm.create_model("convnext_atto"), sync="model")
    assert len(_distinct(model_wide, "P")) == 4  # widths 40, 80, 160, 320


def test_initialisation_is_the_papers_and_seeded(atto):
    a, b, c = rewrite(atto, seed=1), rewrite(atto, seed=1), rewrite(atto, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    layer_a, layer_c = a.stages[2].blocks[0].conv_dw, c.stages[2].blocks[0].conv_dw
    assert not torch.equal(layer_a.weight, layer_c.weight)
    weights = torch.cat([m.weight.flatten() for m in a.modules() if isinstance(m, Dcls2d)])
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    assert all(torch.all(m.bias == 0) and torch.all(m.SIG == 0.23) for m in a.modules() if isinstance(m, Dcls2d))
    assert layer_a.P.std().item() == pytest.approx(0.5, rel=0.15)
    assert (layer_a.dilated_kernel_size, layer_a.kernel_count, layer_a.padding) == ((23, 23), 26, (11, 11))


def test_match_sizes_minimum_and_predicate():
    edgenext = timm.create_model("edgenext_xx_small")  # depthwise 3x3, 5x5, 7x7 and 9x9
    assert len(rewrite(edgenext, match=[3, 7]).dclsify.replaced) == 13
    assert len(rewrite(edgenext, match=">=5").dclsify.replaced) == 7
    predicate = rewrite(edgenext, match=lambda name, conv: name.startswith("stages.3"))
    assert {r.kernel_size for r in predicate.dclsify.replaced} == {(3, 3), (9, 9)}  # what it says, any size
    with pytest.raises(SurgeryError, match=r"kernel 5 is smaller than matched kernels \[\(7, 7\)\]"):
        rewrite(edgenext, kernel=5, count=9)


def test_nothing_to_replace_lists_the_depthwise_convs(atto):
    with pytest.raises(
        SurgeryError, match=r"no depthwise conv matches 9; its depthwise convs are stages.0.blocks.0.conv_dw \(7x7\)"
    ):
        rewrite(atto, match=9)
    with pytest.raises(SurgeryError, match="it has no depthwise convs"):
        rewrite(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), stem=None)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"count": 600}, r"count must be from 1 to kernel\^2 = 529, got 600"),
        ({"kernel": 0}, "kernel must be a positive int"),
        ({"sync": "block"}, r"sync must be one of \('stage', 'none', 'model'\)"),
        ({"version": "max"}, "version must be one of"),
        ({"stem": "2x"}, "stem must be 'audio', None, 'KHxKW' or 'KHxKW/SHxSW'"),
        ({"match": "big"}, "match must be a kernel size"),
        ({"kernel": 22}, r"kernel 22 and matched kernels \[\(7, 7\)\] differ in parity"),
        ({"in_chans": 0}, "in_chans must be a positive int"),
        ({"input_size": (128, 0)}, "input_size must be"),
        ({"stem": "200x16"}, r"a \(1, 128, 1001\) input does not go through the rewritten ConvNeXt"),
    ],
)
def test_bad_arguments_are_surgery_errors(atto, kwargs, message):
    with pytest.raises(SurgeryError, match=message):
        rewrite(atto, **kwargs)


def test_other_stems_and_keeping_the_original(atto):
    kept = rewrite(atto, stem=None)
    assert kept.stem[0].kernel_size == (4, 4) and kept.dclsify.stem is None
    custom = rewrite(atto, stem="4x8/2x8", dcls=False)
    assert (custom.stem[0].kernel_size, custom.stem[0].stride) == ((4, 8), (2, 8))
    assert custom.stem(torch.randn(1, 1, 128, 1001)).shape == (1, 40, 63, 125)


class _FunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 7, padding=3, groups=4)
        self.kernel = nn.Parameter(torch.randn(4, 1, 7, 7))

    def forward(self, x):
        return F.conv2d(self.dw(x), self.kernel, padding=3, groups=4)


def test_functional_convs_are_reported_not_rewritten():
    with pytest.warns(UserWarning, match="convs called functionally cannot be rewritten: conv2d"):
        model = rewrite(_FunctionalConv(), stem=None, input_size=(16, 16), in_chans=4)
    assert model.dclsify.functional_convs == ["conv2d"] and isinstance(model.dw, Dcls2d)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 7, padding=3, groups=4)
        self.b = nn.Conv2d(4, 4, 7, padding=3, groups=4)
        self.pool = nn.MaxPool2d(2)
        self.c = nn.Conv2d(4, 4, 7, padding=3, groups=4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = -x
        return self.c(self.pool(self.b(self.a(x))))


def test_untraceable_models_fall_back_to_the_module_tree():
    with pytest.warns(UserWarning, match="torch.fx cannot trace _Untraceable .*walking the module tree"):
        model = rewrite(_Untraceable(), stem=None, input_size=(16, 16), in_chans=4)
    assert not model.dclsify.traced
    assert [r.input_shape for r in model.dclsify.replaced] == [(1, 4, 16, 16), (1, 4, 16, 16), (1, 4, 8, 8)]
    assert model.a.P is model.b.P and model.c.P is not model.a.P  # stages still found, from real shapes
    assert model(torch.randn(2, 4, 16, 16)).shape == (2, 4, 8, 8)


def test_unregistered_models_get_their_first_conv_as_stem():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = rewrite(_Untraceable(), input_size=(16, 32), dcls=False, stem="2x2")
    assert any("not a registered family: replacing its first conv 'a'" in str(w.message) for w in caught)
    assert model.a.in_channels == 1 and model.a.kernel_size == (2, 2)


@register_notrace_module
class _OpaqueBlock(nn.Module):  # a timm leaf: torch.fx sees one call_module node, not the conv inside
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 7, padding=3, groups=4)

    def forward(self, x):
        return self.dw(x) + x


def test_convs_inside_leaf_modules_get_their_shapes_from_hooks():
    model = rewrite(nn.Sequential(_OpaqueBlock(), _OpaqueBlock()), stem=None, in_chans=4, input_size=(12, 10))
    assert model.dclsify.traced
    assert [r.input_shape for r in model.dclsify.replaced] == [(1, 4, 12, 10), (1, 4, 12, 10)]
    assert model[0].dw.P is model[1].dw.P


@pytest.mark.parametrize("name, stages", [("convnext_base", 4), ("fastvit_sa36", 4)])
def test_largest_family_members_rewrite_and_run(name, stages):
    model = rewrite(timm.create_model(name), num_classes=527).eval()
    assert not any(c.kernel_size == (7, 7) for c in depthwise_convs(model).values())
    assert len(_distinct(model, "P")) == stages
    with torch.no_grad():
        assert model(torch.randn(1, 1, 128, 1001)).shape == (1, 527)


def test_models_without_a_timm_head_keep_theirs_or_say_so():
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 7, padding=3, groups=4))
    with pytest.raises(SurgeryError, match=r"Sequential has no reset_classifier\(\) .*pass num_classes=None"):
        rewrite(plain, stem=None, num_classes=10, input_size=(16, 16))
    assert isinstance(rewrite(plain, stem=None, input_size=(16, 16))[1], Dcls2d)


def test_graph_diff_of_an_untraceable_model_is_a_clear_error():
    from dclsify import graph_diff

    original = _Untraceable()
    with pytest.warns(UserWarning):
        rewritten = rewrite(original, stem=None, input_size=(16, 16), in_chans=4)
    with pytest.raises(SurgeryError, match="a graph diff needs a model torch.fx can trace, and _Untraceable cannot"):
        graph_diff(original, rewritten)
