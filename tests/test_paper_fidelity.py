"""What the paper's experiment does beyond Table 2, read from the authors' code: their speed
perturbation, no position clamping, their initialisation of the new stem and head, FastViT's
layer scales and the optimisers' eps."""

import json

import h5py
import numpy as np
import pytest
import torch
from timm.models.metaformer import MetaFormer, SepConv

from dclsify import rewrite, save
from dclsify.pipeline import train as train_module
from dclsify.pipeline.augment import Augment, AugmentConfig, stretch_nearest
from dclsify.pipeline.frontend import AudioConfig, LogMel
from dclsify.pipeline.recipe import RecipeError, load_recipe
from dclsify.pipeline.train import build_model, make_optimizer, train
from dclsify.surgery.checkpoint import create_source
from dclsify.surgery.dcls import Dcls2d

PAPER_RECIPES = [
    f"{model}_{kind}" for model in ("convnext_tiny", "convformer_s18", "fastvit_sa24") for kind in ("dsc", "dcls")
]


def authors_speed_perturbation(x: np.ndarray, rate: float, start: int) -> np.ndarray:
    """Their Resample (nearest) then Pad/Crop (random alignment), written out: the stretched row's
    taps are round(i / r), its length ceil(n r); a shorter row gets ``start`` zeros before it, a
    longer one is cropped from its sample ``start``."""
    n = len(x)
    stretched = x[np.minimum(np.round(np.arange(int(np.ceil(n * rate))) / rate).astype(int), n - 1)]
    if len(stretched) <= n:
        return np.concatenate([np.zeros(start), stretched, np.zeros(n - len(stretched) - start)])
    return stretched[start : start + n]


@pytest.mark.parametrize(
    "rate, offset",  # each kind at both ends of the authors' offsets (0 .. n - m; 0 .. m - n - 1)
    [(0.62, 1234), (0.62, 0), (0.75, 2000), (1.37, -2959), (1.37, 0), (1.5, -3999)],
)
def test_stretch_nearest_is_the_authors_speed_perturbation(rate, offset):
    n = 8000
    x = np.random.default_rng(0).standard_normal(n)
    rate = float(np.float32(rate))  # as the Augment draws it
    got = stretch_nearest(torch.from_numpy(x)[None], torch.tensor([rate], dtype=torch.float32), torch.tensor([offset]))
    assert np.array_equal(got[0].numpy(), authors_speed_perturbation(x, rate, abs(offset)))
    length = int(np.ceil(n * rate))
    if rate < 1:  # shorter: zeros, then the sound from `offset` for `length` samples, then zeros
        assert length < n and np.all(got[0, :offset].numpy() == 0) and np.all(got[0, offset + length :].numpy() == 0)
        assert got[0, offset].item() == x[0] and got[0, offset + 10].item() == x[round(10 / rate)]
        assert got[0, offset + length - 1].item() == x[min(round((length - 1) / rate), n - 1)]
    else:  # longer, cropped from sample -offset: out[j] = x[round((j - offset) / r)]
        assert length > n and got[0, 0].item() == x[round(-offset / rate)]
        assert got[0, n - 1].item() == x[min(round((n - 1 - offset) / rate), n - 1)]


def test_stretch_nearest_batches_rows_of_both_kinds():
    x = torch.randn(3, 1000)
    rates, offsets = torch.tensor([0.5, 1.5, 1.0]), torch.tensor([499, -250, 0])
    got = stretch_nearest(x, rates, offsets)
    for row in range(3):
        start = abs(int(offsets[row]))
        expected = authors_speed_perturbation(x[row].double().numpy(), float(rates[row]), start)
        assert np.array_equal(got[row].double().numpy(), expected), row
    assert torch.equal(got[2], x[2])  # rate 1, offset 0: the clip itself


