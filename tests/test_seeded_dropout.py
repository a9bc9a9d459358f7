"""The CPU dropout kernel (detr_ssl.ops.seeded_dropout): F.dropout's distribution and gradients, its own
random numbers, and F.dropout wherever the kernel does not apply."""
from __future__ import annotations

import importlib
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detr_ssl.config import parse_args
from detr_ssl.models import build_model
from detr_ssl.ops import Dropout, build, dropout

seeded = importlib.import_module("detr_ssl.ops.seeded_dropout")  # the module; the package exports the function


@pytest.fixture(scope="module")
def kernel():
    """The CPU extension (built on first use, cached); the kernel's tests skip where it does not build."""
    module = seeded._cpu_kernel()
    if module is None:
        pytest.skip(f"the CPU kernels do not build here ({seeded._kernel_state.get('error')})")
    return module


@pytest.fixture
def drawn(monkeypatch):
    """Counts the calls that reach the kernel."""
    calls = []
    for function in (seeded._SeededDropout, seeded._SeededReluDropout):
        monkeypatch.setattr(function, "apply", lambda *a, apply=function.apply: calls.append(a[0].shape) or apply(*a))
    return calls


def within_sigmas(count: float, trials: int, probability: float, sigmas: float = 6.0) -> bool:
    return abs(count - trials * probability) <= sigmas * math.sqrt(trials * probability * (1 - probability))


# ---------------------------------------------------------------- distribution


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keeps_one_minus_p_and_scales_the_rest(kernel, p):
    torch.manual_seed(0)
    x = torch.randn(1 << 21)
    y = dropout(x, p)
    kept = y != 0
    assert within_sigmas(kept.sum().item(), x.numel(), 1 - p)
    assert torch.equal(y[kept], x[kept] * torch.tensor(1 / (1 - p), dtype=x.dtype))


def test_neighbours_and_calls_are_independent(kernel):
    """Adjacent elements, elements of two calls, and rows of a 2-D tensor do not share their draws."""
    p, n = 0.3, 1 << 20
    ones = torch.ones(n)
    first, second = dropout(ones, p) != 0, dropout(ones, p) != 0
    keep = 1 - p
    assert within_sigmas((first[:-1] & first[1:]).sum().item(), n - 1, keep * keep)
    assert within_sigmas((first & second).sum().item(), n, keep * keep)
    rows = dropout(torch.ones(1024, 1024), p) != 0
    assert within_sigmas((rows[:-1] & rows[1:]).sum().item(), 1023 * 1024, keep * keep)


def test_torch_manual_seed_repeats_it(kernel):
    x = torch.randn(4096)
    torch.manual_seed(7)
    a = dropout(x, 0.2)
    torch.manual_seed(7)
    assert torch.equal(dropout(x, 0.2), a)
    assert not torch.equal(dropout(x, 0.2), a)


def test_the_mask_does_not_depend_on_the_thread_count(kernel):
    threads = torch.get_num_threads()
    x = torch.randn(300_000)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(3)
        one = dropout(x, 0.1)
        torch.set_num_threads(max(2, threads))
        torch.manual_seed(3)
        many = dropout(x, 0.1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(kernel, dtype):
    x = torch.randn(65536).to(dtype)
    y = dropout(x, 0.25)
    kept = y != 0
    assert y.dtype == dtype and within_sigmas(kept.sum().item(), x.numel(), 0.75)
    assert torch.allclose(y[kept].double(), x[kept].double() / 0.75, rtol=torch.finfo(dtype).eps)


def test_nan_stays_nan_as_in_f_dropout(kernel):
    x = torch.full((1000,), float("nan"))
    assert torch.isnan(dropout(x, 0.5)).all()


def test_non_contiguous_input_is_dropped_in_its_logical_order(kernel):
    x = torch.randn(64, 48).t()  # not contiguous
    torch.manual_seed(1)
    y = dropout(x, 0.3)
    torch.manual_seed(1)
    assert y.shape == x.shape and torch.equal(y, dropout(x.contiguous(), 0.3))


# ---------------------------------------------------------------- gradients


def test_gradient_uses_the_forward_mask(kernel):
    x = torch.randn(5000, requires_grad=True)
    y = dropout(x, 0.4)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad != 0, y != 0)
    assert torch.allclose(x.grad[y != 0], torch.tensor(1 / 0.6))


