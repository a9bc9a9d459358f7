"""scripts/export_onnx.py: tiny DETR and Deformable DETR exported to ONNX give PyTorch's outputs
on the sample images under onnxruntime, or no file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_script
from test_api import DEFORMABLE, tiny_checkpoint

onnx = pytest.importorskip("onnx", reason="ONNX export needs the export extra: pip install -e '.[export]'")
onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX export needs the export extra: pip install -e '.[export]'")
export_onnx = load_script("export_onnx")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    return {"detr": tiny_checkpoint(root / "detr.pth", []),
            "deformable_detr": tiny_checkpoint(root / "deformable.pth", DEFORMABLE)}


def export(capsys, checkpoint: Path, out: Path, *flags: str) -> tuple[int, dict]:
    status = export_onnx.main(["--resume", str(checkpoint), "--out", str(out), *flags])
    return status, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("model", ["detr", "deformable_detr"])
@pytest.mark.parametrize("raw", [False, True])
def test_onnxruntime_gives_the_pytorch_outputs(checkpoints, model, raw, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    status, summary = export(capsys, checkpoints[model], out, *(["--raw"] if raw else []))
    assert status == 0 and out.is_file() and not summary["refused"]
    assert summary["model"] == model and summary["max_diff"] <= 1e-4
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == (["images", "mask"] if raw else ["images", "mask", "sizes"])
    assert [o.name for o in session.get_outputs()] == (["logits", "boxes"] if raw else ["boxes", "scores", "labels"])


@pytest.mark.parametrize(("model", "flags", "shapes"), [
    ("detr", [], [[2, 3, 128, 128], [2, 3, 128, 97]]),               # another image size, same batch
    ("detr", ["--raw"], [[2, 3, 128, 128], [3, 3, 128, 97]]),         # another size and batch
    ("deformable_detr", ["--raw"], [[2, 3, 128, 128], [3, 3, 128, 128]]),  # another batch only
])
def test_dynamic_exports_run_at_other_shapes(checkpoints, model, flags, shapes, tmp_path, capsys):
    status, summary = export(capsys, checkpoints[model], tmp_path / "model.onnx", "--dynamic", *flags)
    assert status == 0 and [check["shape"] for check in summary["checks"]] == shapes
    assert all(check["max_diff"] <= 1e-4 for check in summary["checks"])


def test_deformable_detections_have_no_dynamic_axis(checkpoints, tmp_path, capsys):
    assert export_onnx.main(["--resume", str(checkpoints["deformable_detr"]), "--out", str(tmp_path / "m.onnx"),
                             "--dynamic"]) == 1
    assert "--dynamic: Deformable DETR with post-processing has no dynamic axis" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_difference_above_the_tolerance_writes_no_file(checkpoints, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    status, summary = export(capsys, checkpoints["deformable_detr"], out, "--tolerance", "0")
    assert status == 1 and summary["refused"] and summary["max_diff"] > 0
    assert not list(tmp_path.iterdir())  # neither the file nor its partial export


def test_missing_packages_name_the_extra(monkeypatch, checkpoints, tmp_path, capsys):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    assert export_onnx.main(["--resume", str(checkpoints["detr"]), "--out", str(tmp_path / "m.onnx")]) == 1
    assert "pip install -e '.[export]'" in capsys.readouterr().err
