"""The run plan: the global batch and its accumulation, the learning rate's scaling,
``dclsify.build_model`` for every kind of model source, ``train --dry-run`` and fp32 evaluation logits."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from dcls_audio import random_state_dict
from rich.console import Console
from test_train import TINY, make_set
from timm.layers import DropPath
from typer.testing import CliRunner

import dclsify
from dclsify import cli
from dclsify.cli import app
from dclsify.pipeline.evaluate import fp32_logits
from dclsify.pipeline.importer import import_to_file
from dclsify.pipeline.plan import plan_run
from dclsify.pipeline.recipe import RecipeError, load_recipe, plan_batch
from dclsify.pipeline.train import TrainError, train
from dclsify.surgery.checkpoint import convert, save

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=200))


def paper_train(**changes):
    return dataclasses.replace(load_recipe("convnext_tiny_dcls").train, **changes)


@pytest.mark.parametrize(("processes", "accumulate"), [(1, 64), (8, 8), (32, 2), (64, 1)])
def test_the_paper_global_batch_is_kept_by_accumulating(processes, accumulate):
    plan = plan_batch(paper_train(), processes)
    assert (plan.global_batch, plan.accumulate, plan.lr) == (4096, accumulate, 4e-3)
    assert (
        plan.describe()
        == f"global batch 4096 = 64 per process x {processes} process"
        + ("es" if processes > 1 else "")
        + f" x {accumulate} accumulated"
    )
    assert plan.describe_lr() is None  # the recipe's own rate


def test_another_global_batch_scales_the_rate_and_says_so():
    plan = plan_batch(paper_train(global_batch=512), 8)
    assert (plan.accumulate, plan.lr, plan.min_lr) == (1, 5e-4, 1e-6 / 8)
    assert (
        plan.describe_lr()
        == "lr 0.0005 = 0.004 (the recipe's rate at 4096 clips) x 512/4096, scaled linearly to the global batch"
    )
    own = plan_batch(paper_train(global_batch=512, reference_batch=0), 8)  # 0: lr is the rate at the global batch
    assert own.lr == 4e-3 and own.describe_lr() is None
    per_step = plan_batch(paper_train(global_batch=0, batch_size=16), 3)  # 0: one micro-batch per process
    assert (per_step.global_batch, per_step.accumulate, per_step.lr) == (48, 1, 4e-3 * 48 / 4096)


def test_a_global_batch_the_processes_cannot_make_names_what_works():
    with pytest.raises(RecipeError) as error:
        plan_batch(paper_train(batch_size=48), 8)
    assert str(error.value) == (
        "train.global_batch 4096 is not a whole number of steps of 48 clips per process x 8 processes: "
        "set train.batch_size 32 or 64, or train.global_batch 3840 or 4224"
    )
    with pytest.raises(RecipeError, match="set train.global_batch 4032 or 4224, or run on a number of processes"):
        plan_batch(paper_train(), 3)


def drop_path_rates(model) -> list[float]:
    return [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]


def trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def check_built(model, classes: int, drop_path: float) -> None:
    """The head's classes, stochastic depth up to the recipe's rate, and the head alone trained."""
    assert model.get_classifier().out_features == classes
    assert max(drop_path_rates(model)) == pytest.approx(drop_path)
    assert trainable(model) == {"head.fc.weight", "head.fc.bias"}


SMALL = [o for o in TINY if not o.startswith(("train.", "model.drop_path"))]


def test_build_model_from_a_timm_name():
    model = dclsify.build_model(None, 5, [*SMALL, "model.drop_path=0.3", "model.freeze=true"])
    check_built(model, 5, 0.3)
    assert model.dclsify.replaced  # rewritten with DCLS


def test_build_model_from_a_file_factory(tmp_path):
    factory = tmp_path / "factory.py"
    factory.write_text("import timm\n\ndef atto(**kwargs):\n    return timm.create_model('convnext_atto', **kwargs)\n")
    overrides = [*SMALL, f'model.source="file:{factory}:atto"', "model.drop_path=0.2", "model.freeze=true"]
    with pytest.raises(TrainError, match="trust"):
        dclsify.build_model(None, 3, overrides)
    check_built(dclsify.build_model(None, 3, overrides, trust_code=True), 3, 0.2)


def test_build_model_from_a_converted_checkpoint_takes_the_recipes_drop_path(tmp_path):
    source = convert("timm:convnext_atto", kernel=9, count=5, stem="4x4", num_classes=4, input_size=(32, 32))
    assert drop_path_rates(source) == []  # saved without stochastic depth, as convert and import write them
    save(source, tmp_path / "atto.safetensors")
    overrides = [*SMALL, f'model.source="{tmp_path / "atto.safetensors"}"', "model.drop_path=0.25", "model.freeze=true"]
    model = dclsify.build_model(None, 7, overrides)
    check_built(model, 7, 0.25)
    assert model.dclsify.model_kwargs == {"drop_path_rate": 0.25}  # and its checkpoints record it
    unfrozen = dclsify.build_model(None, 4, [*overrides[:-1], "model.drop_path=0"])
    assert drop_path_rates(unfrozen) == [] and len(trainable(unfrozen)) == len(list(unfrozen.parameters()))
    torch.testing.assert_close(unfrozen.state_dict(), source.state_dict())  # same classes: the head is kept
    with pytest.raises(TrainError) as error:
        dclsify.build_model(None, 4, [*overrides, "model.kernel=11", 'model.stem="audio"'])
    assert "holds layers the recipe does not describe (stem, kernel)" in str(error.value)
    assert "--set model.stem=4x4/4x4 --set model.kernel=9" in str(error.value)


def test_build_model_from_an_imported_paper_checkpoint(tmp_path):
    torch.save(random_state_dict("convnext_audio_tiny"), tmp_path / "paper.pth")
    import_to_file(tmp_path / "paper.pth", tmp_path / "paper.safetensors")
    model = dclsify.build_model(
        "convnext_tiny_dsc", 10, [f'model.source="{tmp_path / "paper.safetensors"}"', "model.freeze=true"]
    )
    check_built(model, 10, 0.4)  # the recipe's 0.4; the imported file records none
    assert len(drop_path_rates(model)) == 17  # every block of ConvNeXt-T but the first (rate 0)


def test_dry_run_reports_the_plan_as_text_and_json(tmp_path):
    data = make_set(tmp_path / "train.h5", 20, 0)
    args = ["train", "--data", str(data), "--dry-run", "--out", str(tmp_path / "run")]
    args += [item for o in [*TINY, "train.global_batch=8", "train.reference_batch=16"] for item in ("--set", o)]
    result = runner.invoke(app, [*args, "--processes", "2", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert {k: v for k, v in plan.items() if k != "recipe"} == {
        "processes": 2,
        "accumulate": 1,
        "global_batch": 8,
        "lr": 2e-3 * 8 / 16,
        "steps_per_epoch": 2,  # 20 clips: 10 a process, 2 full batches of 4
        "steps": 4,
        "clips": 20,
        "classes": 4,
        "parameters": sum(p.numel() for p in dclsify.build_model(None, 4, TINY).parameters()),
        "run_dir": str(tmp_path / "run"),
        "fine_tuning": None,  # a timm source: nothing taken from a checkpoint
    }
    assert plan["recipe"]["train"]["global_batch"] == 8 and plan["recipe"]["model"]["kernel"] == 9
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
    text = runner.invoke(app, args)  # one process: 2 micro-batches of 4 a step
    assert text.exit_code == 0, text.output
    assert "global batch 8 = 4 per process x 1 process x 2 accumulated" in text.output
    assert "0.001 = 0.002 (the recipe's rate at 16 clips) x 8/16" in text.output
    assert "2 per epoch x 2 epochs = 4 (0 warm-up)" in text.output and "\n[augment]\n" in text.output
    bad = runner.invoke(app, [*args, "--processes", "3"])
    assert bad.exit_code == 1 and "not a whole number of steps" in bad.output and "Traceback" not in bad.output
    stray = runner.invoke(app, ["train", "--json"])
    assert stray.exit_code == 1 and "go with --dry-run" in stray.output


def test_dry_run_without_data_plans_for_audioset():
    plan = plan_run("convnext_tiny_dsc", processes=32)
    assert (plan.classes, plan.clips, plan.steps, plan.batch.accumulate) == (527, None, None, 2)
    assert plan.parameters == 28_223_855  # the authors' count for ConvNeXt-T DSC


def test_evaluation_logits_are_fp32_under_bf16():
    model = dclsify.build_model(None, 4, TINY).eval()
    x = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = fp32_logits(model, x, torch.device("cpu"), "bf16")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            whole_bf16 = model(x).float()
        exact = model(x)
    assert logits.dtype == torch.float32
    assert len(torch.unique(logits)) == logits.numel()  # no ties
    in_bf16 = logits == logits.bfloat16().float()  # what bf16 keeps: 8 bits of mantissa
    assert in_bf16.float().mean() < 0.1 and (whole_bf16 == whole_bf16.bfloat16().float()).all()
    torch.testing.assert_close(logits, exact, rtol=0, atol=0.05)


def test_training_reports_its_batch_and_evaluates_in_fp32(tmp_path):
    train_set = make_set(tmp_path / "train.h5", 12, 0)
    eval_set = make_set(tmp_path / "eval.h5", 12, 1)
    console = Console(record=True, width=200)
    overrides = [*TINY, "train.epochs=1", "train.precision=bf16", "train.global_batch=8", "train.reference_batch=8"]
    result = train(load_recipe(None, overrides), train_set, eval_set, tmp_path / "run", console=console)
    assert "global batch 8 = 4 per process x 1 process x 2 accumulated" in console.export_text()
    from dclsify.pipeline.evaluate import evaluate

    again = evaluate(result.best_checkpoint, eval_set, batch_size=4, precision="bf16")  # the same fp32 head
    assert result.best_map == pytest.approx(again.mAP, abs=1e-6)
