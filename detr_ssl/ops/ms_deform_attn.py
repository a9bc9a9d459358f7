"""Multi-scale deformable attention (the sampling core of Deformable DETR) and its back ends.

Each query gathers, for every head, ``levels x points`` bilinear samples of ``value`` at
learned locations and sums them with its attention weights. Three back ends compute the same
function: a PyTorch path (one ``grid_sample`` per level, runs anywhere), a C++ CPU kernel and a
CUDA kernel. The kernels are compiled on first use (see :mod:`detr_ssl.ops.build`); ``"auto"``
falls back to the PyTorch path, with one warning, where they cannot be built.

Dtypes: the result always has ``value``'s dtype, whichever back end runs, so that switching
back ends never changes the dtypes a model sees. The CUDA kernel computes float16 and bfloat16
natively (it reads locations and weights in float32 and accumulates in float32); the CPU kernel
computes float64 as float64 and everything else as float32. Under autocast ``value`` usually
comes out of a Linear layer in half precision, so the result is in half precision too, as the
surrounding Linear layers would produce.

Inputs that do not fit together (levels that do not tile ``value``, mismatched shapes) are refused
with a ValueError before any back end runs: a kernel given such levels would read outside ``value``.

Determinism: forward passes sum in a fixed order on every device. The CPU kernel's backward is
deterministic too (each thread owns a disjoint slice of the value gradient). On CUDA no backward
is: the kernel adds its gradients with atomicAdd, and the PyTorch path's ``grid_sample`` backward
does the same. Under ``torch.use_deterministic_algorithms(True)`` (``--deterministic``) both raise
through torch's own alert for nondeterministic ops, which ``warn_only=True`` turns into a warning;
CUDA inference, which runs no backward, is unaffected.
"""
from __future__ import annotations

import logging
import warnings
import weakref
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

BACKENDS = ("auto", "cuda", "cpu", "pytorch")

logger = logging.getLogger("detr_ssl")

_default_backend = "auto"
_fallback_warned: set[str] = set()  # device types for which "auto" has warned about a failed build
_announced: set[tuple[str, str]] = set()  # (device type, back end) pairs already logged
_last_levels: tuple = ()  # the last valid (spatial_shapes, level_start_index) pair: see _level_shapes


def set_default_backend(name: str) -> None:
    """Back end used when ``ms_deform_attn`` is called with ``backend=None``."""
    global _default_backend
    _check_name(name)
    _default_backend = name


def available_backends() -> list[str]:
    """Back ends that can run in this process, building the kernels if needed.

    "cuda" needs a visible GPU and a successful build, "cpu" a successful build; "pytorch" is
    always there.
    """
    names = []
    for kind in ("cuda", "cpu"):
        if kind == "cuda" and not torch.cuda.is_available():
            continue
        try:
            _load(kind)
        except RuntimeError:
            continue
        names.append(kind)
    return names + ["pytorch"]


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str | None = None,
) -> Tensor:
    """Sample ``value`` at ``sampling_locations`` on every level and sum with ``attention_weights``.

    Args:
        value: (N, S, heads, head_dim), the flattened levels one after the other.
        spatial_shapes: (L, 2) integers, (height, width) of each level; S = sum of height * width.
        level_start_index: (L,) integers, index in S of each level's first pixel.
        sampling_locations: (N, Lq, heads, L, points, 2), normalised (x, y); (0, 0) is the
            top-left corner of the top-left pixel, (1, 1) the bottom-right corner of the last one.
            Samples outside [0, 1] read zeros.
        attention_weights: (N, Lq, heads, L, points).
        backend: "auto", "cuda", "cpu" or "pytorch"; None uses :func:`set_default_backend`'s.

    Returns:
        (N, Lq, heads * head_dim) in ``value``'s dtype.

    Raises:
        TypeError: a dtype that is not floating point (value, locations, weights) or integer (the
            other two).
        ValueError: shapes that do not fit together, levels that do not tile S in order, or
            value, locations and weights on different devices; checked before any back end runs.
        RuntimeError: a CUDA backward under ``torch.use_deterministic_algorithms(True)`` (see the
            module's docstring).
    """
    shapes = _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    name, extension = _select(backend or _default_backend, value.device)
    if (value.device.type, name) not in _announced:
        _announced.add((value.device.type, name))
        logger.info("ms_deform_attn: %s tensors use the %s back end", value.device.type, name)
    if extension is None:
        return _grid_sample_path(value, shapes, sampling_locations, attention_weights)

    value_dtype, coord_dtype = _kernel_dtypes(name, value.dtype)
    device = value.device
    output = _KernelFunction.apply(
        extension,
        value.to(value_dtype).contiguous(),
        spatial_shapes.to(device, torch.int64).contiguous(),
        level_start_index.to(device, torch.int64).contiguous(),
        sampling_locations.to(coord_dtype).contiguous(),
        attention_weights.to(coord_dtype).contiguous(),
    )
    return output.to(value.dtype)


