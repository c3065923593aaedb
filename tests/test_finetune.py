"""Fine-tuning from a dclsify checkpoint: what is kept (layers, front-end, head where the classes are
the same), layer-wise learning-rate decay, a frozen body for a linear probe, the two built-in recipes,
resume, and the errors before any training starts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from test_train import TINY, losses, make_set
from torch import nn
from typer.testing import CliRunner

from dclsify import cli, load
from dclsify.cli import app
from dclsify.pipeline.plan import plan_run
from dclsify.pipeline.recipe import RecipeError, load_recipe
from dclsify.pipeline.train import TrainError, build_model, parameter_groups, stage_depths, train
from dclsify.surgery.checkpoint import convert, save

runner = CliRunner()
CLASSES = ["low", "middle", "high", "chirp"]
OTHER_CLASSES = ["hum", "whistle", "sweep"]
# TINY's training settings alone: the layers and the front-end are to come from the checkpoint
TRAINING = [o for o in TINY if o.startswith("train.")]
LR = 2e-3  # TINY's rate, at its own reference batch


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=200))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny ConvNeXt-atto trained for an epoch on 8-kHz clips of four classes: its best.safetensors."""
    folder = tmp_path_factory.mktemp("pretrained")
    train_set = make_set(folder / "train.h5", 24, 0, 8000, CLASSES)
    eval_set = make_set(folder / "eval.h5", 12, 1, 8000, CLASSES)
    result = train(load_recipe(None, [*TINY, "train.epochs=1"]), train_set, eval_set, folder / "run")
    return result.best_checkpoint


@pytest.fixture(scope="module")
def new_data(tmp_path_factory) -> dict[str, Path]:
    """16-kHz training sets: the checkpoint's four classes, and three others."""
    folder = tmp_path_factory.mktemp("new")
    return {
        "same": make_set(folder / "same.h5", 24, 2, 16000, CLASSES),
        "other": make_set(folder / "other.h5", 24, 3, 16000, OTHER_CLASSES),
    }


def from_checkpoint(checkpoint: Path, *more: str) -> list[str]:
    return [f"model.source={json.dumps(str(checkpoint))}", *TRAINING, *more]


def stored_tensors(checkpoint: Path) -> int:
    with safe_open(checkpoint, framework="pt") as reader:
        return len(list(reader.keys()))  # shared positions stored once


def test_new_classes_get_a_new_head_and_the_checkpoints_front_end(pretrained, new_data, tmp_path):
    console = Console(record=True, width=300)
    recipe = load_recipe(None, from_checkpoint(pretrained, "train.epochs=1"))
    train(recipe, new_data["other"], None, tmp_path / "run", console=console)
    first_line = console.export_text().splitlines()[0]
    assert first_line == (
        f"fine-tuning from {pretrained}: {stored_tensors(pretrained) - 2} tensors kept, head new (4 -> 3 classes); "
        "the checkpoint's front-end"
    )
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["recipe"]["audio"] == load(pretrained).audio.as_dict()  # 8 kHz, 32 mels: not the data's 16 kHz
    assert config["recipe"]["audio"]["sample_rate"] == 8000
    model = config["recipe"]["model"]
    assert (model["kernel"], model["count"], model["stem"], model["dcls"]) == (9, 5, "4x4/4x4", True)  # its layers
    assert config["fine_tuning"] == {
        "source": str(pretrained),
        "tensors_kept": stored_tensors(pretrained) - 2,  # all but head.fc's weight and bias
        "head_kept": False,
        "checkpoint_classes": 4,
        "classes": 3,
        "audio_recorded": True,
        "audio_overrides": {},
        "frozen": False,
        "frame_pooling": None,  # a clip head, as the checkpoint's
        "checkpoint_frame_pooling": None,
    }
    tuned = load(tmp_path / "run" / "last.safetensors")
    assert tuned.class_names == OTHER_CLASSES and tuned.audio.sample_rate == 8000
    assert tuned.dclsify.config.input_size == (32, 63)

    console = Console(record=True, width=300)  # the recipe's own rate, where it sets one
    recipe = load_recipe(None, from_checkpoint(pretrained, "audio.sample_rate=16000"))
    train(recipe, new_data["other"], None, tmp_path / "at16k", console=console, stop_after=1)
    assert (
        console.export_text().splitlines()[0].endswith("the checkpoint's front-end, audio.sample_rate 16000 (its 8000)")
    )
    audio = json.loads((tmp_path / "at16k" / "config.json").read_text())["recipe"]["audio"]
    assert audio == {**load(pretrained).audio.as_dict(), "sample_rate": 16000}  # the other settings still its own


