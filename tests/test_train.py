"""Training and evaluation on tiny generated data: the loss falls, resume is exact, DDP agrees,
every recipe builds, and every user error is one clear message."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile
import torch
from rich.console import Console
from sklearn.metrics import average_precision_score
from typer.testing import CliRunner

from dclsify import cli, export, load
from dclsify.cli import app
from dclsify.pipeline.recipe import RecipeError, builtin_recipes, load_recipe
from dclsify.pipeline.train import TrainError, build_model, parameter_groups, train
from dclsify.surgery.dcls import Dcls2d, LargeKernelConv2d

runner = CliRunner()
CLASSES = ["low", "middle", "high", "chirp"]
RATE, SECONDS = 8000, 0.5
# A tiny model on a tiny spectrogram: ConvNeXt-atto with a 4x4 stem on 32 mels x 63 frames.
TINY = [
    "model.source=timm:convnext_atto",
    "model.kernel=9",
    "model.count=5",
    'model.stem="4x4"',
    "model.drop_path=0.1",
    "audio.sample_rate=8000",
    "audio.seconds=0.5",
    "audio.n_fft=256",
    "audio.hop_length=64",
    "audio.n_mels=32",
    "train.batch_size=4",
    "train.epochs=2",
    "train.warmup_epochs=0",
    "train.workers=0",
    "train.precision=fp32",
    "train.device=cpu",
    "train.lr=2e-3",
    "train.global_batch=0",
    "train.reference_batch=4",
    "train.log_every=1",
]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=200))


def make_set(path: Path, clips: int, seed: int, rate: int = RATE, classes: list[str] = CLASSES) -> Path:
    """Classes a small CNN tells apart at once: three tones and a chirp (all below 4 kHz), one or two a
    clip, at ``rate``, named ``classes`` (four at most)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * SECONDS)) / rate
    sounds = [np.sin(2 * np.pi * f * t) for f in (300, 1000, 3000)] + [np.sin(2 * np.pi * (500 * t + 3000 * t**2))]
    waveforms = np.zeros((clips, len(t)), dtype=np.int16)
    targets = np.zeros((clips, len(classes)), dtype=bool)
    for i in range(clips):
        present = rng.choice(len(classes), size=1 + (i % 3 == 0), replace=False)
        mix = sum(rng.uniform(0.2, 0.5) * sounds[c] for c in present) + 0.01 * rng.standard_normal(len(t))
        waveforms[i] = np.clip(mix * 32767, -32768, 32767)
        targets[i, present] = True
    with h5py.File(path, "w") as handle:
        handle["audio_name"] = np.array([f"clip{i}".encode() for i in range(clips)])
        handle["waveform"] = waveforms
        handle["target"] = targets
        handle.attrs.update(sample_rate=rate, class_names=json.dumps(classes), multi_label=True)
    return path


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return make_set(folder / "train.h5", 24, 0), make_set(folder / "eval.h5", 16, 1)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


def test_a_few_steps_lower_the_loss_and_export_the_best_model(sets, tmp_path):
    train_set, eval_set = sets
    quiet = ["augment.speed_p=0", "augment.erase_p=0", "augment.mixup_alpha=0", "train.epochs=6", "train.lr=4e-3"]
    result = train(load_recipe(None, TINY + quiet), train_set, eval_set, tmp_path / "run")
    history = [loss for _, loss in losses(tmp_path / "run")]
    assert result.steps == 36 and len(history) == 36
    assert np.mean(history[-6:]) < 0.8 * np.mean(history[:6]), history
    model = load(result.best_checkpoint)
    assert model.class_names == CLASSES and model.audio.sample_rate == RATE and model.audio.n_mels == 32
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert result.best_map is not None and result.best_map > 0.3
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["recipe"]["model"]["kernel"] == 9 and config["class_names"] == CLASSES


# train.deterministic on: the runs below are made in different processes, each timing nothing
DETERMINISTIC = TINY + [
    "train.deterministic=true",
    "train.epochs=2",
    "train.checkpoint_every=2",
    "train.keep=2",
    "train.ema_decay=0.9",
]


def train_in_a_new_process(*args: str) -> None:
    """``python -m dclsify train ARGS`` in a process of its own: nothing timed, cached or seeded by this one."""
    command = [sys.executable, "-m", "dclsify", "train", *args]
    env = {**os.environ, "COLUMNS": "200"}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr


