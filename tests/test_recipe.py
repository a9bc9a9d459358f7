"""The ViT training recipe, general for every backbone: layer-wise lr decay, no weight decay on
norms / biases / embeddings, warmup + cosine per optimizer step, and the model EMA; the defaults
keep the official DETR recipe."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from torch import nn

from detr_ssl.__main__ import main
from detr_ssl.config import parse_args
from detr_ssl.engine import train as train_module
from detr_ssl.engine.ema import ModelEma
from detr_ssl.engine.optim import PerStepLR, build_lr_scheduler, build_optimizer, lr_factor
from detr_ssl.engine.runner import run
from detr_ssl.models import build_model
from test_faults import SHORT, TINY, assert_same_training_state, load, signal_after_steps

LR, LR_BACKBONE = 1e-4, 1e-5


def lr_of(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, tuple[float, float]]:
    """``name -> (lr, weight_decay)`` of every optimised parameter."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (group["lr"], group["weight_decay"]) for group in optimizer.param_groups
            for p in group["params"]}


def built(flags: list[str]) -> tuple[nn.Module, torch.optim.Optimizer, argparse.Namespace]:
    args = parse_args([*TINY, "--lr", str(LR), "--lr_backbone", str(LR_BACKBONE), *flags])
    model, _, _ = build_model(args)
    return model, build_optimizer(model, args), args


# ---------------------------------------------------------------------------------------------
# parameter groups


def test_vit_layer_decay_gives_each_block_its_lr_and_the_new_modules_the_full_lr():
    pytest.importorskip("timm")
    model, optimizer, _ = built(["--backbone", "vit_tiny_patch16", "--layer_decay", "0.5", "--vit_rel_pos"])
    lrs, depth = lr_of(optimizer, model), 12
    assert len(lrs) == sum(p.requires_grad for p in model.parameters())
    body = "backbone.0.body."
    for name, (lr, _) in lrs.items():
        if name.startswith(body + "vit.blocks."):
            block = int(name.split(".")[5])
            assert lr == pytest.approx(LR_BACKBONE * 0.5 ** (depth - block - 1)), name
        elif name.startswith(body + "vit."):  # patch embedding, position table: layer 0
            assert lr == pytest.approx(LR_BACKBONE * 0.5 ** depth), name
        else:  # the pyramid, the relative-position tables, the transformer and heads
            assert lr == LR, name
    assert lrs[body + "vit.pos_embed"][0] == pytest.approx(LR_BACKBONE * 0.5 ** 12)
    assert lrs[body + "vit.blocks.11.attn.qkv.weight"][0] == pytest.approx(LR_BACKBONE)
    assert lrs[body + "rel_pos_window.table"][0] == lrs[body + "rel_pos_global.table"][0] == LR
    assert any(name.startswith(body + "pyramid.") and lr == LR for name, (lr, _) in lrs.items())


def test_resnet_layer_decay_runs_over_the_four_stages_and_keeps_the_group_order():
    model, optimizer, _ = built(["--layer_decay", "0.5"])  # resnet18 with trainable BatchNorm: all stages train
    for name, (lr, decay) in lr_of(optimizer, model).items():
        if name.startswith("backbone.0.body.layer"):
            assert lr == pytest.approx(LR_BACKBONE * 0.5 ** (4 - int(name[len("backbone.0.body.layer")]))), name
        elif name.startswith("backbone.0.body."):  # the stem
            assert lr == pytest.approx(LR_BACKBONE * 0.5 ** 4), name
        else:
            assert lr == LR, name
        assert decay == 1e-4  # --no_decay_norm_bias not given: weight decay everywhere
    names = [group["name"] for group in optimizer.param_groups]
    assert names == ["rest", *(f"backbone.layer{i}" for i in range(5))]


def test_no_decay_spares_norms_biases_and_embeddings_and_the_rest_keeps_the_weight_decay():
    model, optimizer, _ = built(["--model", "deformable_detr", "--num_feature_levels", "3", "--msda_backend",
                                 "pytorch", "--no_decay_norm_bias"])
    lrs = lr_of(optimizer, model)
    for name, parameter in model.named_parameters():
        spared = parameter.ndim == 1 or any(key in name for key in ("query_embed", "level_embed"))
        assert lrs[name][1] == (0.0 if spared else 1e-4), name
    assert lrs["query_embed.weight"][1] == lrs["transformer.level_embed"][1] == 0.0
    first = optimizer.param_groups[0]
    assert (first["name"], first["lr"], first["weight_decay"]) == ("rest", LR, 1e-4)
    linear_proj = [g for g in optimizer.param_groups if g["name"].startswith("linear_proj")]
    assert linear_proj and all(g["lr"] == pytest.approx(LR * 0.1) for g in linear_proj)


def test_the_defaults_keep_the_official_groups_and_step_schedule():
    model, optimizer, args = built([])
    assert [set(group) for group in optimizer.param_groups] == [set(optimizer.defaults) | {"params"}] * 2
    assert [g["lr"] for g in optimizer.param_groups] == [LR, LR_BACKBONE]
    assert isinstance(build_lr_scheduler(optimizer, args), torch.optim.lr_scheduler.StepLR)


# ---------------------------------------------------------------------------------------------
# schedules


def schedule_args(**values) -> argparse.Namespace:
    defaults = dict(lr=1.0, epochs=4, lr_drop=2, lr_scheduler="cosine", min_lr=0.0, warmup_epochs=0.0,
                    warmup_iters=0, warmup_factor=0.0)
    return argparse.Namespace(**{**defaults, **values})


