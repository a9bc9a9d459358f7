"""Multi-scale deformable attention: every back end against the PyTorch path, back-end choice, builds.

The CPU kernel is built once into the on-disk cache (about half a minute the first time) and
shared by every test and later run.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detr_ssl.engine.runner import seed_everything
from detr_ssl.ops import available_backends, build, ms_deform_attn, ms_deform_attn_pytorch, set_default_backend
from detr_ssl.ops.check import (CASES, TOLERANCES, main as check_main, output_and_grads, random_inputs,
                                relative_errors)

# The module, which the package's function of the same name hides from attribute access.
msda_module = importlib.import_module("detr_ssl.ops.ms_deform_attn")
REPO = Path(__file__).resolve().parents[1]

needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="session")
def kernels() -> list[str]:
    """The kernels that build here (the CPU one is built on first use and cached)."""
    return [name for name in available_backends() if name != "pytorch"]


def skip_unless_built(backend: str, kernels: list[str]) -> None:
    if backend != "pytorch" and backend not in kernels:
        pytest.skip(f"the {backend} kernel does not build here")


BACKENDS = ["pytorch", "cpu", pytest.param("cuda", marks=needs_cuda)]
KERNELS = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.fixture
def detr_ssl_log(caplog):
    """Records of the 'detr_ssl' logger, which may not propagate to the root (setup_logging)."""
    logger = logging.getLogger("detr_ssl")
    level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_bilinear(backend, kernels):
    """One 2x2 level holding 1 2 / 3 4; pixel centres at 0.25 and 0.75."""
    skip_unless_built(backend, kernels)
    device = "cuda" if backend == "cuda" else "cpu"
    value = torch.tensor([1.0, 2.0, 3.0, 4.0], device=device).view(1, 4, 1, 1).requires_grad_()
    shapes = torch.tensor([[2, 2]], device=device)
    starts = torch.tensor([0], device=device)
    locations = torch.tensor([
        [0.5, 0.5],    # centre: mean of the four pixels
        [0.25, 0.75],  # centre of the bottom-left pixel
        [0.0, 0.25],   # left edge, top row: half of pixel 1, half of the zero padding
        [1.5, 0.5],    # far outside: zero
        [-0.25, 0.25],  # one pixel left of pixel 1's centre: zero, but pixel 1 pulls it right
    ], device=device).view(1, 5, 1, 1, 1, 2).requires_grad_()
    weights = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0], device=device).view(1, 5, 1, 1, 1).requires_grad_()

    output = ms_deform_attn(value, shapes, starts, locations, weights, backend=backend)
    assert output.shape == (1, 5, 1)
    torch.testing.assert_close(output.flatten().cpu(), torch.tensor([2 * 2.5, 3.0, 0.5, 0.0, 0.0]))

    output.sum().backward()
    # d/dx at the centre: width * (mean of the right column - mean of the left column) = 2 * 1, times
    # the weight 2; d/dy: height * (bottom mean - top mean) = 2 * 2, times 2.
    torch.testing.assert_close(locations.grad[0, 0].flatten().cpu(), torch.tensor([4.0, 8.0]))
    # At the padding's edge, d/dx = width * pixel 1 (as grid_sample has it); d/dy = 0.
    torch.testing.assert_close(locations.grad[0, 4].flatten().cpu(), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(weights.grad.flatten().cpu(), torch.tensor([2.5, 3.0, 0.5, 0.0, 0.0]))
    # value: 2 * 0.25 from the centre, 1 for pixel 3 from query 1, 0.5 for pixel 1 from query 2.
    torch.testing.assert_close(value.grad.flatten().cpu(), torch.tensor([1.0, 0.5, 1.5, 0.5]))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_pytorch_path(backend, dtype, case, kernels):
    """Forward and the three gradients against the float64 PyTorch path (odd level sizes, points
    inside and outside the levels, batch 1 and 3, no queries)."""
    skip_unless_built(backend, kernels)
    device = "cuda" if backend == "cuda" else "cpu"
    errors = relative_errors(backend, dtype, device, CASES[case])
    assert max(errors.values()) <= TOLERANCES[dtype], errors


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_cuda_kernel(dtype, kernels):
    skip_unless_built("cuda", kernels)
    for case in ("odd levels", "deformable detr"):
        errors = relative_errors("cuda", dtype, "cuda", CASES[case])
        assert max(errors.values()) <= TOLERANCES[dtype], (case, errors)


@pytest.mark.parametrize("channels", [1, 24, 64])
@pytest.mark.parametrize("backend", KERNELS)
def test_channel_counts(backend, channels, kernels):
    """Head sizes that are not 32: the CUDA backward sums 1, 8 and 32 lanes for these."""
    skip_unless_built(backend, kernels)
    case = dict(CASES["odd levels"], channels=channels)
    errors = relative_errors(backend, torch.float32, backend, case)
    assert max(errors.values()) <= TOLERANCES[torch.float32], errors


@pytest.mark.parametrize("backend", ["pytorch", "cpu"])
def test_gradcheck(backend, kernels):
    skip_unless_built(backend, kernels)
    value, shapes, starts, locations, weights = random_inputs(
        batch=2, queries=3, heads=2, channels=3, points=2, shapes=((3, 2), (2, 3)), dtype=torch.float64)
    # Off random_inputs' 1/1024 grid, which can put a point where the gradient jumps.
    generator = torch.Generator().manual_seed(0)
    locations = torch.rand(locations.shape, dtype=torch.float64, generator=generator) * 1.2 - 0.1

    def function(value, locations, weights):
        return ms_deform_attn(value, shapes, starts, locations, weights, backend=backend)

    inputs = tuple(t.requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_keeps_value_dtype(backend, kernels):
    """Under autocast the output has value's (lower) dtype in every back end."""
    skip_unless_built(backend, kernels)
    device = "cuda" if backend == "cuda" else "cpu"
    low = torch.float16 if device == "cuda" else torch.bfloat16
    value, shapes, starts, locations, weights = random_inputs(**CASES["odd levels"], device=device)
    reference = ms_deform_attn_pytorch(value, shapes, starts, locations, weights)
    with torch.autocast(device, dtype=low):
        output = ms_deform_attn(value.to(low), shapes, starts, locations, weights, backend=backend)
    assert output.dtype == low
    torch.testing.assert_close(output.float(), reference, atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------- inputs that do not fit together


def off_by_one(name: str, inputs: tuple) -> tuple:
    """``random_inputs`` of "odd levels" (levels 7x5 and 3x9: S = 62, starts [0, 35]) with one thing off by one."""
    value, shapes, starts, locations, weights = (t.clone() for t in inputs)
    if name == "height":
        shapes[0, 0] += 1
    elif name == "width":
        shapes[1, 1] -= 1
    elif name == "start":
        starts[1] += 1
    elif name == "pixels":
        value = value[:, :-1]
    elif name == "levels":
        shapes, starts = shapes[:1], starts[:1]
    elif name == "weights":
        weights = weights[..., :-1]
    return value, shapes, starts, locations, weights


OFF_BY_ONE = {
    "height": r"spatial_shapes \[\(8, 5\), \(3, 9\)\] cover 67 pixels .* S = 62",
    "width": r"spatial_shapes \[\(7, 5\), \(3, 8\)\] cover 59 pixels .* S = 62",
    "start": r"level_start_index \[0, 36\] must be \[0, 35\]",
    "pixels": r"cover 62 pixels .* S = 61",
    "levels": r"spatial_shapes must be \(levels, 2\) = \(2, 2\) .* got \(1, 2\)",
    "weights": r"attention_weights must be \(N, Lq, heads, levels, points\) = \(3, 17, 2, 2, 3\) .* got \(3, 17, 2, 2, 2\)",
}


@pytest.mark.parametrize("name", OFF_BY_ONE)
@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_off_by_one_are_refused_before_any_back_end_runs(backend, name, kernels):
    """A ValueError naming the shapes, not garbage, an out-of-bounds read or the kernel's own error."""
    skip_unless_built(backend, kernels)
    device = "cuda" if backend == "cuda" else "cpu"
    inputs = off_by_one(name, random_inputs(**CASES["odd levels"], device=device))
    with pytest.raises(ValueError, match=OFF_BY_ONE[name]):
        ms_deform_attn(*inputs, backend=backend)
    if backend == "pytorch":
        with pytest.raises(ValueError, match=OFF_BY_ONE[name]):
            ms_deform_attn_pytorch(*inputs)


def test_mismatched_shapes_dtypes_and_devices_are_refused():
    value, shapes, starts, locations, weights = random_inputs(**CASES["odd levels"])
    with pytest.raises(ValueError, match=r"value must be \(N, S, heads, head_dim\), got \(3, 62, 12\)"):
        ms_deform_attn(value.flatten(2), shapes, starts, locations, weights)
    with pytest.raises(ValueError, match=r"N = 3 and heads = 2 .* got \(3, 17, 1, 2, 3, 2\)"):
        ms_deform_attn(value, shapes, starts, locations[:, :, :1], weights[:, :, :1])
    with pytest.raises(ValueError, match=r"level_start_index must be \(levels,\) = \(2,\)"):
        ms_deform_attn(value, shapes, starts[None], locations, weights)
    with pytest.raises(ValueError, match="spatial_shapes .* must all be positive"):
        ms_deform_attn(value, torch.tensor([[62, 1], [0, 9]]), starts.new_tensor([0, 62]), locations, weights)
    with pytest.raises(TypeError, match="spatial_shapes must be an integer tensor, got torch.float32"):
        ms_deform_attn(value, shapes.float(), starts, locations, weights)
    with pytest.raises(TypeError, match="attention_weights must be floating point"):
        ms_deform_attn(value, shapes, starts, locations, weights.long())
    with pytest.raises(ValueError, match="sampling_locations is on meta, value on cpu"):
        ms_deform_attn(value, shapes, starts, locations.to("meta"), weights)


def test_shapes_are_read_once_per_pair_and_again_after_an_in_place_change(monkeypatch):
    """Reading the shape tensors is a device-to-host copy (a sync on CUDA): a model's layers share one
    pair, which is read once; writing into it in place is noticed."""
    value, shapes, starts, locations, weights = random_inputs(**CASES["odd levels"])
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self) or tolist(self))
    for _ in range(3):
        ms_deform_attn(value, shapes, starts, locations, weights, backend="pytorch")
    assert len(reads) == 2  # spatial_shapes and level_start_index, once
    starts[1] += 1
    with pytest.raises(ValueError, match="level_start_index"):
        ms_deform_attn(value, shapes, starts, locations, weights, backend="pytorch")
    starts[1] -= 1
    ms_deform_attn(value, shapes, starts, locations, weights, backend="pytorch")
    with pytest.raises(ValueError, match="S = 61"):  # the same pair, another value
        ms_deform_attn(value[:, :-1], shapes, starts, locations, weights, backend="pytorch")