@pytest.fixture(scope="module")
def uninterrupted(sets, tmp_path_factory):
    """The uninterrupted deterministic run of 12 steps on a device, trained (once) in a process of its own."""
    runs = {}

    def run(device: torch.device) -> Path:
        if device.type not in runs:
            runs[device.type] = tmp_path_factory.mktemp("uninterrupted") / device.type
            overrides = [*DETERMINISTIC, f"train.device={device.type}"]
            sets_args = [item for override in overrides for item in ("--set", override)]
            train_in_a_new_process("--data", str(sets[0]), "--out", str(runs[device.type]), *sets_args)
        return runs[device.type]

    return run


def assert_same_bits(run: Path, other: Path) -> None:
    """The same loss at every step and the same model, EMA and optimiser state at the end, bit for bit."""
    assert losses(run) == losses(other)  # the same floats, every step
    a, b = (torch.load(path / "checkpoints/step_0000012.pt") for path in (run, other))
    for part in ("model", "ema"):
        for key, tensor in a[part].items():
            assert torch.equal(tensor, b[part][key]), (part, key)
    for index, state in a["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, b["optimizer"]["state"][index][name]), (index, name)


def test_deterministic_runs_in_two_processes_are_bit_identical(sets, uninterrupted, tmp_path, device):
    train_set, _ = sets
    again = train(load_recipe(None, [*DETERMINISTIC, f"train.device={device.type}"]), train_set, None, tmp_path / "b")
    assert again.steps == 12
    assert_same_bits(uninterrupted(device), tmp_path / "b")
    final = [load(path / "last.safetensors").state_dict() for path in (uninterrupted(device), tmp_path / "b")]
    assert all(torch.equal(tensor, final[1][key]) for key, tensor in final[0].items())


def test_interrupted_and_resumed_in_a_new_process_equals_uninterrupted_bit_for_bit(
    sets, uninterrupted, tmp_path, device
):
    train_set, _ = sets
    recipe = load_recipe(None, [*DETERMINISTIC, f"train.device={device.type}"])
    part = train(recipe, train_set, None, tmp_path / "part", stop_after=9)  # mid-epoch 2 (6 steps an epoch)
    assert part.interrupted and part.steps == 9
    kept = sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir())
    assert kept == ["step_0000008.pt", "step_0000009.pt"]  # the last `keep`
    train_in_a_new_process("--resume", str(tmp_path / "part"))
    assert_same_bits(uninterrupted(device), tmp_path / "part")


def test_balanced_sampling_with_a_black_list_resumes_bit_for_bit(sets, tmp_path, monkeypatch):
    from dclsify.pipeline import loader as loader_module

    train_set, _ = sets
    (tmp_path / "black.csv").write_text("clip3\nclip10\nclip99\n")
    balanced = ["train.sampler=balanced", "train.epoch_clips=12", "train.checkpoint_every=2", "train.ema_decay=0.9"]
    recipe = load_recipe(None, TINY + balanced)
    drawn = []  # the epochs whose global draw the balanced sampler made
    real_order = loader_module.BalancedSampler.order
    monkeypatch.setattr(
        loader_module.BalancedSampler, "order", lambda self: drawn.append(self.epoch) or real_order(self)
    )
    whole = train(recipe, train_set, None, tmp_path / "whole", blacklist=tmp_path / "black.csv")
    assert whole.steps == 6 and drawn == [0, 1]  # 12 clips of 4 an epoch, 2 epochs
    part = train(recipe, train_set, None, tmp_path / "part", stop_after=4, blacklist=tmp_path / "black.csv")
    assert part.interrupted and part.steps == 4  # in the middle of epoch 2
    resumed = train(out=tmp_path / "part", resume=True)  # the black list comes from config.json
    assert resumed.steps == 6 and drawn == [0, 1, 0, 1, 1]
    assert losses(tmp_path / "part") == losses(tmp_path / "whole")
    a, b = (torch.load(tmp_path / run / "checkpoints/step_0000006.pt") for run in ("whole", "part"))
    for part_name in ("model", "ema"):
        for key, tensor in a[part_name].items():
            assert torch.equal(tensor, b[part_name][key]), (part_name, key)
    recorded = json.loads((tmp_path / "part" / "config.json").read_text())["blacklist"]
    assert {k: recorded[k] for k in ("path", "ids", "skipped", "unmatched")} == {
        "path": str(tmp_path / "black.csv"),
        "ids": 3,
        "skipped": 2,
        "unmatched": 1,
    }
    (tmp_path / "black.csv").write_text("clip3\n")
    with pytest.raises(TrainError, match="changed since the run started"):
        train(out=tmp_path / "part", resume=True)


