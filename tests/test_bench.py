"""The model benchmark's counts and statistics, on hand-built models whose figures are known."""

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dclsify import Dcls2d
from dclsify.pipeline.bench import (
    ModelResult,
    Throughput,
    Variant,
    bench_models,
    count_flops,
    count_parameters,
)
from dclsify.surgery import conv
from dclsify.surgery.rewrite import SurgeryError


def test_flops_are_twice_the_multiply_accumulates_of_convs_and_matrix_products():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    assert count_flops(model, (1, 1, 8, 8)) == 2 * (8 * 8 * 4 * 9) + 2 * (4 * 8 * 8 * 10)
    assert count_flops(model, (3, 1, 8, 8)) == 3 * count_flops(model, (1, 1, 8, 8))
    assert model[0].weight.device.type == "cpu"  # counted on a copy


def test_a_dcls_layer_counts_as_its_dense_kernel_computed_directly():
    layer = Dcls2d(4, 4, 5, padding=11, dilated_kernel_size=23, groups=4)
    direct = 2 * (10 * 9) * 4 * 23 * 23  # every tap of the 23x23 window at each of the 10x9 outputs, per channel
    assert count_flops(layer, (1, 4, 10, 9)) == direct
    assert count_flops(layer.bake(), (1, 4, 10, 9)) == direct  # the baked conv's fft or toeplitz is not counted
    assert isinstance(layer, Dcls2d) and layer.weight.device.type == "cpu"


def test_parameters_shared_by_layers_count_once():
    shared = nn.Linear(3, 3)  # 12 parameters
    assert count_parameters(nn.Sequential(shared, nn.ReLU(), shared)) == 12
    a = Dcls2d(8, 8, 5, dilated_kernel_size=7, groups=8)
    b = Dcls2d(8, 8, 5, dilated_kernel_size=7, groups=8)
    b.P, b.SIG = a.P, a.SIG  # as rewrite(sync="stage") shares them
    weights_and_bias, positions_and_spreads = 8 * 5 + 8, 2 * 2 * 8 * 5
    assert count_parameters(nn.Sequential(a, b)) == 2 * weights_and_bias + positions_and_spreads


def test_throughput_statistics_and_ratios():
    t = Throughput([4.0, 1.0, 2.0])
    assert (t.median, t.spread) == (2.0, 0.75)
    assert t.as_dict() == {"median": 2.0, "min": 1.0, "max": 4.0, "samples": [4.0, 1.0, 2.0]}
    dsc = Variant(100, 2.0, {"training": Throughput([10.0]), "inference": Throughput([40.0])})
    dcls = Variant(
        90,
        3.0,
        {"training": Throughput([8.0]), "inference": Throughput([30.0]), "inference_unbaked": Throughput([20.0])},
    )
    ratios = ModelResult("m", dsc, dcls).ratios
    assert ratios == {"params": 0.9, "gflops": 1.5, "training": 0.8, "inference": 0.75, "inference_unbaked": 0.5}


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(dtype="fp64"), ValueError, "dtype must be one of fp32, bf16, fp16"),
        (dict(dtype="fp16"), ValueError, "fp16 autocast is for CUDA"),
        (dict(models=["convnext_atto", "convnxt_atto"]), SurgeryError, "did you mean convnext_atto"),
        (dict(algorithm="fast"), ValueError, "algorithm must be one of auto, direct, channels_last, fft, toeplitz"),
    ],
)
def test_bench_models_checks_its_arguments_first(kwargs, error, message):
    with pytest.raises(error, match=message):
        bench_models(**kwargs)


def test_the_dcls_layers_convolve_by_the_algorithm_asked_for(monkeypatch):
    from dclsify.pipeline import bench

    algorithms, inference_step = [], bench._inference_step

    def recording(model, x, dtype):
        algorithms.append({layer.algorithm for layer in model.modules() if hasattr(layer, "algorithm")})
        return inference_step(model, x, dtype)

    monkeypatch.setattr(bench, "_inference_step", recording)
    monkeypatch.setattr(bench, "_throughputs", lambda timed, *args: {name: Throughput([1.0]) for name in timed})
    bench.bench_model("convnext_atto", 1, 0, 1, input_size=(64, 160), algorithm="fft")
    assert algorithms == [set(), {"fft"}, {"fft"}]  # DSC (no DCLS layers), baked DCLS, un-baked DCLS
    monkeypatch.setattr(conv, "triton_refusal", lambda device: "it runs on CUDA tensors")
    with pytest.raises(ValueError, match="algorithm 'triton' cannot run here: it runs on CUDA tensors"):
        bench.bench_models(["convnext_atto"], algorithm="triton")