def test_inference_tensors_are_checked_on_every_call():
    """They have no version counter to say whether they changed."""
    with torch.inference_mode():
        value, shapes, starts, locations, weights = random_inputs(**CASES["odd levels"])
        expected = ms_deform_attn(value, shapes, starts, locations, weights, backend="pytorch")
        shapes[0, 0] += 1
        with pytest.raises(ValueError, match="cover 67 pixels"):
            ms_deform_attn(value, shapes, starts, locations, weights, backend="pytorch")
    assert expected.shape == (3, 17, 12)


# ---------------------------------------------------------------- choosing a back end


def test_auto_uses_the_cpu_kernel(kernels, detr_ssl_log, monkeypatch):
    skip_unless_built("cpu", kernels)
    monkeypatch.setattr(msda_module, "_announced", set())
    ms_deform_attn(*random_inputs(**CASES["batch 1"]), backend="auto")
    assert "cpu tensors use the cpu back end" in detr_ssl_log.text


def test_default_backend(monkeypatch, detr_ssl_log):
    monkeypatch.setattr(msda_module, "_default_backend", "auto")
    monkeypatch.setattr(msda_module, "_announced", set())
    set_default_backend("pytorch")
    ms_deform_attn(*random_inputs(**CASES["batch 1"]))
    assert "cpu tensors use the pytorch back end" in detr_ssl_log.text
    with pytest.raises(ValueError, match="unknown back end"):
        set_default_backend("triton")