def test_train_and_eval_leave_a_black_lists_clips_out(sets, tmp_path):
    from dclsify.pipeline.evaluate import evaluate

    train_set, eval_set = sets
    (tmp_path / "train_black.csv").write_text("clip1\nclip5\nclip7.wav\nnot_a_clip\n")
    run = tmp_path / "run"
    args = ["train", "--data", str(train_set), "--out", str(run)]
    args += [item for override in [*TINY, "train.epochs=1"] for item in ("--set", override)]
    missing = runner.invoke(app, [*args, "--blacklist", str(tmp_path / "nope.csv")])
    assert missing.exit_code == 1 and "no such black list" in missing.output and "Traceback" not in missing.output
    assert not run.exists()
    args += ["--blacklist", str(tmp_path / "train_black.csv")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    expected = f"black list {tmp_path / 'train_black.csv'}: 3 clips skipped; 1 of its 4 ids name no clip here"
    assert f"training data: {expected}" in result.output
    assert "5 steps in" in result.output  # 21 clips of the 24 make 5 batches of 4
    again = runner.invoke(app, ["train", "--resume", str(run), "--blacklist", str(tmp_path / "train_black.csv")])
    assert again.exit_code == 1 and "give no --recipe" in again.output and "--blacklist" in again.output

    (tmp_path / "eval_black.csv").write_text("# four of the sixteen\nclip0\nclip4\nclip8\nclip12\n")
    with h5py.File(eval_set) as source, h5py.File(tmp_path / "rest.h5", "w") as handle:  # the same, by hand
        keep = np.arange(16) % 4 != 0
        for key in ("audio_name", "waveform", "target"):
            handle[key] = source[key][:][keep]
        handle.attrs.update(source.attrs)
    checkpoint = str(run / "last.safetensors")
    command = ["eval", checkpoint, "--data", str(eval_set), "--blacklist", str(tmp_path / "eval_black.csv")]
    reported = json.loads(runner.invoke(app, [*command, "--json"]).output)
    assert reported["clips"] == 12 and reported["blacklisted"]["skipped"] == 4
    assert reported["blacklisted"]["unmatched"] == 0
    assert reported["mAP"] == evaluate(checkpoint, tmp_path / "rest.h5").mAP
    printed = runner.invoke(app, command)
    assert printed.exit_code == 0 and f"black list {tmp_path / 'eval_black.csv'}: 4 clips skipped" in printed.output
    bad = runner.invoke(app, [*command[:-1], str(tmp_path)])
    assert bad.exit_code == 1 and "no such black list" in bad.output and "Traceback" not in bad.output


def test_parameter_groups_follow_the_paper():
    recipe = load_recipe(None, TINY)
    model = build_model(recipe, 4)
    groups = parameter_groups(model, 0.05, 5.0)
    decay, no_decay, positions = (g["params"] for g in groups)
    assert groups[2]["lr_scale"] == 5.0 and groups[2]["weight_decay"] == 0 == groups[1]["weight_decay"]
    assert len(positions) == 8  # P and SIG of 4 stages, each shared by the stage's layers, counted once
    assert all(p.ndim == 4 for p in positions) and all(p.ndim == 1 for p in no_decay) and all(p.ndim > 1 for p in decay)
    unique = {id(p) for p in model.parameters()}
    assert len(decay) + len(no_decay) + len(positions) == len(unique)


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_recipe_parses_and_builds_its_model(name):
    recipe = load_recipe(name)
    if name == "demo":
        return  # built and trained by test_demo
    if name in ("finetune", "linear_probe"):  # built from a checkpoint by test_finetune
        assert recipe.model.source == "" and recipe.train.global_batch == 0 and recipe.train.eval_every == 1
        with pytest.raises(TrainError, match="--set model.source=CHECKPOINT.safetensors"):
            build_model(recipe, 527)
        return
    model = build_model(recipe, 527)
    counts = {  # the authors' parameter counts (README), shared P/SIG once
        "convnext_tiny_dsc": 28_223_855,
        "convnext_tiny_dcls": 28_221_263,
        "convformer_s18_dsc": 25_797_847,
        "convformer_s18_dcls": 25_781_207,
        "fastvit_sa24_dsc": 21_064_015,
        "fastvit_sa24_dcls": 21_016_655,
    }
    if name in counts:
        assert sum(p.numel() for p in model.parameters()) == counts[name]
        assert recipe.train.optimizer == ("lamb" if name.startswith("convformer") else "adamw")
        assert recipe.audio.input_size == (128, 1001) and recipe.model.drop_path == 0.4


def test_recipe_errors_name_the_key():
    cases = [
        (["train.lr=fast"], "train.lr must be a float"),
        (["train.lrr=1"], "unknown recipe key 'train.lrr'; did you mean train.lr"),
        (["batchsize=3"], "unknown recipe key 'batchsize'; did you mean train.batch_size"),
        (["train.optimizer=sgd"], "train.optimizer must be one of adamw, lamb"),
        (["augment.speed_p=2"], "augment.speed_p must be a probability"),
        (["audio.f_max=20000"], "f_max"),
        (["lr"], "--set takes section.key=value"),
        (["train.sampler=random"], "train.sampler must be one of uniform, balanced, got 'random'"),
        (["train.epoch_clips=-1"], "train.epoch_clips must be >= 0"),
    ]
    for overrides, message in cases:
        with pytest.raises(RecipeError) as error:
            load_recipe(None, overrides)
        assert message in str(error.value), (overrides, str(error.value))
    with pytest.raises(RecipeError, match="did you mean convnext_tiny_dcls"):
        load_recipe("convnext_tiny_dclss")
    assert load_recipe(None, ["lr=1e-3"]).train.lr == 1e-3  # a bare key in one section only


def test_run_directory_and_resume_errors(sets, tmp_path, monkeypatch):
    train_set, eval_set = sets
    recipe = load_recipe(None, TINY + ["train.epochs=1"])
    with pytest.raises(TrainError, match="model.num_classes is 3, but the data has 4 classes"):
        train(load_recipe(None, TINY + ["model.num_classes=3"]), train_set, None, tmp_path / "a")
    train(recipe, train_set, None, tmp_path / "run")
    with pytest.raises(TrainError, match="holds a run already: --resume .* --overwrite"):
        train(recipe, train_set, None, tmp_path / "run")
    assert train(recipe, train_set, None, tmp_path / "run", overwrite=True).steps == 6
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["recipe"]["model"]["count"] = 7  # as if another model's checkpoint were given to --resume
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(TrainError, match="does not fit the run's model"):
        train(out=tmp_path / "run", resume=True)
    with pytest.raises(TrainError, match="no run to resume"):
        train(out=tmp_path / "nothing", resume=True)
    # no space left: the save fails cleanly, and the previous checkpoint survives untouched
    saved = train(
        load_recipe(None, TINY + ["train.checkpoint_every=2"]), train_set, None, tmp_path / "full", stop_after=2
    )
    before = sorted((tmp_path / "full" / "checkpoints").iterdir())
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(
        TrainError, match=r"No space left on device; the previous checkpoint .*step_0000002.pt is intact"
    ):
        train(out=tmp_path / "full", resume=True, stop_after=4)
    assert sorted((tmp_path / "full" / "checkpoints").iterdir()) == before and saved.steps == 2
    assert [p.name for p in (tmp_path / "full" / "checkpoints").iterdir()] == ["step_0000002.pt"]


def test_train_and_eval_commands(sets, tmp_path):
    train_set, eval_set = sets
    run = tmp_path / "run"
    args = ["train", "--data", str(train_set), "--eval-data", str(eval_set), "--out", str(run)]
    args += [item for override in TINY for item in ("--set", override)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "best eval mAP" in result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "holds a run already" in again.output and "Traceback" not in again.output
    no_data = runner.invoke(app, ["train", "--recipe", "cpu_small"])
    assert no_data.exit_code == 1 and "no --data" in no_data.output
    bad = runner.invoke(app, ["train", "--data", str(train_set), "--set", "train.lrr=1"])
    assert bad.exit_code == 1 and "did you mean train.lr" in bad.output
    per_class = tmp_path / "ap.csv"
    evaluation = runner.invoke(
        app, ["eval", str(run / "best.safetensors"), "--data", str(eval_set), "--json", "--per-class", str(per_class)]
    )
    assert evaluation.exit_code == 0, evaluation.output
    reported = json.loads(evaluation.output)
    # the same number scikit-learn gives on the model's scores
    from dclsify.pipeline.datasets import open_source
    from dclsify.pipeline.frontend import LogMel
    from dclsify.pipeline.loader import make_loader
    from dclsify.pipeline.train import score_clips

    model = load(run / "best.safetensors")
    data = open_source(eval_set, model.audio)
    scores, targets, unreadable = score_clips(
        model, make_loader(data, 4, False), LogMel(model.audio), torch.device("cpu"), "fp32", True
    )
    assert unreadable == [] and model.multi_label is True
    assert reported["mAP"] == pytest.approx(average_precision_score(targets, scores, average="macro"), abs=1e-9)
    assert per_class.read_text().splitlines()[0].startswith("class")
    missing = runner.invoke(app, ["eval", str(tmp_path / "none.safetensors"), "--data", str(eval_set)])
    assert missing.exit_code == 1 and "no such checkpoint" in missing.output


def test_two_process_ddp_trains_identical_replicas_and_evaluates_each_clip_once(sets, tmp_path):
    train_set, eval_set = sets
    run = tmp_path / "ddp"
    ddp = ["train.epochs=1", "train.batch_size=2", "train.global_batch=8", "model.drop_path=0.2"]
    overrides = [item for override in TINY + ddp for item in ("--set", override)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dclsify"]
    command += ["train", "--data", str(train_set), "--eval-data", str(eval_set), "--out", str(run), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert finished.stdout.count("best eval mAP") == 1  # rank 1 prints nothing
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1] == {"final": True, "world_size": 2, "replicas_identical": True}
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]  # 24 clips / (2 ranks x 2 x 2 micro-batches)
    ddp_map = next(r["eval"]["mAP"] for r in lines if "eval" in r)
    from dclsify.pipeline.evaluate import evaluate

    single = evaluate(run / "best.safetensors", eval_set, batch_size=3)
    assert single.mAP == pytest.approx(ddp_map, abs=1e-6)


def test_training_runs_on_the_gpu_in_bf16(sets, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    train_set, eval_set = sets
    overrides = TINY + ["train.device=cuda", "train.precision=bf16", "train.epochs=2", "train.ema_decay=0.9"]
    result = train(load_recipe(None, overrides), train_set, eval_set, tmp_path / "gpu")
    assert result.steps == 12 and np.isfinite([loss for _, loss in losses(tmp_path / "gpu")]).all()
    assert set(result.last_eval) == {"eval", "eval_ema"} and result.best_checkpoint.exists()
    fp16 = train(
        load_recipe(None, [*overrides, "train.precision=fp16"]), train_set, None, tmp_path / "fp16", stop_after=3
    )
    assert fp16.steps == 3
    resumed = train(out=tmp_path / "fp16", resume=True)  # the gradient scaler's state travels too
    assert resumed.steps == 12


def test_demo_trains_both_twins_and_reports_chance(tmp_path, monkeypatch):
    import functools

    from dclsify.pipeline import demo as demo_module

    small = functools.partial(demo_module.demo, train_clips=64, eval_clips=28)  # the real set is 1500 + 400 clips
    monkeypatch.setattr(demo_module, "demo", small)
    args = ["demo", "--folder", str(tmp_path), "--set", "train.epochs=1", "--set", "train.warmup_epochs=0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines() if line.split()}
    assert {"DCLS", "DSC", "chance"} <= set(rows)
    dcls, dsc = (load(tmp_path / "runs" / name / "best.safetensors") for name in ("dcls", "dsc"))
    assert dcls.dclsify.replaced and not dsc.dclsify.replaced
    assert int(rows["DCLS"][1].replace(",", "")) == sum(p.numel() for p in dcls.parameters())
    assert 0.1 < float(rows["chance"][1]) < 0.25  # 1 to 3 of 14 classes a clip
    bad = runner.invoke(app, ["demo", "--folder", str(tmp_path), "--set", "train.nope=1"])
    assert bad.exit_code == 1 and "unknown recipe key 'train.nope'" in bad.output


def test_gradient_accumulation_equals_the_whole_batch(sets, tmp_path):
    train_set, _ = sets
    plain = TINY + ["model.drop_path=0", "augment.roll=false", "augment.speed_p=0", "augment.erase_p=0"]
    plain += ["augment.mixup_alpha=0", "train.clip_grad=1.0"]  # LayerNorm only: no batch statistics to differ
    whole = train(load_recipe(None, [*plain, "train.batch_size=4"]), train_set, None, tmp_path / "whole", stop_after=2)
    halves = [*plain, "train.batch_size=2", "train.global_batch=4"]
    split = train(load_recipe(None, halves), train_set, None, tmp_path / "split", stop_after=2)
    assert whole.steps == split.steps == 2
    a = torch.load(tmp_path / "whole/checkpoints/step_0000002.pt")["model"]
    b = torch.load(tmp_path / "split/checkpoints/step_0000002.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert [loss for _, loss in losses(tmp_path / "whole")] == pytest.approx(
        [loss for _, loss in losses(tmp_path / "split")], rel=1e-5
    )


def test_fine_tuning_a_checkpoint_on_new_classes_with_a_frozen_body(sets, tmp_path):
    train_set, eval_set = sets
    first = train(load_recipe(None, TINY + ["train.epochs=1"]), train_set, eval_set, tmp_path / "first")
    with h5py.File(train_set) as source, h5py.File(tmp_path / "three.h5", "w") as handle:  # 3 of the 4 classes
        keep = source["target"][:, :3].any(axis=1)
        handle["audio_name"] = source["audio_name"][:][keep]
        handle["waveform"] = source["waveform"][:][keep]
        handle["target"] = source["target"][:][keep][:, :3]
        handle.attrs.update(sample_rate=RATE, class_names=json.dumps(CLASSES[:3]))
    tuned = [*TINY, f"model.source={json.dumps(str(first.best_checkpoint))}", "model.freeze=true", "train.epochs=2"]
    result = train(load_recipe(None, tuned), tmp_path / "three.h5", None, tmp_path / "tuned")
    epochs = [torch.load(p)["model"] for p in sorted((tmp_path / "tuned" / "checkpoints").glob("*.pt"))[-2:]]
    before = load(first.best_checkpoint).state_dict()
    assert epochs[1]["head.fc.weight"].shape == (3, 320) and result.steps > 0 and len(epochs) == 2
    assert not torch.equal(epochs[0]["head.fc.weight"], epochs[1]["head.fc.weight"])  # the new head learns
    for key, tensor in epochs[1].items():  # and nothing else moves
        if not key.startswith("head.fc."):
            assert torch.equal(tensor, before[key]), key


def test_fine_tuning_a_dense_export_trains_its_whole_kernels(sets, tmp_path):
    train_set, eval_set = sets
    first = train(load_recipe(None, TINY + ["train.epochs=1"]), train_set, eval_set, tmp_path / "first")
    export(first.best_checkpoint, tmp_path / "dense.safetensors", format="dense")
    dense = [*TINY, f"model.source={json.dumps(str(tmp_path / 'dense.safetensors'))}", "train.epochs=1"]
    result = train(load_recipe(None, dense), train_set, eval_set, tmp_path / "tuned")
    before, after = load(tmp_path / "dense.safetensors"), load(result.best_checkpoint)
    assert not any(isinstance(m, Dcls2d) for m in after.modules())
    kernels = {name: m.weight for name, m in after.named_modules() if isinstance(m, LargeKernelConv2d)}
    assert len(kernels) == 12  # ConvNeXt-atto's depthwise convs, each a whole 9x9 kernel that trains
    for name, weight in kernels.items():
        assert weight.shape[1:] == (1, 9, 9) and not torch.equal(weight, before.get_submodule(name).weight), name


def test_train_without_data_trains_on_the_demo_set(tmp_path, monkeypatch):
    from dclsify.pipeline import demo as demo_module

    real = demo_module.demo_data
    monkeypatch.setattr(demo_module, "demo_data", lambda console=None: real(tmp_path / "data", console, 40, 14))
    args = ["train", "--out", str(tmp_path / "run"), "--set", "train.epochs=1", "--set", "train.warmup_epochs=0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["recipe"]["model"]["source"] == "timm:convnext_atto" and len(config["class_names"]) == 14
    assert (tmp_path / "run" / "best.safetensors").exists()


def test_tensorboard_event_files_when_it_is_installed(sets, tmp_path):
    pytest.importorskip("tensorboard")
    train_set, eval_set = sets
    train(load_recipe(None, TINY + ["train.epochs=1"]), train_set, eval_set, tmp_path / "run")
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_compiled_training_follows_eager_training(sets, tmp_path, device):
    train_set, _ = sets
    recipe = [*TINY, "model.drop_path=0", "train.epochs=1", f"train.device={device.type}"]
    if device.type == "cpu":
        with pytest.raises(TrainError, match="train.compile is for GPUs"):
            train(load_recipe(None, [*recipe, "train.compile=true"]), train_set, None, tmp_path / "compiled")
        return
    eager = train(load_recipe(None, recipe), train_set, None, tmp_path / "eager", stop_after=3)
    compiled = train(
        load_recipe(None, [*recipe, "train.compile=true"]), train_set, None, tmp_path / "compiled", stop_after=3
    )
    assert eager.steps == compiled.steps == 3
    expected = [loss for _, loss in losses(tmp_path / "eager")]
    assert [loss for _, loss in losses(tmp_path / "compiled")] == pytest.approx(expected, rel=1e-3)


def test_ctrl_c_mid_step_stops_after_that_step_and_resumes_exactly(sets, tmp_path, monkeypatch):
    from dclsify.pipeline import augment as augment_module

    train_set, _ = sets
    recipe = load_recipe(None, TINY + ["train.epochs=2", "train.log_every=4", "train.ema_decay=0.5"])
    whole = train(recipe, train_set, None, tmp_path / "whole")
    real_forward, calls = augment_module.Augment.forward, []

    def forward_then_ctrl_c(self, waveforms, targets):
        calls.append(1)
        if len(calls) == 7:  # in the middle of step 7, the first step of epoch 2 but one
            os.kill(os.getpid(), signal.SIGINT)
        return real_forward(self, waveforms, targets)

    monkeypatch.setattr(augment_module.Augment, "forward", forward_then_ctrl_c)
    part = train(recipe, train_set, None, tmp_path / "part")
    assert part.interrupted and part.steps == 7 and not (tmp_path / "part" / "last.safetensors").exists()
    monkeypatch.undo()
    resumed = train(out=tmp_path / "part", resume=True)
    assert resumed.steps == whole.steps == 12
    assert losses(tmp_path / "part") == losses(tmp_path / "whole")  # windows of 4 steps, one cut by the stop


def test_eval_leaves_unreadable_clips_out_and_says_so(sets, tmp_path):
    train_set, eval_set = sets
    train(load_recipe(None, TINY + ["train.epochs=1"]), train_set, None, tmp_path / "run")
    with h5py.File(eval_set) as handle:
        waveforms, targets = handle["waveform"][:4], handle["target"][:4]
    rows = ["path,labels"]
    for i, (waveform, target) in enumerate(zip(waveforms, targets, strict=True)):
        soundfile.write(tmp_path / f"c{i}.wav", waveform, RATE)
        rows.append(f"c{i}.wav," + ";".join(CLASSES[j] for j in np.flatnonzero(target)))
    (tmp_path / "eval.csv").write_text("\n".join([*rows[:3], "gone.wav,low", *rows[3:]]) + "\n")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    args = ["eval", str(tmp_path / "run" / "last.safetensors"), "--data", str(tmp_path / "eval.csv")]
    args += ["--labels", str(tmp_path / "classes.txt")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "on " in result.output and ": 4 clips, 4 classes" in result.output
    assert "1 clips could not be read and were left out" in result.output and "gone.wav: missing" in result.output
    data = json.loads(runner.invoke(app, [*args, "--json"]).output)
    assert data["clips"] == 4 and data["unreadable"] == 1