def ms_deform_attn_pytorch(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The reference path: one ``grid_sample`` per level. Computes in the promoted dtype of ``value``
    and ``sampling_locations`` and returns ``value``'s dtype."""
    shapes = _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return _grid_sample_path(value, shapes, sampling_locations, attention_weights)


def _grid_sample_path(value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor,
                      attention_weights: Tensor) -> Tensor:
    """The PyTorch path on checked inputs; ``shapes`` are the levels' (height, width) on the host,
    which split ``value`` into its levels."""
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    grids = 2 * sampling_locations.to(dtype) - 1  # grid_sample's coordinates: -1 and 1 are the outer edges
    weights = attention_weights.to(dtype).transpose(1, 2).reshape(batch * heads, 1, queries, levels, points)
    output = value.new_zeros(batch * heads, channels, queries, dtype=dtype)
    for level, (value_l, (height, width)) in enumerate(zip(value.split([h * w for h, w in shapes], dim=1), shapes)):
        value_l = value_l.to(dtype).permute(0, 2, 3, 1).reshape(batch * heads, channels, height, width)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (N * heads, Lq, points, 2)
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        output = output + (sampled * weights[:, :, :, level]).sum(-1)  # (N * heads, head_dim, Lq)
    output = output.view(batch, heads * channels, queries).transpose(1, 2).contiguous()
    return output.to(value.dtype)


class _KernelFunction(torch.autograd.Function):
    """Autograd for a compiled kernel; ``extension`` is the CPU or CUDA module of :mod:`.build`."""

    @staticmethod
    def forward(ctx, extension, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        ctx.extension = extension
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return extension.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad_value, grad_locations, grad_weights = ctx.extension.backward(*ctx.saved_tensors, grad_output.contiguous())
        return None, grad_value, None, None, grad_locations, grad_weights


def _check_inputs(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                  attention_weights: Tensor) -> list[tuple[int, int]]:
    """The levels' (height, width), once the five inputs are known to fit together.

    Raises TypeError for a wrong dtype and ValueError, naming the shapes, for anything else.
    """
    for name, tensor in (("value", value), ("sampling_locations", sampling_locations),
                         ("attention_weights", attention_weights)):
        if not tensor.is_floating_point():
            raise TypeError(f"ms_deform_attn: {name} must be floating point, got {tensor.dtype}")
        if tensor.device != value.device:
            raise ValueError(f"ms_deform_attn: {name} is on {tensor.device}, value on {value.device}")
    for name, tensor in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise TypeError(f"ms_deform_attn: {name} must be an integer tensor, got {tensor.dtype}")
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, heads, head_dim), got {tuple(value.shape)}")
    batch, _, heads, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2 or \
            (sampling_locations.shape[0], sampling_locations.shape[2]) != (batch, heads):
        raise ValueError(f"ms_deform_attn: sampling_locations must be (N, Lq, heads, levels, points, 2) with "
                         f"N = {batch} and heads = {heads} as in value {tuple(value.shape)}, got "
                         f"{tuple(sampling_locations.shape)}")
    levels = sampling_locations.shape[3]
    checks = (("attention_weights", attention_weights, sampling_locations.shape[:5], "(N, Lq, heads, levels, points)"),
              ("spatial_shapes", spatial_shapes, (levels, 2), "(levels, 2)"),
              ("level_start_index", level_start_index, (levels,), "(levels,)"))
    for name, tensor, expected, meaning in checks:
        if tensor.shape != expected:
            raise ValueError(f"ms_deform_attn: {name} must be {meaning} = {tuple(expected)} to match "
                             f"sampling_locations {tuple(sampling_locations.shape)}, got {tuple(tensor.shape)}")
    return _level_shapes(value.shape[1], spatial_shapes, level_start_index)


def _level_shapes(pixels: int, spatial_shapes: Tensor, level_start_index: Tensor) -> list[tuple[int, int]]:
    """The levels' (height, width), checked to tile the ``pixels`` rows of value in order.

    Reading the two tensors is a copy to the host, which for CUDA tensors waits for the GPU. A
    model passes the same pair to each of its attention layers, so the last valid pair is
    remembered, by identity and version counter (which in-place writes bump), and read once per
    forward pass. Inference tensors have no version counter and are read on every call.
    """
    global _last_levels
    tracked = not (spatial_shapes.is_inference() or level_start_index.is_inference())
    key = (spatial_shapes._version, level_start_index._version, pixels) if tracked else None
    if key is not None and _last_levels and _last_levels[0]() is spatial_shapes \
            and _last_levels[1]() is level_start_index and _last_levels[2] == key:
        return _last_levels[3]
    shapes = [(int(height), int(width)) for height, width in spatial_shapes.tolist()]
    sizes = [height * width for height, width in shapes]
    starts = [0, *accumulate(sizes)]
    if any(height < 1 or width < 1 for height, width in shapes):
        raise ValueError(f"ms_deform_attn: spatial_shapes {shapes} must all be positive")
    if starts[-1] != pixels:
        raise ValueError(f"ms_deform_attn: spatial_shapes {shapes} cover {starts[-1]} pixels (the sum of height * "
                         f"width), but value has S = {pixels}")
    if level_start_index.tolist() != starts[:-1]:
        raise ValueError(f"ms_deform_attn: level_start_index {level_start_index.tolist()} must be {starts[:-1]}, "
                         f"the running sum of height * width of spatial_shapes {shapes}")
    if key is not None:
        _last_levels = (weakref.ref(spatial_shapes), weakref.ref(level_start_index), key, shapes)
    return shapes


def _kernel_dtypes(backend: str, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of value, dtype of locations and weights) that the kernel of ``backend`` computes in."""
    if dtype == torch.float64:
        return torch.float64, torch.float64
    if backend == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return dtype, torch.float32
    return torch.float32, torch.float32


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"ms_deform_attn: unknown back end {name!r}; choose from {', '.join(BACKENDS)}")


def _load(kind: str):
    # Imported here, not at the top: ``python -m detr_ssl.ops.build`` must not find the module imported.
    from . import build

    return build.load_extension(kind)


def _select(name: str, device: torch.device):
    """(back end that runs, its extension module or None for the PyTorch path)."""
    _check_name(name)
    if name == "pytorch":
        return "pytorch", None
    if name == "auto":
        if device.type not in ("cpu", "cuda"):
            return "pytorch", None
        try:
            return device.type, _load(device.type)
        except RuntimeError as err:
            if device.type not in _fallback_warned:
                _fallback_warned.add(device.type)
                warnings.warn(f"ms_deform_attn: the {device.type.upper()} kernel is unavailable, using the slower "
                              f"PyTorch path instead ({err})", RuntimeWarning, stacklevel=3)
            return "pytorch", None
    if device.type != name:
        raise ValueError(f"ms_deform_attn: back end {name!r} needs {name} tensors, got tensors on {device}")
    return name, _load(name)