def test_warmup_then_cosine_follow_the_formula():
    args = schedule_args(warmup_iters=10, min_lr=0.1)
    total = 110
    for step in (0, 3, 9):
        assert lr_factor(args, step, total) == pytest.approx(step / 10)
    for step in (10, 35, 60, 109):
        cosine = 0.5 * (1 + math.cos(math.pi * (step - 10) / 100))
        assert lr_factor(args, step, total) == pytest.approx(0.1 + 0.9 * cosine)
    assert lr_factor(args, 60, total) == pytest.approx(0.55)


def test_warmup_epochs_count_optimizer_steps_and_start_from_the_factor():
    args = schedule_args(warmup_epochs=0.5, warmup_factor=0.2, lr_scheduler="step")  # 10 steps an epoch: 5
    assert [lr_factor(args, step, 40) for step in (0, 1, 4, 5)] == pytest.approx([0.2, 0.36, 0.84, 1.0])
    assert [lr_factor(args, step, 40) for step in (19, 20, 39)] == pytest.approx([1.0, 0.1, 0.1])  # --lr_drop 2


def test_per_step_schedule_sets_every_group_from_its_initial_lr():
    optimizer = torch.optim.AdamW([{"params": [nn.Parameter(torch.ones(1))]},
                                   {"params": [nn.Parameter(torch.ones(1))], "lr": 0.5}], lr=1.0)
    scheduler = build_lr_scheduler(optimizer, schedule_args(warmup_iters=4, lr_drop=2))
    assert isinstance(scheduler, PerStepLR)
    scheduler.at(2, 8)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5, 0.25])
    state = scheduler.state_dict()
    assert "factor" not in state and state["last_epoch"] == 2 and state["total_steps"] == 8


# ---------------------------------------------------------------------------------------------
# EMA


def test_ema_update_follows_the_formula_for_parameters_and_buffers():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.75)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    model.train()
    model(torch.randn(4, 3))  # batch-norm statistics move
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    for key, value in model.state_dict().items():
        expected = 0.75 * before[key] + 0.25 * value if value.is_floating_point() else value
        torch.testing.assert_close(ema.state_dict()[key], expected, rtol=1e-6, atol=1e-7)
    assert ema.state_dict()["1.num_batches_tracked"] == 1
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


# ---------------------------------------------------------------------------------------------
# real runs

# 2 epochs x 3 steps: warmup over 2 steps, then a cosine; the EMA with a decay that moves it visibly.
RECIPE = [*SHORT, "--epochs", "2", "--keep_last", "0", "--lr_scheduler", "cosine", "--warmup_iters", "2",
          "--min_lr", "1e-6", "--layer_decay", "0.5", "--no_decay_norm_bias", "--model_ema", "--model_ema_decay", "0.5"]


def record_lrs(monkeypatch) -> list[list[float]]:
    """The learning rates of every group at each optimizer step of the run."""
    seen: list[list[float]] = []
    optimizer_step = train_module._optimizer_step

    def recording(model, optimizer, *args, **kwargs):
        seen.append([group["lr"] for group in optimizer.param_groups])
        return optimizer_step(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(train_module, "_optimizer_step", recording)
    return seen


def test_recipe_run_follows_its_schedule_and_resumes_exactly_with_its_ema(tmp_path, monkeypatch):
    seen = record_lrs(monkeypatch)
    main([*RECIPE, "--output_dir", str(tmp_path / "straight")])
    straight_lrs = list(seen)
    args = parse_args(RECIPE)
    assert [lrs[0] for lrs in straight_lrs] == pytest.approx([args.lr * lr_factor(args, s, 6) for s in range(6)])
    assert straight_lrs[0][0] == 0.0 and straight_lrs[-1][0] > args.min_lr

    seen.clear()
    with monkeypatch.context() as patch:
        signal_after_steps(patch, 4)  # mid-way through the second epoch
        main([*RECIPE, "--output_dir", str(tmp_path / "stopped")])
    checkpoint = tmp_path / "stopped" / "checkpoint.pth"
    assert "model_ema" in load(checkpoint)
    main([*RECIPE, "--output_dir", str(tmp_path / "stopped"), "--resume", str(checkpoint)])
    assert seen == straight_lrs

    straight, resumed = load(tmp_path / "straight" / "checkpoint.pth"), load(checkpoint)
    assert_same_training_state(straight, resumed)
    assert straight["model_ema"].keys() == straight["model"].keys()
    for key, value in straight["model_ema"].items():
        assert torch.equal(value, resumed["model_ema"][key]), key
    assert any(not torch.equal(v, straight["model"][k]) for k, v in straight["model_ema"].items()
               if v.is_floating_point())

    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert "val_AP" in log[-1] and "val_ema_AP" in log[-1] and "val_ema_loss" in log[-1]
    assert (tmp_path / "straight" / "results_val_ema_0001.json").is_file()

    evaluated = run(parse_args([*TINY, "--limit_val_batches", "1", "--eval", "--eval_ema", "--resume",
                                str(tmp_path / "straight" / "checkpoint.pth")]))
    assert evaluated["AP"] == pytest.approx(log[-1]["val_ema_AP"]) and evaluated["loss"] == pytest.approx(
        log[-1]["val_ema_loss"])


def test_recipe_flags_are_checked(capsys):
    for flags, message in [(["--warmup_epochs", "1", "--warmup_iters", "5"], "--warmup_epochs 1.0 and --warmup_iters 5"),
                           (["--min_lr", "1e-6"], "--min_lr 1e-06 is where --lr_scheduler cosine ends"),
                           (["--layer_decay", "1.5"], "--layer_decay must be in (0, 1]"),
                           (["--model_ema_decay", "1"], "--model_ema_decay must be in (0, 1)"),
                           (["--eval_ema"], "--eval_ema evaluates a checkpoint's EMA weights")]:
        with pytest.raises(SystemExit):
            parse_args(flags)
        assert message in capsys.readouterr().err