def test_unavailable_backend_raises():
    inputs = random_inputs(**CASES["batch 1"])
    with pytest.raises(ValueError, match="needs cuda tensors"):
        ms_deform_attn(*inputs, backend="cuda")
    with pytest.raises(ValueError, match="unknown back end"):
        ms_deform_attn(*inputs, backend="fast")


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    def fail(kind, verbose=False):
        raise build.ExtensionBuildError(f"could not build the {kind} kernel of ms_deform_attn: no compiler")

    monkeypatch.setattr(build, "load_extension", fail)
    monkeypatch.setattr(msda_module, "_fallback_warned", set())
    inputs = random_inputs(**CASES["odd levels"])
    with pytest.warns(RuntimeWarning, match="CPU kernel is unavailable.*no compiler") as record:
        first = ms_deform_attn(*inputs, backend="auto")
        second = ms_deform_attn(*inputs, backend="auto")
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    torch.testing.assert_close(first, ms_deform_attn_pytorch(*inputs))
    torch.testing.assert_close(second, first)
    with pytest.raises(build.ExtensionBuildError, match="no compiler"):
        ms_deform_attn(*inputs, backend="cpu")


def test_build_failure_is_remembered(monkeypatch):
    attempts = []

    def broken_build(kind, verbose):
        attempts.append(kind)
        raise RuntimeError("Error building extension 'detr_ssl_kernels_cpu'")

    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_build", broken_build)
    for _ in range(2):
        with pytest.raises(build.ExtensionBuildError, match="Error building extension") as info:
            build.load_extension("cpu")
    assert attempts == ["cpu"]
    assert isinstance(info.value.__cause__, RuntimeError)


