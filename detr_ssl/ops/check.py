"""Compare every available kernel of ms_deform_attn with the PyTorch path and print a table.

    python -m detr_ssl.ops.check

For each kernel, dtype and case, the forward output and the gradients of value, sampling
locations and attention weights are compared with the PyTorch path run in float64 on the same
inputs. Errors are relative: max |kernel - reference| / max |reference|. The exit status is 1
when any error exceeds its dtype's tolerance.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import Tensor

from .ms_deform_attn import available_backends, ms_deform_attn

CASES = {
    "odd levels": dict(batch=3, queries=17, heads=2, channels=6, points=3, shapes=((7, 5), (3, 9))),
    "deformable detr": dict(batch=2, queries=200, heads=8, channels=32, points=4,
                            shapes=((16, 16), (8, 8), (4, 4), (2, 2))),
    "batch 1": dict(batch=1, queries=5, heads=1, channels=3, points=1, shapes=((1, 1), (2, 3))),
    "no queries": dict(batch=2, queries=0, heads=2, channels=4, points=2, shapes=((3, 4),)),
}
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16)}
RESULTS = ("output", "grad_value", "grad_locations", "grad_weights")
INPUT_OF = {"output": 0, "grad_value": 0, "grad_locations": 3, "grad_weights": 4}  # whose dtype each result has


def random_inputs(batch: int, queries: int, heads: int, channels: int, points: int, shapes: tuple[tuple[int, int], ...],
                  dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  seed: int = 0) -> tuple[Tensor, ...]:
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights).

    Locations are uniform in [-0.1, 1.1], so some samples fall partly or wholly outside their level,
    and multiples of 1/1024, so that every dtype holds them exactly and every back end computes the
    same pixel coordinates: some land exactly on pixel centres and on the edges of the padding,
    where the gradient is discontinuous and the back ends must agree on its side.
    """
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(batch, int(sizes.sum()), heads, channels, generator=generator)
    locations = torch.randint(-102, 1127, (batch, queries, heads, len(shapes), points, 2), generator=generator) / 1024
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=generator)
    return (value.to(device, dtype), spatial_shapes.to(device), level_start_index.to(device),
            locations.to(device, dtype), weights.to(device, dtype))


def output_and_grads(backend: str, inputs: tuple[Tensor, ...], grad_output: Tensor) -> list[Tensor]:
    """[output, grad_value, grad_locations, grad_weights] of one back end."""
    value, spatial_shapes, level_start_index, locations, weights = inputs
    value, locations, weights = (t.detach().requires_grad_() for t in (value, locations, weights))
    output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend=backend)
    grads = torch.autograd.grad(output, (value, locations, weights), grad_output.to(output.dtype))
    return [output.detach(), *grads]


def relative_errors(backend: str, dtype: torch.dtype, device: str, case: dict, seed: int = 0) -> dict[str, float]:
    """Errors of ``backend`` against the float64 PyTorch path, by result name."""
    inputs = random_inputs(**case, dtype=dtype, device=device, seed=seed)
    batch, queries, heads, channels = case["batch"], case["queries"], case["heads"], case["channels"]
    grad_output = torch.randn(batch, queries, heads * channels, generator=torch.Generator().manual_seed(seed + 1))
    grad_output = grad_output.to(device, dtype)
    results = output_and_grads(backend, inputs, grad_output)
    reference_inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    references = output_and_grads("pytorch", reference_inputs, grad_output.double())
    errors = {}
    for name, result, reference in zip(RESULTS, results, references):
        expected_dtype = inputs[INPUT_OF[name]].dtype
        if result.shape != reference.shape or result.dtype != expected_dtype:
            raise AssertionError(f"{backend} {name}: {result.dtype} {tuple(result.shape)}, expected "
                                 f"{expected_dtype} {tuple(reference.shape)}")
        scale = reference.abs().max().item() if reference.numel() else 0.0
        error = (result.double() - reference).abs().max().item() if reference.numel() else 0.0
        errors[name] = error / scale if scale > 0 else error
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    kernels = [name for name in available_backends() if name != "pytorch"]
    if not kernels:
        print("no kernel could be built: only the PyTorch path is available")
        return 1
    columns = "  ".join(f"{name:>14}" for name in RESULTS)
    header = f"{'back end':8}  {'dtype':8}  {'case':15}  {columns}  tolerance"
    print(header)
    print("-" * len(header))
    failed = False
    for backend in kernels:
        for dtype in DTYPES[backend]:
            for case_name, case in CASES.items():
                errors = relative_errors(backend, dtype, backend, case)  # a kernel runs on its namesake device
                ok = all(error <= TOLERANCES[dtype] for error in errors.values())
                failed |= not ok
                print(f"{backend:8}  {str(dtype).removeprefix('torch.'):8}  {case_name:15}  "
                      + "  ".join(f"{errors[name]:14.2e}" for name in RESULTS)
                      + f"  {TOLERANCES[dtype]:.0e} {'ok' if ok else 'FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
