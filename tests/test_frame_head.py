"""model.head = "frames": a frame-wise head trained with the clip loss on its pooled frame scores. The recipe
keys, the two poolings against a hand computation, frames that pool to the clip, and a short run whose
checkpoint loads back, tags frames, exports and fine-tunes; single-label data refused, clip heads as before."""

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import save_file
from test_predict import tone
from test_train import CLASSES, TINY, make_set
from typer.testing import CliRunner

from dclsify import cli, convert, export, load, save
from dclsify.cli import app
from dclsify.pipeline.frames import frame_outputs
from dclsify.pipeline.plan import plan_run
from dclsify.pipeline.predict import Tagger
from dclsify.pipeline.recipe import RecipeError, load_recipe
from dclsify.pipeline.train import TrainError, build_model, train
from dclsify.surgery.checkpoint import METADATA_KEYS, CheckpointError, read_safetensors
from dclsify.surgery.heads import FRAME_POOLINGS, FrameHead, attach_frame_head, frame_head_of, head_parts

runner = CliRunner()
FRAMES = ['model.head="frames"', 'model.frame_pooling="attention"']
# 1-s clips: TINY's ConvNeXt-atto then ends with 3 time positions (0.5 s: one, where frames are the clip)
SHORT = ["audio.seconds=1.0", "train.epochs=1", "train.deterministic=true", "augment.speed_p=0", "augment.erase_p=0"]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=200))


@pytest.fixture(scope="module")
def frames_run(tmp_path_factory):
    """A frames head with attention pooling trained for one epoch (6 steps) on TINY's data."""
    folder = tmp_path_factory.mktemp("frame_head")
    data = make_set(folder / "train.h5", 24, 0)
    return train(load_recipe(None, TINY + SHORT + FRAMES), data, None, folder / "run"), data


def test_the_recipe_keys_default_to_a_clip_head_and_are_checked():
    assert (load_recipe(None).model.head, load_recipe(None).model.frame_pooling) == ("clip", "linear_softmax")
    assert load_recipe(None, FRAMES).model.frame_pooling == "attention"
    with pytest.raises(RecipeError, match="model.head must be one of clip, frames, got 'frame'"):
        load_recipe(None, ["model.head=frame"])
    with pytest.raises(RecipeError, match="model.frame_pooling must be one of linear_softmax, attention, got 'max'"):
        load_recipe(None, ["frame_pooling=max"])


def test_the_poolings_against_a_hand_computation():
    logits = torch.tensor([[[2.0, -1.0], [0.0, -3.0], [-2.0, 1.0]]])  # a clip of 3 positions, 2 classes
    embeddings = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    p = 1 / (1 + np.exp(-logits[0].double().numpy()))
    linear = FrameHead("linear_softmax", 2, 2)
    np.testing.assert_allclose(torch.sigmoid(linear.pool(logits, embeddings))[0], (p**2).sum(0) / p.sum(0), rtol=1e-6)
    attention = FrameHead("attention", 2, 2)
    weight, bias = np.array([[1.0, -1.0], [0.5, 2.0]]), np.array([0.0, -1.0])
    with torch.no_grad():
        attention.attention.weight.copy_(torch.from_numpy(weight))
        attention.attention.bias.copy_(torch.from_numpy(bias))
    scores = np.exp(embeddings[0].double().numpy() @ weight.T + bias)  # (positions, classes)
    expected = (scores / scores.sum(0) * p).sum(0)
    np.testing.assert_allclose(torch.sigmoid(attention.pool(logits, embeddings))[0].detach(), expected, rtol=1e-6)
    # far from 0.5 the clip logit stays exact, where logit(clamp(p, 1e-7, 1 - 1e-7)) would stop at +-16 and
    # give no gradient: a confident mistake still learns (at -200, sum(p) itself is 0 in float32)
    for value, target in ((30.0, 0.0), (-200.0, 1.0)):
        frame_logits = torch.full((1, 4, 1), value, requires_grad=True)
        clip = linear.pool(frame_logits, torch.zeros(1, 4, 2))
        assert clip.item() == pytest.approx(value, rel=1e-5)
        F.binary_cross_entropy_with_logits(clip, torch.full_like(clip, target)).backward()
        assert torch.isfinite(frame_logits.grad).all() and frame_logits.grad.abs().sum() > 0.5


