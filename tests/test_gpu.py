"""What only a GPU can show, skipped without CUDA: the detectors (ResNet and ViT backbones) give
the CPU's outputs on CUDA, mixed-precision training runs there (float16 with a GradScaler, bfloat16
without; MAE pre-training too), and the training benchmark reports GPU figures. The deformable-attention kernel's own CUDA checks are in
tests/test_ms_deform_attn.py."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import load_script
from detr_ssl.__main__ import main
from detr_ssl.config import parse_args
from detr_ssl.models import build_model

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "64", "--nheads", "4",
        "--enc_layers", "2", "--dec_layers", "2", "--dim_feedforward", "128", "--num_queries", "10"]
MODELS = {"detr": [], "deformable_detr": ["--model", "deformable_detr", "--num_feature_levels", "3"],
          "deformable_two_stage": ["--model", "deformable_detr", "--num_feature_levels", "3", "--with_box_refine",
                                   "--two_stage"]}
# a ViT (timm) with windowed attention and per-image position tables on the padded batch of real photos
VIT = ["--backbone", "vit_tiny_patch16", "--pyramid_channels", "64", "--vit_window_size", "4"]
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="ViT backbones need timm")
OUTPUT_CASES = [*(pytest.param(flags, id=name) for name, flags in MODELS.items()),
                pytest.param(VIT, id="vit_detr", marks=needs_timm),
                pytest.param([*VIT, *MODELS["deformable_detr"]], id="vit_deformable_detr", marks=needs_timm)]


@pytest.fixture
def exact_float32():
    """Full float32 convolutions and matrix products (no TF32), so that CUDA and CPU can agree closely."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("flags", OUTPUT_CASES)
def test_cuda_outputs_equal_the_cpu_outputs(coco_batch, flags, exact_float32):
    samples, _ = coco_batch
    torch.manual_seed(0)
    model, _, _ = build_model(parse_args([*TINY, *flags, "--num_classes", "91", "--device", "cpu",
                                          "--msda_backend", "auto"]))
    model.eval()
    with torch.no_grad():
        on_cpu = model(samples)
        on_cuda = model.cuda()(samples.to("cuda"))
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(on_cuda[key].cpu(), on_cpu[key], rtol=1e-4, atol=1e-4, msg=key)


@pytest.mark.parametrize("amp_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("flags", [MODELS["detr"], MODELS["deformable_detr"] + ["--ssl_task", "mim_continuous"]],
                         ids=["detr", "deformable_detr_mim"])
def test_mixed_precision_training_on_cuda(tmp_path, flags, amp_dtype):
    main([*TINY, *flags, "--device", "cuda", "--amp", "--amp_dtype", amp_dtype, "--data_path", str(SAMPLE),
          "--output_dir", str(tmp_path), "--num_workers", "0", "--min_size", "256", "--max_size", "320",
          "--batch_size", "2", "--epochs", "1", "--limit_train_batches", "2", "--limit_val_batches", "1",
          "--no-tensorboard"])
    log = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(log["train_loss"]) and "val_AP" in log
    scaler = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["scaler"]
    assert bool(scaler) == (amp_dtype == "float16")  # a GradScaler only for float16
    if scaler:
        assert scaler["scale"] > 0


@pytest.mark.parametrize("amp", [[], ["--amp"]], ids=["fp32", "amp"])
def test_benchmark_train_reports_gpu_figures(capsys, amp):
    load_script("benchmark_train").main(["--device", "cuda", "--size", "256", "--iters", "2", "--warmup", "1",
                                         *TINY, *amp])
    result = json.loads(capsys.readouterr().out)
    assert result["device"] == "cuda" and result["machine"]["gpu"]
    assert result["peak_memory_mb"] > 0 and result["imgs_per_s"] > 0
    assert (result["precision"] == "float32") == (not amp)


def test_deterministic_deformable_training_on_cuda_is_refused_before_any_work(tmp_path):
    from detr_ssl.engine.runner import run

    with pytest.raises(ValueError, match="--deterministic on CUDA: the backward of Deformable DETR's attention"):
        run(parse_args([*TINY, *MODELS["deformable_detr"], "--device", "cuda", "--deterministic", "--data_path",
                        str(SAMPLE), "--output_dir", str(tmp_path), "--epochs", "1", "--limit_train_batches", "1"]))
    assert not (tmp_path / "checkpoint.pth").exists()



@pytest.mark.parametrize("amp_dtype", [None, "bfloat16", "float16"])
def test_mae_pretraining_on_cuda(tmp_path, amp_dtype, exact_float32):
    """MAE trains on CUDA (under AMP too), and the validation loss of a checkpoint (fixed masks)
    on CUDA equals the CPU's: in float32 within 1e-4, under AMP within 5 %."""
    pytest.importorskip("timm")
    from detr_ssl.engine.runner import run

    common = ["--ssl_task", "mae", "--ssl_mode", "pretrain", "--dataset_file", "folder", "--data_path",
              str(SAMPLE / "unlabelled"), "--val_path", str(SAMPLE / "unlabelled"), "--backbone", "vit_tiny_patch16",
              "--mae_input_size", "64", "--mae_decoder_dim", "64", "--mae_decoder_depth", "2", "--mae_decoder_heads", "4",
              "--hidden_dim", "64", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward", "64",
              "--num_workers", "0", "--batch_size", "4", "--no-tensorboard"]
    amp = ["--amp", "--amp_dtype", amp_dtype] if amp_dtype else []
    main([*common, *amp, "--device", "cuda", "--epochs", "2", "--output_dir", str(tmp_path / "train")])
    log = [json.loads(line) for line in (tmp_path / "train" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(entry["train_loss"]) and math.isfinite(entry["val_loss_mae"]) for entry in log)
    checkpoint = ["--eval", "--resume", str(tmp_path / "train" / "checkpoint.pth")]
    cpu = run(parse_args([*common, *checkpoint, "--device", "cpu", "--output_dir", str(tmp_path / "cpu")]))
    cuda = run(parse_args([*common, *checkpoint, *amp, "--device", "cuda", "--output_dir", str(tmp_path / "cuda")]))
    assert cuda["loss_mae"] == pytest.approx(cpu["loss_mae"], rel=1e-4 if amp_dtype is None else 5e-2)