def test_the_training_step_is_the_trainers(monkeypatch):
    from dclsify.pipeline import train
    from dclsify.pipeline.bench import _training_step

    a = Dcls2d(4, 4, 5, padding=3, dilated_kernel_size=7, groups=4)
    b = Dcls2d(4, 4, 5, padding=3, dilated_kernel_size=7, groups=4)
    b.P, b.SIG = a.P, a.SIG  # one stage: one shared P
    model = nn.Sequential(nn.Conv2d(1, 4, 1), a, b, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    clamped, real = [], train.clamp_positions
    monkeypatch.setattr(train, "clamp_positions", lambda m: (clamped.append(m), real(m)))
    step = _training_step(model, torch.randn(2, 1, 8, 8), "fp32")
    with torch.no_grad():
        a.P.fill_(100.0)  # far outside the 7x7 window: the step must bring it back to its border
    step()
    assert clamped == [model] and torch.equal(a.P, torch.full_like(a.P, 3.0))
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: captured.append(self.param_groups))
    captured = []
    _training_step(model, torch.randn(2, 1, 8, 8), "fp32")()
    [groups] = captured
    positions = next(g for g in groups if any(p is a.P for p in g["params"]))
    assert positions["weight_decay"] == 0.0 and positions["lr_scale"] == 5.0 and len(positions["params"]) == 2
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}  # the trainer's groups, not one decayed group


def _pair(name: str) -> ModelResult:
    throughputs = {"training": Throughput([1.0]), "inference": Throughput([2.0])}
    unbaked = throughputs | {"inference_unbaked": Throughput([1.0])}
    return ModelResult(name, Variant(10, 1.0, throughputs), Variant(10, 1.0, unbaked), peak_memory=3 * 2**30)


def test_a_model_out_of_memory_is_reported_and_the_others_measured(monkeypatch):
    from dclsify.pipeline import bench

    def fake(name, *args, **kwargs):
        if name == "convnext_atto":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return _pair(name)

    monkeypatch.setattr(bench, "bench_model", fake)
    result = bench_models(["convnext_atto", "resnet18"], batch=64)
    assert [m.model for m in result.models] == ["resnet18"]
    assert result.failed == {
        "convnext_atto": "convnext_atto: out of memory on cpu at batch 64 (fp32); try a smaller --batch"
    }


def test_a_gpu_run_prints_the_gpu_its_libraries_and_memory(monkeypatch):
    from dclsify import cli
    from dclsify.pipeline import bench

    setup = bench.environment("cpu") | {
        "device": "cuda",
        "device_name": "NVIDIA H100 80GB HBM3",
        "device_memory": 80 * 2**30,
        "cuda": "13.0",
        "cudnn": 91300,
        "cudnn_benchmark": False,
        "batch": 64,
        "input_shape": [1, 128, 1001],
        "dtype": "bf16",
        "algorithm": "auto",
        "warmup": 5,
        "repeats": 10,
        "steps_per_repeat": 5,
    }
    failed = {"fastvit_sa24": "fastvit_sa24: out of memory on cuda at batch 64 (bf16); try a smaller --batch"}
    monkeypatch.setattr(
        bench, "bench_models", lambda *a, **k: bench.ModelBench(setup, [_pair("convnext_tiny")], failed)
    )
    monkeypatch.setattr(cli, "_check_device", lambda device: None)
    result = CliRunner().invoke(cli.app, ["bench-model", "--device", "cuda", "--dtype", "bf16"])
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in output  # the measured model printed, the failed one named
    assert "cuda: NVIDIA H100 80GB HBM3, 80 GiB, CUDA 13.0, cuDNN 91300 (benchmark mode off)" in output
    assert f"torch {torch.__version__}, timm " in output and "batch 64 of 1x128x1001, bf16" in output
    assert "convnext_tiny DSC" in output and "peak cuda memory per model (both twins): convnext_tiny 3.0 GiB" in output
    assert output.endswith("error: fastvit_sa24: out of memory on cuda at batch 64 (bf16); try a smaller --batch")
