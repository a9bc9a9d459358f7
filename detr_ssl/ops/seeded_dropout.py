"""Dropout for CPU training that costs a few milliseconds, not a fifth of the step.

``F.dropout`` on a CPU draws its mask with ``bernoulli_`` from the serial Mersenne Twister and keeps
it, as a float tensor, for the backward pass: with it a Deformable DETR-R50 CPU training step takes
1.15-1.19x as long, a DETR-R50 step 1.07-1.10x (docs/benchmarks.md). :func:`dropout` draws element i's mask
from a hash of (seed, i) instead, one seed per call from torch's generator (so ``torch.manual_seed``
repeats a run): the CPU kernel hashes on all threads, vectorised, and the backward pass recomputes
the mask from the seed rather than storing it. Each element is kept with probability 1 - p (to
within 2^-32) and scaled by 1 / (1 - p), as by ``F.dropout``; the random numbers differ, and do not
depend on the number of threads. :func:`relu_dropout` does the FFN's relu in the same pass and
needs only its output for the backward pass.

Everywhere else it is ``F.dropout``: CUDA (whose dropout is already fused), in-place dropout, p of 0
or 1, scripting, tracing and ``torch.compile``, and a machine where the CPU kernels cannot be built
(logged once).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..utils.misc import is_tracing

logger = logging.getLogger("detr_ssl")

_SEED_RANGE = 2**63 - 1
_use_kernel = True
_kernel_state: dict[str, object] = {}  # "module": the CPU extension, or "error": why it is unavailable


def set_kernel_enabled(enabled: bool) -> None:
    """Use the CPU kernel where it applies (the default) or always ``F.dropout`` (for A/B timings)."""
    global _use_kernel
    _use_kernel = enabled


def applies(input: Tensor, p: float, training: bool = True, inplace: bool = False) -> bool:
    """Whether :func:`dropout` with these arguments runs the CPU kernel (builds it on first use)."""
    if not (training and 0.0 < p < 1.0 and not inplace and input.device.type == "cpu" and input.numel()
            and input.is_floating_point() and _use_kernel) or is_tracing():
        return False
    return _cpu_kernel() is not None


def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """``F.dropout`` with the same arguments and distribution; see the module docstring for when the
    CPU kernel computes it."""
    if not applies(input, p, training, inplace):
        return F.dropout(input, p, training, inplace)
    return _with_fresh_seed(_SeededDropout, input, p)


def relu_dropout(input: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """``F.dropout(F.relu(input), p, training)``, in one pass where the CPU kernel applies: the FFN's
    activation and dropout. Its backward reads only the output, which the next linear layer keeps
    anyway, so neither the activation nor a mask is stored."""
    if not applies(input, p, training):
        return F.dropout(F.relu(input), p, training)
    return _with_fresh_seed(_SeededReluDropout, input, p)


def _with_fresh_seed(function: type[torch.autograd.Function], input: Tensor, p: float) -> Tensor:
    """``function`` through the CPU kernel with this call's seed, drawn from torch's generator (so
    ``torch.manual_seed`` repeats it)."""
    seed = int(torch.randint(_SEED_RANGE, ()).item())
    return function.apply(input, _cpu_kernel(), float(p), seed)


class Dropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout`: the same arguments, no parameters or buffers, so state
    dicts are unchanged."""

    def forward(self, input: Tensor) -> Tensor:
        return dropout(input, self.p, self.training, self.inplace)


class _SeededDropout(torch.autograd.Function):
    """Forward and backward are the same masked scaling, so the backward of the backward is too."""

    @staticmethod
    def forward(ctx, input: Tensor, kernel, p: float, seed: int) -> Tensor:
        ctx.kernel, ctx.p, ctx.seed = kernel, p, seed
        return kernel.seeded_dropout(input, p, seed)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        return _SeededDropout.apply(grad_output, ctx.kernel, ctx.p, ctx.seed), None, None, None


class _SeededReluDropout(torch.autograd.Function):
    """An element of the output is positive exactly where it passed both the relu and the mask, so
    the output alone gives the gradient."""

    @staticmethod
    def forward(ctx, input: Tensor, kernel, p: float, seed: int) -> Tensor:
        output = kernel.seeded_relu_dropout(input, p, seed)
        ctx.kernel, ctx.p = kernel, p
        ctx.save_for_backward(output)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        (output,) = ctx.saved_tensors
        return ctx.kernel.relu_dropout_backward(grad_output, output, ctx.p), None, None, None


def _cpu_kernel():
    """The CPU extension, or None (logged once) where it cannot be built."""
    if not _kernel_state:
        from . import build  # not at the top: ``python -m detr_ssl.ops.build`` must not find it imported

        try:
            _kernel_state["module"] = build.load_extension("cpu")
        except build.ExtensionBuildError as err:
            _kernel_state["error"] = err
            logger.info("dropout: the CPU kernel is unavailable, using F.dropout (%s)", err)
    return _kernel_state.get("module")