@pytest.mark.parametrize("pooling", FRAME_POOLINGS)
def test_the_frame_scores_pool_to_the_clip_scores_as_the_head_pools_them(pooling):
    torch.manual_seed(0)
    model = convert("convnext_atto", {"num_classes": 3}, kernel=9, count=5, stem="4x4", input_size=(32, 400))
    model = attach_frame_head(model, pooling).eval()
    for parameter in model.parameters():  # trained-looking weights: frames that differ, attention not uniform
        parameter.data += 0.05 * torch.randn_like(parameter)
    spectrograms = torch.randn(2, 1, 32, 400)
    with torch.no_grad():
        outputs, clip = frame_outputs(model, spectrograms), model(spectrograms)
        head = frame_head_of(model)
        p = torch.sigmoid(outputs.frame_logits)
        if pooling == "linear_softmax":
            pooled = (p * p).sum(1) / p.sum(1)
        else:
            pooled = (head.attention(outputs.frame_embeddings).softmax(1) * p).sum(1)
        # each frame is normalised by itself: the first positions alone give the same frame logits
        alone = head(model.forward_features(spectrograms)[..., :4], head_parts(model)).frame_logits
    assert clip.shape == (2, 3) and outputs.frame_logits.shape == (2, 12, 3)
    assert outputs.clip_embeddings.shape == (2, 320)  # the mean of the frame embeddings
    torch.testing.assert_close(outputs.clip_logits, clip)  # the model's forward is the head's pooled output
    torch.testing.assert_close(pooled, torch.sigmoid(clip), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone, outputs.frame_logits[:, :4], rtol=1e-5, atol=1e-5)
    assert (outputs.frame_logits - outputs.clip_logits[:, None]).abs().max() > 1e-2  # the frames differ


def test_a_frames_run_records_its_head_and_its_checkpoint_loads_back_the_same(frames_run, tmp_path):
    result, _ = frames_run
    config = json.loads((result.run_dir / "config.json").read_text())
    assert (config["recipe"]["model"]["head"], config["recipe"]["model"]["frame_pooling"]) == ("frames", "attention")
    path = result.run_dir / "last.safetensors"
    with safe_open(path, framework="pt") as reader:
        assert reader.metadata()["frame_head"] == "attention" and "frame_head.attention.weight" in reader.keys()
    model = load(path).eval()
    assert frame_head_of(model).pooling == "attention" and model.multi_label
    trained = torch.load(sorted((result.run_dir / "checkpoints").glob("*.pt"))[-1])["model"]
    assert model.state_dict().keys() == trained.keys()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, trained[key]), key
    again = load(save(model, tmp_path / "again.safetensors", model.class_names, model.audio, True)).eval()
    spectrograms = torch.randn(2, 1, 32, 126)
    with torch.no_grad():
        assert torch.equal(again(spectrograms), model(spectrograms))


def test_the_tagger_gives_the_heads_own_frames(frames_run):
    tagger = Tagger(frames_run[0].run_dir / "last.safetensors", "cpu")
    clip = torch.from_numpy(np.round(tone(300, 8000, 1.0) * 32767).astype(np.int16))
    outputs = tagger.outputs([clip, clip.flip(0)])
    with torch.no_grad():
        weights = frame_head_of(tagger.model).attention(outputs.frame_embeddings).softmax(1)
    pooled = (weights * torch.sigmoid(outputs.frame_logits)).sum(1)
    assert outputs.frame_logits.shape == (2, 3, 4)
    np.testing.assert_allclose(pooled, tagger.score([clip, clip.flip(0)]), atol=1e-6)
    frames = tagger.frames(tone(300, 8000, 2.0), sample_rate=8000, step=0.1)
    assert frames.scores.shape == (4, 20) and np.all((frames.scores > 0) & (frames.scores < 1))
    assert tagger.embed(tone(300, 8000, 2.0), sample_rate=8000).shape == (tagger.embedding_size,) == (320,)


@pytest.mark.parametrize(("format", "with_frontend"), [("dense", False), ("torchscript", True), ("onnx", False)])
def test_a_frames_model_exports(frames_run, tmp_path, format, with_frontend):
    if format == "onnx":
        pytest.importorskip("onnxruntime")
    report = export(frames_run[0].run_dir / "last.safetensors", tmp_path / f"model.{format}", format, with_frontend)
    assert report.max_abs_diff <= 1e-4 and report.output_shape == ("batch", 4)  # export checks it against the model