# ---------------------------------------------------------------- determinism


@contextlib.contextmanager
def deterministic_algorithms(warn_only: bool = False):
    """``torch.use_deterministic_algorithms(True)`` for the block, as ``--deterministic`` sets it."""
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


@pytest.mark.parametrize("backend", ["pytorch", "cpu"])
def test_cpu_back_ends_run_and_repeat_bitwise_under_deterministic_algorithms(backend, kernels):
    """Forward and backward raise no determinism alert, and give the same bits on 1 and 2 threads
    (the CPU kernel's backward gives each thread its own slice of grad_value)."""
    skip_unless_built(backend, kernels)
    case = CASES["deformable detr"]
    inputs = random_inputs(**case)
    grad_output = torch.randn(case["batch"], case["queries"], case["heads"] * case["channels"])
    threads = torch.get_num_threads()
    results = []
    try:
        with deterministic_algorithms():
            for count in (1, 2, 1):
                torch.set_num_threads(count)
                results.append(output_and_grads(backend, inputs, grad_output))
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(result, results[0]))


CUDA_BACKWARDS = [pytest.param("cuda", "ms_deform_attn_backward_cuda", marks=needs_cuda),
                  pytest.param("pytorch", "grid_sampler_2d_backward_cuda", marks=needs_cuda)]