def test_paper_speed_mode_draws_the_authors_offsets_and_stretches(device):
    """With speed_mode "paper" every chosen clip goes through stretch_nearest, at rates and offsets
    drawn from the Augment's generators, in the authors' ranges, without waiting for the device."""
    samples, batch = 4000, 64
    config = AugmentConfig(roll=False, speed_p=1.0, erase_p=0, mixup_alpha=0, label_smoothing=0, speed_mode="paper")
    frontend = LogMel(AudioConfig(sample_rate=8000, seconds=0.5, n_fft=256, hop_length=64, n_mels=32)).to(device)
    waveforms = (torch.randn(batch, samples) * 3000).to(torch.int16).to(device)
    augment = Augment(frontend, config, seed=3)
    augment.waveforms(waveforms)  # the first call makes the generator
    state = augment.get_rng_state()
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        moved = augment.waveforms(waveforms)
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    x = waveforms.float() / 32768
    twin = Augment(frontend, config, seed=3)
    twin.set_rng_state(state)
    chosen = twin._chosen(batch, 1.0, x)
    rates, offsets = twin._paper_speed(batch, samples, x)
    assert sorted(chosen.tolist()) == list(range(batch))  # p 1: every clip
    expected = x.index_copy(0, chosen, stretch_nearest(x[chosen], rates, offsets))
    assert torch.equal(moved, expected)
    assert rates.min() >= 0.5 and rates.max() < 1.5 and (rates < 1).any() and (rates > 1).any()
    lengths = torch.ceil(samples * rates.double()).long()
    shorter = lengths <= samples
    assert torch.all(offsets[shorter] >= 0) and torch.all(offsets[shorter] <= samples - lengths[shorter])
    assert torch.all(offsets[~shorter] <= 0) and torch.all(-offsets[~shorter] <= lengths[~shorter] - samples - 1)
    assert offsets.unique().numel() > batch // 2  # drawn per clip, not one for the batch
    filtered = Augment(frontend, AugmentConfig(**{**config.as_dict(), "speed_mode": "filtered"}), seed=3)
    filtered.set_rng_state(state)  # the same rows and rates, the other resampler
    assert (filtered.waveforms(waveforms) - moved).abs().max() > 0.01


def test_speed_mode_and_clamp_are_recipe_keys_the_paper_recipes_set():
    with pytest.raises(ValueError, match="augment.speed_mode must be one of filtered, paper, got 'nearest'"):
        AugmentConfig(speed_mode="nearest")
    with pytest.raises(RecipeError, match="speed_mode"):
        load_recipe(None, ["augment.speed_mode=linear"])
    with pytest.raises(RecipeError, match="model.clamp must be a bool"):
        load_recipe(None, ["model.clamp=1"])
    default = load_recipe(None)
    assert default.augment.speed_mode == "filtered" and default.model.clamp is True
    for name in PAPER_RECIPES:
        recipe = load_recipe(name)
        assert recipe.augment.speed_mode == "paper" and recipe.model.clamp is False, name
    assert load_recipe("cpu_small").model.clamp is True


TINY = [
    "model.source=timm:convnext_atto",
    "model.kernel=9",
    "model.count=5",
    'model.stem="4x4"',
    "audio.sample_rate=8000",
    "audio.seconds=0.5",
    "audio.n_fft=256",
    "audio.hop_length=64",
    "audio.n_mels=32",
    "train.batch_size=4",
    "train.epochs=1",
    "train.warmup_epochs=0",
    "train.workers=0",
    "train.precision=fp32",
    "train.device=cpu",
    "train.global_batch=0",
    "train.reference_batch=4",
    "augment.mixup_alpha=0",
]


@pytest.fixture(scope="module")
def eight_clips(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as handle:
        handle["audio_name"] = np.array([f"clip{i}".encode() for i in range(8)])
        handle["waveform"] = (rng.standard_normal((8, 4000)) * 3000).astype(np.int16)
        handle["target"] = np.eye(8, 2, dtype=bool) | np.eye(8, 2, k=-2, dtype=bool)
        handle.attrs.update(sample_rate=8000, class_names=json.dumps(["a", "b"]), multi_label=True)
    return path


@pytest.mark.parametrize("clamp", [True, False])
def test_the_training_loop_clamps_positions_only_when_the_recipe_says(eight_clips, tmp_path, monkeypatch, clamp):
    def positions_off_the_window(*args, **kwargs):
        model = build_model(*args, **kwargs)
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, Dcls2d):
                    layer.P.fill_(7.5)  # the 9x9 window ends at 4
        return model

    monkeypatch.setattr(train_module, "build_model", positions_off_the_window)
    result = train(load_recipe(None, [*TINY, f"model.clamp={str(clamp).lower()}"]), eight_clips, None, tmp_path / "run")
    assert result.steps == 2
    positions = [
        v for k, v in torch.load(tmp_path / "run/checkpoints/step_0000002.pt")["model"].items() if k.endswith(".P")
    ]
    largest = max(p.abs().max().item() for p in positions)
    if clamp:
        assert largest == 4.0
    else:  # two steps of at most about 5 x lr each: still far outside
        assert 7.0 < largest < 8.0


