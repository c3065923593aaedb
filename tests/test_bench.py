"""The model benchmark's counts and statistics, on hand-built models whose figures are known."""

import pytest
from torch import nn

from dclsify import Dcls2d
from dclsify.surgery.bench import (
    ModelResult,
    Throughput,
    Variant,
    bench_models,
    count_flops,
    count_parameters,
)
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
    ],
)
def test_bench_models_checks_its_arguments_first(kwargs, error, message):
    with pytest.raises(error, match=message):
        bench_models(**kwargs)