def test_gradcheck_and_gradgradcheck(kernel):
    x = torch.randn(40, 3, dtype=torch.float64, requires_grad=True)

    def fn(t):
        torch.manual_seed(11)  # the same mask on every evaluation
        return dropout(t, 0.3)
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


# ---------------------------------------------------------------- relu and dropout in one pass


def test_relu_dropout_is_dropout_of_relu_with_its_gradient(kernel):
    x = torch.randn(300, 70)
    x[0, :5] = 0.0  # relu's gradient at 0 is 0, as in torch
    fused_input, plain_input = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = torch.randn_like(x)
    torch.manual_seed(9)
    fused = seeded.relu_dropout(fused_input, 0.3)
    torch.manual_seed(9)
    plain = dropout(F.relu(plain_input), 0.3)
    assert torch.equal(fused, plain)
    fused.backward(upstream)
    plain.backward(upstream)
    assert torch.equal(fused_input.grad, plain_input.grad)
    assert torch.isnan(seeded.relu_dropout(torch.full((100,), float("nan")), 0.5)).all()

    def fn(t):
        torch.manual_seed(11)  # the same mask on every evaluation
        return seeded.relu_dropout(t, 0.3)
    assert torch.autograd.gradcheck(fn, (torch.randn(40, 3, dtype=torch.float64, requires_grad=True),))


def test_relu_dropout_is_f_relu_and_f_dropout_where_the_kernel_does_not_apply(kernel, drawn):
    x = torch.randn(100)
    assert torch.equal(seeded.relu_dropout(x, 0.5, training=False), F.relu(x))
    assert torch.equal(seeded.relu_dropout(x, 0.0), F.relu(x))
    seeded.set_kernel_enabled(False)
    try:
        torch.manual_seed(3)
        ours = seeded.relu_dropout(x, 0.2)
    finally:
        seeded.set_kernel_enabled(True)
    torch.manual_seed(3)
    assert torch.equal(ours, F.dropout(F.relu(x), 0.2)) and drawn == []


# ---------------------------------------------------------------- where it is F.dropout


def test_f_dropout_where_the_kernel_does_not_apply(kernel, drawn):
    x = torch.randn(100)
    assert dropout(x, 0.5, training=False) is x
    assert torch.equal(dropout(x, 0.0), x)
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    y = x.clone()
    torch.manual_seed(5)
    out = dropout(y, 0.5, inplace=True)
    torch.manual_seed(5)
    assert out is y and torch.equal(y, F.dropout(x, 0.5))
    assert dropout(torch.empty(0, 4), 0.5).shape == (0, 4)
    with pytest.raises(ValueError):
        dropout(x, 1.5)
    assert drawn == []
    assert len(dropout(x, 0.5)) == 100 and drawn == [x.shape]


def test_switched_off_it_is_f_dropout(kernel, drawn):
    x = torch.randn(1000)
    seeded.set_kernel_enabled(False)
    try:
        torch.manual_seed(2)
        ours = dropout(x, 0.1)
    finally:
        seeded.set_kernel_enabled(True)
    torch.manual_seed(2)
    assert torch.equal(ours, F.dropout(x, 0.1)) and drawn == []


def test_without_a_compiler_it_is_f_dropout_and_says_so_once(monkeypatch, caplog):
    def no_compiler(kind, verbose=False):
        raise build.ExtensionBuildError(f"could not build the {kind} kernels of detr_ssl (no compiler)")

    monkeypatch.setattr(seeded, "_kernel_state", {})
    monkeypatch.setattr(build, "load_extension", no_compiler)
    logger = logging.getLogger("detr_ssl")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="detr_ssl"):
            x = torch.randn(1000)
            torch.manual_seed(4)
            ours = [dropout(x, 0.2) for _ in range(3)][0]
    finally:
        logger.removeHandler(caplog.handler)
    torch.manual_seed(4)
    assert torch.equal(ours, F.dropout(x, 0.2))
    records = {id(r): r for r in caplog.records}.values()  # a record reaches caplog once per handler path
    assert [r.getMessage() for r in records if "dropout" in r.getMessage()] == [
        "dropout: the CPU kernel is unavailable, using F.dropout (could not build the cpu kernels of detr_ssl "
        "(no compiler))"]