def _std_and_bias(layer):
    return layer.weight.std().item(), None if layer.bias is None else layer.bias.abs().max().item()


def test_new_stem_and_head_start_as_the_authors():
    """DCLS-Audio: stem conv and head layers from a normal of std 0.02 truncated at +-2, biases 0
    (PyTorch's default would give the 2x16 stem a std of 0.1)."""
    torch.manual_seed(0)
    model = rewrite(create_source("timm:convnext_atto"), num_classes=527, dcls=False, seed=1)
    stem, head = model.stem[0], model.get_classifier()
    assert stem.weight.shape == (40, 1, 2, 16)
    assert _std_and_bias(stem) == (pytest.approx(0.02, abs=0.002), 0.0)
    assert _std_and_bias(head) == (pytest.approx(0.02, abs=0.001), 0.0)
    assert stem.weight.abs().max() < 0.1 and head.weight.abs().max() < 0.12
    again = rewrite(create_source("timm:convnext_atto"), num_classes=527, dcls=False, seed=1)
    assert torch.equal(again.stem[0].weight, stem.weight) and torch.equal(again.get_classifier().weight, head.weight)
    # ConvFormer's MLP head, both layers; its stem conv has no bias
    metaformer = rewrite(
        MetaFormer(depths=(1, 1, 1, 1), dims=(16, 16, 16, 32), token_mixers=SepConv), num_classes=527, dcls=False
    )
    mlp = metaformer.get_classifier()
    assert metaformer.stem.conv.bias is None and metaformer.stem.conv.weight.std().item() == pytest.approx(
        0.02, abs=0.003
    )
    assert _std_and_bias(mlp.fc1) == (pytest.approx(0.02, abs=0.002), 0.0)
    assert _std_and_bias(mlp.fc2) == (pytest.approx(0.02, abs=0.001), 0.0)


def test_a_fine_tuned_checkpoints_new_head_starts_as_the_authors(tmp_path):
    recipe = load_recipe(None, TINY)
    model = build_model(recipe, 4)
    path = save(model, tmp_path / "four.safetensors", ["a", "b", "c", "d"], recipe.audio, True)
    tuned = build_model(load_recipe(None, [*TINY, f"model.source={json.dumps(str(path))}"]), 300)
    assert _std_and_bias(tuned.get_classifier()) == (pytest.approx(0.02, abs=0.001), 0.0)


def test_fastvit_layer_scales_start_at_the_authors_1e_6():
    model = create_source("timm:fastvit_t8")
    scales = [p for name, p in model.named_parameters() if name.endswith("gamma")]
    assert len(scales) == 20  # t8: 2 + 2 + 4 + 2 blocks, two layer scales each
    assert all(torch.all(p == torch.tensor(1e-6)) for p in scales)
    rewritten = rewrite(model, num_classes=10, dcls=False)
    assert all(torch.all(p == torch.tensor(1e-6)) for n, p in rewritten.named_parameters() if n.endswith("gamma"))
    own = create_source("timm:fastvit_t8", layer_scale_init_value=1e-5)  # a caller's value wins
    assert all(torch.all(p == torch.tensor(1e-5)) for n, p in own.named_parameters() if n.endswith("gamma"))


@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
def test_optimizers_use_the_authors_eps(optimizer):
    recipe = load_recipe(None, [*TINY, f"train.optimizer={optimizer}"])
    model = torch.nn.Linear(3, 2)
    made = make_optimizer(recipe.train, model, 1e-3)
    assert type(made).__name__ == {"adamw": "AdamW", "lamb": "Lamb"}[optimizer]
    assert all(group["eps"] == 1e-8 for group in made.param_groups)
