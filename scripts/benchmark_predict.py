"""Time predict's detection on real images: a checkpoint's PyTorch model against its ONNX graph on
onnxruntime, and print JSON.

    python scripts/benchmark_predict.py                             # DETR-R50 and Deformable DETR-R50, 4 images
    python scripts/benchmark_predict.py --models detr --images 2
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python scripts/benchmark_predict.py   # PyTorch's AVX2 kernels

Each model is built at its defaults (ResNet-50, --min_size 800 / --max_size 1333, 100 or 300
queries) with random weights (no download; the time does not depend on the weight values), saved
as a checkpoint, loaded as scripts/predict.py loads it, and exported as scripts/export_onnx.py
does: DETR with --dynamic (batch and image size dynamic, so both back ends see the same tensors),
Deformable DETR with a dynamic batch and its fixed image size the smallest that holds every
prepared image of the run (export_onnx.py's default would be --max_size square, more padding).
The images of --images_dir (data/sample/val: 4 COCO photos of about 640x480, each one window)
then go through ``SlidingWindowPredictor`` with ``TorchDetect`` and with ``OnnxDetect`` in turn
(PyTorch, ONNX, PyTorch, ONNX, ...), after one untimed warm-up image each. The AVX2 environment
variables above change PyTorch's kernels only: onnxruntime's MLAS picks its kernels by cpuid.
Absolute figures move with the machine's load; compare the two back ends within one run.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import export_onnx  # noqa: E402
from detr_ssl.config import MODEL_DEFAULTS, build_parser  # noqa: E402
from detr_ssl.engine.onnx_runtime import OnnxDetect, import_onnxruntime  # noqa: E402
from detr_ssl.engine.predict import SlidingWindowPredictor, TorchDetect, load_detector  # noqa: E402
from detr_ssl.models import build_model  # noqa: E402
from detr_ssl.ops.ms_deform_attn import available_backends, set_default_backend  # noqa: E402
from detr_ssl.utils.image import image_files  # noqa: E402
from detr_ssl.utils.machine import machine_info  # noqa: E402

LOGGER = logging.getLogger("benchmark_predict")


def random_checkpoint(model: str, path: Path) -> Path:
    """A randomly initialised ResNet-50 ``model`` at its defaults, saved as a detection run saves it."""
    args = build_parser().parse_args(["--model", model, "--backbone_weights", "none", "--device", "cpu",
                                      "--num_classes", "91"])
    for key, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.manual_seed(0)
    torch.save({"model": build_model(args)[0].state_dict(), "args": vars(args)}, path)
    return path


def export_graph(checkpoint: Path, pictures: list[Image.Image], path: Path) -> tuple[SlidingWindowPredictor, ...]:
    """(PyTorch predictor, ONNX predictor) of ``checkpoint``, its graph written to ``path`` as the
    module docstring says."""
    model, postprocess, config, _ = load_detector(checkpoint, "cpu", LOGGER)
    torch_predictor = SlidingWindowPredictor(TorchDetect(model, postprocess), config.min_size, config.max_size,
                                             window=0)
    inputs = [torch_predictor.prepare(picture) for picture in pictures]
    size = (max(t.shape[1] for t in inputs), max(t.shape[2] for t in inputs))
    image_size = config.model == "detr"
    example = export_onnx.padded_batch(pictures[:2], torch_predictor, None if image_size else size)
    set_default_backend("pytorch")  # traced through grid_sample, as export_onnx.py does
    export_onnx.write_graph(export_onnx.ExportedDetector(model, postprocess, raw=False).eval(), example, path, 17,
                            export_onnx.dynamic_axes(False, image_size),
                            export_onnx.graph_info(config, {}, False, None, None if image_size else size))
    set_default_backend(config.msda_backend)  # back to what predict.py runs with
    return torch_predictor, SlidingWindowPredictor(OnnxDetect(path), config.min_size, config.max_size, window=0)


def time_both(predictors: tuple[SlidingWindowPredictor, ...], pictures: list[Image.Image]) -> dict:
    """Seconds of each back end over ``pictures``, alternating, and the largest score difference."""
    for predictor in predictors:  # warm-up: first-call allocations, onnxruntime's arena
        predictor(pictures[0])
    seconds, worst = [0.0, 0.0], 0.0
    for picture in pictures:
        found = []
        for index, predictor in enumerate(predictors):
            start = time.perf_counter()
            found.append(predictor(picture))
            seconds[index] += time.perf_counter() - start
        if len(found[0]["scores"]) == len(found[1]["scores"]):
            worst = max(worst, float((found[0]["scores"] - found[1]["scores"]).abs().max()))
        else:
            worst = float("inf")
    torch_ips, onnx_ips = len(pictures) / seconds[0], len(pictures) / seconds[1]
    return {"torch_images_per_s": round(torch_ips, 3), "onnx_images_per_s": round(onnx_ips, 3),
            "onnx_over_torch": round(onnx_ips / torch_ips, 2), "max_score_diff": worst}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["detr", "deformable_detr"],
                        choices=("detr", "deformable_detr"))
    parser.add_argument("--images", type=int, default=4, help="timed images (cycled from --images_dir)")
    parser.add_argument("--images_dir", type=Path, default=REPO / "data" / "sample" / "val")
    opts = parser.parse_args(argv)
    onnxruntime = import_onnxruntime()
    files = image_files(opts.images_dir)
    pictures = [Image.open(files[i % len(files)]).convert("RGB") for i in range(opts.images)]
    report = {}
    with tempfile.TemporaryDirectory() as folder:
        for model in opts.models:
            checkpoint = random_checkpoint(model, Path(folder) / f"{model}.pth")
            started = time.perf_counter()
            predictors = export_graph(checkpoint, pictures, Path(folder) / f"{model}.onnx")
            graph = predictors[1].detect_batch.info
            report[model] = {"graph_size": graph.size or "dynamic", "export_s": round(time.perf_counter() - started, 1),
                             **time_both(predictors, pictures)}
            if model == "deformable_detr":
                report[model]["torch_msda_backend"] = available_backends()[0]
    print(json.dumps({
        "benchmark": "predict_torch_vs_onnxruntime", "images": opts.images, "window": "whole image",
        "command": " ".join(["python", "scripts/benchmark_predict.py", *(argv if argv is not None else sys.argv[1:])]),
        "models": report,
        "machine": {**machine_info(gpu=False), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
    }, indent=1))


if __name__ == "__main__":
    main()