def test_the_same_classes_keep_the_head(pretrained, new_data, tmp_path):
    checkpoint = load(pretrained).state_dict()
    recipe = load_recipe(None, from_checkpoint(pretrained))
    model = build_model(recipe, 4, class_names=CLASSES)  # what train() starts from, at step 0
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, checkpoint[key]), key
    assert model.fine_tuning.head_kept and model.fine_tuning.tensors_kept == stored_tensors(pretrained)
    assert model.fine_tuning.describe().endswith("head kept (4 classes); the checkpoint's front-end")
    reordered = build_model(recipe, 4, class_names=CLASSES[::-1])  # the same names in another order: a new head
    assert not reordered.fine_tuning.head_kept
    assert "head new (4 classes, not the checkpoint's names in its order)" in reordered.fine_tuning.describe()
    assert not torch.equal(reordered.head.fc.weight, checkpoint["head.fc.weight"])

    result = train(recipe, new_data["same"], None, tmp_path / "run", stop_after=1)
    after = torch.load(tmp_path / "run" / "checkpoints" / "step_0000001.pt")["model"]
    head = checkpoint["head.fc.weight"]
    moved = (after["head.fc.weight"] - head).abs().max()
    # one AdamW step moves a weight by at most the rate (and its decay, 0.05 x the rate x the weight):
    # the head it moved was the checkpoint's, not a new one (std 0.02)
    assert result.steps == 1 and LR * 0.99 < moved <= LR * (1 + 0.05 * head.abs().max()) * 1.0001
    assert json.loads((tmp_path / "run" / "config.json").read_text())["fine_tuning"]["head_kept"] is True


def expected_depth(name: str, stages: int = 4) -> int:
    top, _, rest = name.partition(".")
    if top == "stem":
        return stages + 1
    if top == "stages":
        return stages - int(rest.split(".")[0])
    return 0


def test_layer_decay_gives_each_stage_its_rate():
    model = build_model(None, 4, TINY)
    groups = parameter_groups(model, 0.05, 5.0, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(scale_of) == len(named) and groups[0]["lr_scale"] == 1.0  # the first at the schedule's own rate
    for name, parameter in named.items():
        position = name.endswith((".P", ".SIG"))
        assert scale_of[id(parameter)] == 0.5 ** expected_depth(name) * (5.0 if position else 1.0), name
    assert scale_of[id(named["stem.0.weight"])] == 0.5**5 and scale_of[id(named["head.fc.weight"])] == 1.0
    assert scale_of[id(named["stages.0.blocks.0.conv_dw.P"])] == 5 * 0.5**4  # positions keep their own 5x
    decayed = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {id(p) for n, p in named.items() if p.ndim > 1 and not n.endswith((".P", ".SIG"))}
    assert len(parameter_groups(model, 0.05, 5.0)) == 3  # off: the three groups of old


@pytest.mark.parametrize(
    ("name", "stem", "after_the_stages"),
    [
        ("convformer_s18", "stem.conv.weight", ["head.norm.weight", "head.fc.fc2.weight"]),
        ("fastvit_t8", "stem.weight", ["final_conv.se.fc1.weight", "head.fc.weight"]),  # its stem: one conv
    ],
)
def test_stage_depths_of_the_other_families(name, stem, after_the_stages):
    model = convert(f"timm:{name}", kernel=9, count=5, stem="4x4", num_classes=3, input_size=(32, 63))
    depths = stage_depths(model)
    assert depths[stem] == 5 and all(depths[n] == 0 for n in after_the_stages)
    for parameter_name, depth in depths.items():
        assert depth == expected_depth(parameter_name), parameter_name
    assert sorted(set(depths.values())) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(TrainError, match=r"train.layer_decay needs a model built of stages .* set train.layer_decay=1"):
        stage_depths(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 3)))