# ---------------------------------------------------------------- in the models


@pytest.mark.parametrize("model", ["detr", "deformable_detr"])
def test_models_train_through_it_with_their_keys_unchanged(kernel, drawn, coco_batch, model):
    """Every dropout of the transformer layers is the kernel's in a CPU training step on real photos;
    the modules stay nn.Dropout and the state dict has the official keys (dropout has none)."""
    samples, targets = coco_batch
    args = parse_args(["--model", model, "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "64",
                       "--dim_feedforward", "128", "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "10",
                       "--device", "cpu"])
    torch.manual_seed(0)
    net, criterion, _ = build_model(args)
    dropouts = [m for m in net.transformer.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(isinstance(m, Dropout) for m in dropouts)
    assert not any("dropout" in key for key in net.state_dict())
    net.train()
    losses = criterion(net(samples), targets)
    sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
    assert len(drawn) >= len(dropouts)  # each layer's dropouts ran the kernel (the decoder's once per layer)
    assert all(p.grad is not None for n, p in net.transformer.named_parameters() if p.requires_grad)


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("masks", ["none", "key_padding", "bool_attn_mask", "float_per_head_mask", "self_attention"])
def test_attention_path_computes_what_multihead_attention_does(kernel, monkeypatch, masks):
    """Our attention path, its dropout made the identity, against nn.MultiheadAttention's own forward
    without dropout: outputs and gradients of inputs and parameters, with each kind of mask."""
    from detr_ssl.models.transformer import MultiheadAttention

    torch.manual_seed(0)
    batch, queries, keys, width, heads = 2, 7, 11, 32, 4
    ours = MultiheadAttention(width, heads, dropout=0.1, batch_first=True).double().train()
    query, key = torch.randn(batch, queries, width, dtype=torch.float64), torch.randn(batch, keys, width,
                                                                                  dtype=torch.float64)
    value = torch.randn(batch, keys, width, dtype=torch.float64)
    kwargs = {}
    if masks == "key_padding":
        kwargs["key_padding_mask"] = torch.zeros(batch, keys, dtype=torch.bool)
        kwargs["key_padding_mask"][0, -3:] = True
    elif masks == "bool_attn_mask":
        kwargs["attn_mask"] = torch.rand(queries, keys) < 0.3
        kwargs["attn_mask"][:, 0] = False  # every query attends somewhere
    elif masks == "float_per_head_mask":
        kwargs["attn_mask"] = torch.randn(batch * heads, queries, keys, dtype=torch.float64)

    def run(module_forward):
        inputs = [t.clone().requires_grad_() for t in (query, key, value)]
        ours.zero_grad()
        q, k, v = inputs
        out = module_forward(q, q, q) if masks == "self_attention" else module_forward(q, k, v)
        out.square().sum().backward()
        return out, [t.grad for t in inputs if t.grad is not None] + [p.grad.clone() for p in ours.parameters()]

    identity_calls = []
    monkeypatch.setattr(seeded, "dropout", lambda x, p, training: identity_calls.append(p) or x)
    mine, mine_grads = run(lambda q, k, v: ours(q, k, v, need_weights=False, **kwargs)[0])
    assert identity_calls == [0.1]  # our path ran, with the module's dropout
    ours.eval()
    reference, reference_grads = run(lambda q, k, v: nn.MultiheadAttention.forward(ours, q, k, v, need_weights=False,
                                                                                    **kwargs)[0])
    assert torch.allclose(mine, reference, atol=1e-12)
    for a, b in zip(mine_grads, reference_grads):
        assert torch.allclose(a, b, atol=1e-10)


def test_attention_is_the_parents_where_the_kernel_does_not_apply(kernel, drawn):
    from detr_ssl.models.transformer import MultiheadAttention

    attention = MultiheadAttention(16, 2, dropout=0.1, batch_first=True)
    x = torch.randn(1, 5, 16)
    _, weights = attention(x, x, x)  # need_weights: the parent's path
    assert weights is not None and drawn == []
    attention.eval()
    attention(x, x, x, need_weights=False)
    assert drawn == []
    attention.train()
    attention(x, x, x, need_weights=False)
    assert drawn == [(1, 2, 5, 5)]