def test_fine_tuning_from_a_frames_checkpoint_keeps_or_changes_its_head(frames_run, tmp_path):
    result, data = frames_run
    path = result.run_dir / "last.safetensors"
    training = [o for o in TINY + SHORT if o.startswith(("train.", "augment."))]  # the rest is the checkpoint's
    start = [f"model.source={json.dumps(str(path))}", *training]
    recipe = load_recipe(None, start)
    saved = load(path).state_dict()
    with safe_open(path, framework="pt") as reader:
        stored = len(list(reader.keys()))  # shared positions stored once
    model = build_model(recipe, 4, class_names=CLASSES)
    assert all(torch.equal(tensor, saved[key]) for key, tensor in model.state_dict().items())
    assert model.state_dict().keys() == saved.keys() and model.fine_tuning.tensors_kept == stored
    assert "head kept (4 classes), its frames head (attention pooling);" in model.fine_tuning.describe()
    other = build_model(recipe, 3, class_names=["a", "b", "c"])  # new classes: a new attention layer too
    assert frame_head_of(other).attention.out_features == 3 and other.fine_tuning.tensors_kept == stored - 4
    probe = build_model(load_recipe(None, [*start, "model.freeze=true"]), 3, class_names=["a", "b", "c"])
    assert all(p.requires_grad for p in frame_head_of(probe).parameters())  # a linear probe trains the pooling
    clip = build_model(load_recipe(None, [*start, "model.head=clip"]), 4, class_names=CLASSES)
    assert frame_head_of(clip) is None and "forward_head" not in vars(clip)
    assert clip.fine_tuning.tensors_kept == stored - 2  # all but the attention layer
    assert "a clip head where the checkpoint has a frames head (attention pooling)" in clip.fine_tuning.describe()
    train(recipe, data, None, tmp_path / "tuned", stop_after=1)
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert config["recipe"]["model"]["head"] == "frames" and config["fine_tuning"]["frame_pooling"] == "attention"


def test_single_label_data_is_refused_before_the_run_starts(tmp_path):
    data = make_set(tmp_path / "single.h5", 8, 0)
    with h5py.File(data, "a") as handle:
        handle.attrs["multi_label"] = False
    recipe = load_recipe(None, TINY + FRAMES)
    with pytest.raises(TrainError, match='model.head = "frames" is for multi-label data .* set model.head=clip'):
        train(recipe, data, None, tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()
    with pytest.raises(TrainError, match="is for multi-label data"):
        plan_run(recipe, data)  # --dry-run (and dclsify cv, which plans first) too


def test_a_clip_head_is_as_before_and_dry_run_names_the_head(frames_run, tmp_path):
    clip = build_model(load_recipe(None, TINY), 4)
    assert frame_head_of(clip) is None and "forward_head" not in vars(clip)
    with safe_open(save(clip, tmp_path / "clip.safetensors"), framework="pt") as reader:
        metadata, stored = reader.metadata(), set(reader.keys())
        ours = {key for key, value in metadata.items() if value not in stored}  # the others name shared tensors
        assert ours == set(METADATA_KEYS) and not any("frame_head" in key for key in reader.keys())
    linear = build_model(load_recipe(None, [*TINY, "model.head=frames"]), 4)  # linear softmax adds no tensor
    assert linear.state_dict().keys() == clip.state_dict().keys() and frame_head_of(linear).pooling == "linear_softmax"
    path = save(linear, tmp_path / "frames.safetensors")
    tensors = read_safetensors(path)
    with safe_open(path, framework="pt") as reader:
        metadata = {**reader.metadata(), "frame_head": "max"}
    save_file(tensors, tmp_path / "damaged.safetensors", metadata)
    with pytest.raises(CheckpointError, match="'frame_head' must be one of linear_softmax, attention"):
        load(tmp_path / "damaged.safetensors")
    options = [arg for option in TINY + FRAMES for arg in ("--set", option)]
    shown = runner.invoke(app, ["train", "--dry-run", "--data", str(frames_run[1]), *options])
    assert shown.exit_code == 0, shown.output
    assert "frames head (attention pooling)" in shown.output and 'head = "frames"' in shown.output
