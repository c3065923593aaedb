"""GPU kernels, GPU time and wall time per training step of ConvNeXt-T audio, DCLS and its DSC twin
(bench-model's training step: bf16 autocast, BCE, backward, AdamW, clamp), from torch's profiler.
Works on older trees too: it only uses create_source, rewrite, chosen_algorithms and the model
benchmark's _training_step."""

import argparse
import json
import time

import torch
from torch.autograd import DeviceType

try:
    from dclsify.pipeline.bench import _training_step
except ImportError:  # a tree before the one-way layers: the model benchmark lived in surgery/
    from dclsify.surgery.bench import _training_step
from dclsify.surgery.checkpoint import create_source, timm_name
from dclsify.surgery.conv import chosen_algorithms
from dclsify.surgery.rewrite import rewrite

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="convnext_tiny")
parser.add_argument("--device", default="cuda")
parser.add_argument("--dtype", default="bf16")
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--json")
args = parser.parse_args()
device = torch.device(args.device)
sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
torch.manual_seed(0)
source = create_source(timm_name(args.model))
x = torch.randn(args.batch, 1, 128, 1001, device=device)
results = {}
for name, dcls in (("DSC", False), ("DCLS", True)):
    model = rewrite(source, num_classes=527, dcls=dcls).to(device).train()
    step = _training_step(model, x, args.dtype)
    for _ in range(3):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        step()
        sync()
    on_gpu = [e for e in profile.events() if e.device_type == DeviceType.CUDA]
    results[name] = {
        "wall_ms": wall_ms,
        "gpu_kernels": len(on_gpu),
        "gpu_ms": sum(e.time_range.elapsed_us() for e in on_gpu) / 1e3,
        "cpu_ops": sum(1 for e in profile.events() if e.device_type == DeviceType.CPU and e.name.startswith("aten::")),
    }
    print(
        f"{args.model} {name}: {wall_ms:.1f} ms wall per step, {results[name]['gpu_ms']:.1f} ms of GPU work in "
        f"{results[name]['gpu_kernels']} kernels, {results[name]['cpu_ops']} aten calls "
        f"(batch {args.batch}, {args.dtype}, {device})",
        flush=True,
    )
    del model, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
choices = sorted(
    (f"{tuple(key.input_shape)} {key.output_dtype} {'fwd+bwd' if key.backward else 'fwd'}", name)
    for key, name in chosen_algorithms().items()
)
for shape, name in choices:
    print(f"  auto chose {name} for {shape}")
if args.json:
    with open(args.json, "w") as handle:
        json.dump(
            {"model": args.model, "batch": args.batch, "dtype": args.dtype, "steps": results, "auto": choices},
            handle,
            indent=1,
        )
