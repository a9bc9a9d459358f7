"""The benchmark scripts run and print the JSON docs/benchmarks.md quotes (tiny sizes: no timing is
asserted, only that each figure is there and consistent)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_script

benchmark_train = load_script("benchmark_train")
benchmark_matcher = load_script("benchmark_matcher")
benchmark_eval = load_script("benchmark_eval")

TINY_TRAIN = ["--size", "128", "--iters", "2", "--warmup", "1", "--backbone", "resnet18", "--hidden_dim", "64",
              "--nheads", "4", "--dim_feedforward", "128", "--enc_layers", "1", "--dec_layers", "1"]


def printed_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def is_ratio_of(ratio: float, numerator: float, denominator: float) -> bool:
    """``ratio`` (rounded to 1e-3 from unrounded times) against the times the JSON prints rounded to
    1e-4 s: on a tiny model a step takes milliseconds, so that rounding moves their quotient by up to
    ratio * (0.5e-4 / numerator + 0.5e-4 / denominator)."""
    quotient = numerator / denominator
    return abs(ratio - quotient) <= 5e-4 + quotient * (0.5e-4 / numerator + 0.5e-4 / denominator) + 1e-9


@pytest.mark.parametrize("flags", [[], ["--model", "deformable_detr", "--msda_backend", "pytorch",
                                        "--num_feature_levels", "3"]], ids=["detr", "deformable_detr"])
def test_benchmark_train_times_a_step(capsys, flags):
    benchmark_train.main([*TINY_TRAIN, *flags])
    result = printed_json(capsys)
    assert result["s_per_it"] > 0 and result["s_per_it_min"] <= result["s_per_it"]
    assert result["ssl_task"] == "none" and "overhead" not in result
    assert result["machine"]["threads"] >= 1
    assert result["machine"]["capability"] == torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize("flags", [["--ssl_task", "mim_continuous"],
                                   ["--ssl_task", "jigsaw_continuous", "--no-ssl_backbone_grad"],
                                   ["--query_patches", "--num_patches", "10"],
                                   ["--ssl_method", "detreg"], ["--ssl_method", "box_contrast"]])
def test_benchmark_train_overhead_compares_with_the_plain_step(capsys, flags):
    benchmark_train.main([*TINY_TRAIN, "--overhead", *flags])
    result = printed_json(capsys)
    assert is_ratio_of(result["overhead"], result["s_per_it"], result["plain_s_per_it"])
    assert result["ssl_backbone_grad"] == ("--no-ssl_backbone_grad" not in flags)
    assert result["ssl_method"] == ("updetr" if "--query_patches" in flags else flags[1] if "--ssl_method" in flags
                                    else "none")


@pytest.mark.parametrize("lever", ["dropout_kernel", "fused_adamw"])
def test_benchmark_train_times_the_step_without_a_lever_and_switches_it_back_on(capsys, lever):
    seeded, optim = sys.modules["detr_ssl.ops.seeded_dropout"], sys.modules["detr_ssl.engine.optim"]
    benchmark_train.main([*TINY_TRAIN, "--without", lever])
    result = printed_json(capsys)
    assert result["without"] == lever and seeded._use_kernel and optim._fused_on_cpu
    assert is_ratio_of(result["lever_ratio"], result["s_per_it"], result["without_s_per_it"])


@pytest.mark.parametrize("flags", [[], ["--model", "deformable_detr", "--msda_backend", "pytorch",
                                        "--num_feature_levels", "3"]], ids=["detr", "deformable_detr"])
def test_benchmark_train_times_the_hugging_face_peer_of_the_same_size(capsys, flags):
    pytest.importorskip("transformers", reason="--peer hf needs transformers: pip install -e '.[hf]'")
    benchmark_train.main([*TINY_TRAIN, "--peer", "hf", *flags, "--dec_layers", "2"])  # transformers 5 ties 2+
    result = printed_json(capsys)
    assert is_ratio_of(result["ours_over_peer"], result["s_per_it"], result["peer_s_per_it"])
    assert result["peer_parameters"] == result["parameters"]  # the same architecture, timed alike


OFFICIAL_REPOS = {"detr": "DETR_SSL_OFFICIAL_DETR", "deformable_detr": "DETR_SSL_OFFICIAL_DEFORMABLE_DETR"}


@pytest.mark.parametrize("model", sorted(OFFICIAL_REPOS))
def test_benchmark_train_times_the_official_model_of_the_same_size(model):
    repo = os.environ.get(OFFICIAL_REPOS[model])
    if not repo:
        pytest.skip(f"set {OFFICIAL_REPOS[model]}=PATH to an official checkout to time it")
    flags = ["--model", model, *(["--msda_backend", "pytorch", "--backbone", "resnet50"] if model != "detr" else [])]
    # its own process: official repos all name their packages `models` and `util`, one per process
    script = Path(benchmark_train.__file__)
    done = subprocess.run([sys.executable, str(script), *TINY_TRAIN, "--peer", "official", "--official_repo", repo,
                           *flags, "--dec_layers", "2"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["peer"] == "official" and result["peer_parameters"] == result["parameters"]
    assert is_ratio_of(result["ours_over_peer"], result["s_per_it"], result["peer_s_per_it"])


def test_benchmark_matcher_checks_both_implementations_agree(capsys):
    benchmark_matcher.main(["--iters", "2", "--warmup", "1", "--batch_size", "2"])
    report = printed_json(capsys)
    results = report["results"]
    assert report["machine"]["capability"] == torch.backends.cpu.get_cpu_capability()  # every figure names it
    assert [r["queries"] for r in results] == [100, 300]
    assert all(r["same_matches"] and r["ours_ms"] > 0 for r in results)


def test_benchmark_eval_reports_identical_stats(capsys):
    benchmark_eval.main(["--images", "3", "--boxes", "10", "--dets", "20", "--repeats", "1"])
    report = printed_json(capsys)
    backends = report["backends"]
    assert report["machine"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert backends["pycocotools"]["speedup_vs_pycocotools"] == 1.0
    for stats in backends.values():
        assert stats["max_abs_diff_precision"] < 1e-12 and stats["max_abs_diff_recall"] < 1e-12


def test_machine_info_names_the_isa_variables_that_were_set(monkeypatch):
    from detr_ssl.utils.machine import machine_info

    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")  # MKL's GEMMs ignore the other two
    info = machine_info(gpu=False)
    assert info["MKL_ENABLE_INSTRUCTIONS"] == "AVX2" and "ONEDNN_MAX_CPU_ISA" not in info
    assert info["capability"] == torch.backends.cpu.get_cpu_capability() and info["gpu"] is None