@pytest.mark.parametrize(("backend", "alert"), CUDA_BACKWARDS)
def test_cuda_backward_is_refused_under_deterministic_algorithms(backend, alert, kernels):
    """Both CUDA backwards sum with atomicAdd: they raise, or warn with warn_only=True, through
    torch's own alert. The forward pass (inference) is deterministic and runs."""
    skip_unless_built(backend, kernels)
    inputs = random_inputs(**CASES["odd levels"], device="cuda")
    grad_output = torch.randn(3, 17, 12, device="cuda")
    expected = output_and_grads(backend, inputs, grad_output)
    value, shapes, starts, locations, weights = (t.detach().requires_grad_() if t.is_floating_point() else t
                                                 for t in inputs)
    with deterministic_algorithms():
        output = ms_deform_attn(value, shapes, starts, locations, weights, backend=backend)
        torch.testing.assert_close(output, expected[0], rtol=0, atol=0)
        with pytest.raises(RuntimeError, match=f"{alert}.* does not have a deterministic implementation"):
            output.backward(grad_output)
    with deterministic_algorithms(warn_only=True), pytest.warns(UserWarning, match=alert):
        results = output_and_grads(backend, inputs, grad_output)
    for result, reference in zip(results, expected):
        torch.testing.assert_close(result, reference)


def test_seed_everything_deterministic_sets_cublas_and_cudnn(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        seed_everything(0, deterministic=True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # a user's choice is kept
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


# ---------------------------------------------------------------- builds and tools


def test_build_directory_follows_sources_and_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DETR_SSL_CACHE", str(tmp_path / "cache"))
    directory = build.build_directory("cpu")
    assert directory.parent == tmp_path / "cache" / "ops"
    assert directory.name.startswith(f"cpu-{torch.__version__}-")
    assert build.build_directory("cpu") == directory

    sources = tmp_path / "csrc"
    shutil.copytree(build.CSRC, sources)
    monkeypatch.setattr(build, "CSRC", sources)
    assert build.build_directory("cpu") == directory
    (sources / "sampling.h").write_text((sources / "sampling.h").read_text() + "\n// edited\n")
    assert build.build_directory("cpu") != directory


@pytest.mark.parametrize("capability, vectorised", [("AVX512", True), ("AVX2", True), ("DEFAULT", False)])
def test_cpu_kernel_is_built_for_the_vector_units_pytorch_found(monkeypatch, tmp_path, capability, vectorised):
    """AVX2 + FMA code where PyTorch runs AVX2 / AVX-512 kernels (ATEN_CPU_CAPABILITY included),
    generic code elsewhere, each build in its own cache directory; the CUDA build never changes."""
    monkeypatch.setenv("DETR_SSL_CACHE", str(tmp_path))
    monkeypatch.setattr(build.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(build.torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    generic = build.build_directory("cpu")
    monkeypatch.setattr(build.torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert ("-mavx2" in build.cflags("cpu") and "-mfma" in build.cflags("cpu")) == vectorised
    assert (build.build_directory("cpu") != generic) == vectorised
    assert build.cflags("cuda") == build.CFLAGS


def test_check_command(kernels, capsys):
    skip_unless_built("cpu", kernels)
    assert check_main([]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cpu ")]
    assert len(rows) == 2 * len(CASES) and all(row.endswith(" ok") for row in rows)


def run_build(args: list[str], cache, **env) -> subprocess.CompletedProcess:
    environment = dict(os.environ, DETR_SSL_CACHE=str(cache), **env)
    return subprocess.run([sys.executable, "-m", "detr_ssl.ops.build", *args], env=environment, cwd=REPO,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="needs nvcc")
def test_cuda_sources_compile(tmp_path):
    """nvcc compiles the CUDA kernel for an architecture given by name; no GPU needed."""
    result = run_build(["--cuda"], tmp_path, TORCH_CUDA_ARCH_LIST="9.0")
    assert result.returncode == 0, result.stderr
    assert "cuda: " in result.stdout and list(tmp_path.glob("ops/cuda-*/*.so"))


@pytest.mark.slow
def test_concurrent_builds_share_one_cache(tmp_path):
    """Two processes building into one empty cache both succeed, and a third reuses the build."""
    environment = dict(os.environ, DETR_SSL_CACHE=str(tmp_path))
    command = [sys.executable, "-m", "detr_ssl.ops.build", "--cpu"]
    processes = [subprocess.Popen(command, env=environment, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=900)
        assert process.returncode == 0, err
    built = list(tmp_path.glob("ops/cpu-*/*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime
    assert run_build(["--cpu"], tmp_path).returncode == 0
    assert built[0].stat().st_mtime == mtime