def test_a_step_moves_each_stage_at_its_rate(pretrained, new_data, tmp_path):
    recipe = load_recipe(None, from_checkpoint(pretrained, "train.layer_decay=0.5", "model.drop_path=0"))
    train(recipe, new_data["same"], None, tmp_path / "run", stop_after=1)  # the head kept: every weight known
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_0000001.pt")
    before, after = load(pretrained).state_dict(), state["model"]
    steps = 2 * 6  # 24 clips in batches of 4, 2 epochs, no warm-up
    cosine = 1e-6 + 0.5 * (LR - 1e-6) * (1 + math.cos(math.pi * 1 / steps))  # timm's rate after step 1
    groups = state["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([cosine * g["lr_scale"] for g in groups], rel=1e-12)
    assert sorted({g["lr_scale"] for g in groups if g["weight_decay"]}) == [0.5**d for d in (5, 4, 3, 2, 1, 0)]
    # step 1 of AdamW moves a weight without decay by the rate times g / (|g| + eps): the rate, at most
    largest = {}
    for name, tensor in after.items():
        if tensor.ndim == 1 and tensor.is_floating_point():
            depth = expected_depth(name)
            largest[depth] = max(largest.get(depth, 0.0), float((tensor - before[name]).abs().max()))
    assert largest == pytest.approx({d: LR * 0.5**d for d in range(6)}, rel=1e-3)


def test_resuming_a_fine_tuning_run_is_exact(pretrained, new_data, tmp_path):
    recipe = load_recipe(None, from_checkpoint(pretrained, "train.layer_decay=0.7", "train.checkpoint_every=2"))
    whole = train(recipe, new_data["other"], None, tmp_path / "whole")
    part = train(recipe, new_data["other"], None, tmp_path / "part", stop_after=7)
    assert part.interrupted and part.steps == 7
    resumed = train(out=tmp_path / "part", resume=True)
    assert resumed.steps == whole.steps == 12
    assert losses(tmp_path / "part") == losses(tmp_path / "whole")
    a, b = (torch.load(tmp_path / run / "checkpoints" / "step_0000012.pt")["model"] for run in ("whole", "part"))
    assert all(torch.equal(tensor, b[key]) for key, tensor in a.items())
    recorded = json.loads((tmp_path / "part" / "config.json").read_text())
    assert recorded["recipe"]["audio"]["sample_rate"] == 8000 and recorded["fine_tuning"]["head_kept"] is False


def test_a_linear_probe_trains_the_head_alone_and_keeps_the_batch_norm_statistics(new_data, tmp_path):
    # FastViT has batch norm: its running statistics would follow the new data in training mode
    source = convert("timm:fastvit_t8", kernel=9, count=5, stem="4x4", num_classes=4, input_size=(32, 63))
    save(source, tmp_path / "fastvit.safetensors", CLASSES)  # no front-end recorded, as convert writes them
    audio = [o for o in TINY if o.startswith("audio.")]
    recipe = load_recipe("linear_probe", from_checkpoint(tmp_path / "fastvit.safetensors", *audio, "train.epochs=1"))
    console = Console(record=True, width=300)
    result = train(recipe, new_data["other"], None, tmp_path / "probe", console=console)
    assert (
        console.export_text()
        .splitlines()[0]
        .endswith(
            "head new (4 -> 3 classes); the checkpoint records no front-end: the recipe's; "
            "the body frozen, in eval mode: the head alone trains"
        )
    )
    before = load(tmp_path / "fastvit.safetensors").state_dict()
    after = torch.load(tmp_path / "probe" / "checkpoints" / f"step_{result.steps:07d}.pt")["model"]
    statistics = [key for key in after if key.endswith("running_mean")]
    assert result.steps == 6 and len(statistics) > 10
    for key, tensor in after.items():
        if key.startswith("head.fc."):
            assert tensor.shape[0] == 3
        else:
            assert torch.equal(tensor, before[key]), key  # weights and batch-norm statistics alike
    torch.manual_seed(0)  # as train() seeds itself before it builds the model
    initial = build_model(recipe, 3, class_names=OTHER_CLASSES).head.fc.weight
    assert not torch.equal(after["head.fc.weight"], initial)  # the new head learned


def test_fine_tuning_errors_come_before_any_training(pretrained, new_data, tmp_path):
    data = new_data["other"]
    for name in ("finetune", "linear_probe"):
        with pytest.raises(TrainError) as error:
            train(load_recipe(name), data, None, tmp_path / name)
        assert str(error.value) == (
            "model.source is empty: this recipe fine-tunes a dclsify checkpoint; "
            "name it with --set model.source=CHECKPOINT.safetensors"
        )
    command = runner.invoke(app, ["train", "--recipe", "finetune", "--data", str(data), "--out", str(tmp_path / "c")])
    assert command.exit_code == 1 and "--set model.source=CHECKPOINT.safetensors" in command.output
    assert "Traceback" not in command.output

    too_few_mels = load_recipe(None, from_checkpoint(pretrained, "audio.n_mels=8"))  # 8 mels: 2 rows after the stem
    with pytest.raises(
        TrainError, match=r"cannot run on this run's spectrograms of 8 mels x 63 frames .* made for 32 x 63"
    ):
        train(too_few_mels, data, None, tmp_path / "mels")
    assert not (tmp_path / "mels").exists()

    rgb = convert("timm:convnext_atto", kernel=9, count=5, stem=None, num_classes=4, input_size=(32, 63))
    save(rgb, tmp_path / "rgb.safetensors")
    with pytest.raises(TrainError, match="takes 3-channel input, not the 1 channel of a log-mel spectrogram"):
        train(load_recipe(None, from_checkpoint(tmp_path / "rgb.safetensors")), data, None, tmp_path / "rgb")
    with pytest.raises(TrainError, match="no such checkpoint"):
        train(load_recipe(None, from_checkpoint(tmp_path / "none.safetensors")), data, None, tmp_path / "none")
    for value in ("0", "1.5"):
        with pytest.raises(RecipeError, match=r"train.layer_decay must be in \(0, 1\]"):
            load_recipe("finetune", [f"train.layer_decay={value}"])


def test_dry_run_shows_the_recipe_resolved_from_the_checkpoint(pretrained, new_data):
    args = ["train", "--recipe", "finetune", "--data", str(new_data["other"]), "--dry-run"]
    args += ["--set", f"model.source={pretrained}", "--set", "train.batch_size=4"]  # a bare path, as typed
    text = runner.invoke(app, args)
    assert text.exit_code == 0, text.output
    assert f"source  fine-tuning from {pretrained}: " in text.output and "head new (4 -> 3 classes)" in text.output
    assert "\n[audio]\nsample_rate = 8000\n" in text.output and "layer_decay = 0.6" in text.output
    plan = json.loads(runner.invoke(app, [*args, "--json"]).output)
    assert plan["recipe"]["audio"] == load(pretrained).audio.as_dict() and plan["recipe"]["model"]["kernel"] == 9
    assert plan["fine_tuning"]["head_kept"] is False and plan["classes"] == 3
    without_data = plan_run("finetune", overrides=[f"model.source={json.dumps(str(pretrained))}"])
    assert without_data.classes == 4 and without_data.fine_tuning.head_kept  # the checkpoint's own classes


@pytest.mark.filterwarnings("ignore:MobileNetV3 is not a registered family")
def test_layer_decay_on_a_model_without_stages_is_refused_before_the_run_writes_anything(new_data, tmp_path):
    overrides = [*TINY, "model.source=timm:mobilenetv3_small_050", "model.match=5", "train.layer_decay=0.6"]
    with pytest.raises(TrainError, match=r"needs a model built of stages .* this MobileNetV3 has none"):
        plan_run(None, new_data["same"], overrides=overrides)  # what --dry-run and dclsify cv check first
    with pytest.raises(TrainError, match=r"needs a model built of stages"):
        train(load_recipe(None, overrides), new_data["same"], None, tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()
