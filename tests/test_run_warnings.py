"""A run says what it will silently not do as asked: flags without effect, images with more
objects than queries, evaluation categories that differ from the checkpoint's, class counts that
pre-training does not use."""
from __future__ import annotations

import logging
from pathlib import Path

from detr_ssl.config import parse_args
from detr_ssl.data import build_dataset, category_names_of
from detr_ssl.engine.runner import warn_about_ignored_settings

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
LOGGER = logging.getLogger("test_run_warnings")


def warnings_for(flags: list[str], caplog, checkpoint: dict | None = None) -> str:
    args = parse_args(["--data_path", str(SAMPLE), "--backbone_weights", "none", *flags])
    dataset = build_dataset("train", args)
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        warn_about_ignored_settings(args, dataset, category_names_of(dataset), checkpoint, LOGGER)
    return caplog.text


def test_a_plain_run_warns_of_nothing(caplog):
    assert warnings_for([], caplog) == ""


def test_flags_without_effect_are_named(caplog, tmp_path):
    tokenizer = tmp_path / "tokenizer.pt"
    tokenizer.write_bytes(b"")
    text = warnings_for(["--tokenizer", str(tokenizer), "--ssl_task", "jigsaw_continuous", "--amp_dtype", "float16"],
                        caplog)
    assert "--tokenizer is read only by --ssl_task mim_discrete: ignored with --ssl_task jigsaw_continuous" in text
    assert "--amp_dtype float16 has no effect without --amp" in text


def test_vit_flags_on_a_resnet_are_named(caplog):
    text = warnings_for(["--drop_path", "0.2", "--vit_rel_pos"], caplog)
    assert "--drop_path, --vit_rel_pos apply to ViT backbones only: ignored with --backbone resnet50" in text


def test_images_with_more_objects_than_queries_are_counted_once(caplog):
    dataset = build_dataset("train", parse_args(["--data_path", str(SAMPLE)]))
    counts = sorted(len(anns) for anns in dataset.coco.imgToAnns.values())
    queries = counts[-2]  # only the most crowded image has more objects than this
    text = warnings_for(["--num_queries", str(queries)], caplog)
    assert text.count("more objects than --num_queries") == 1
    assert f"1 training image(s) have more objects than --num_queries {queries} (up to {counts[-1]})" in text


def test_evaluation_categories_that_differ_from_the_checkpoints_are_listed(caplog):
    dataset = build_dataset("train", parse_args(["--data_path", str(SAMPLE)]))
    saved = {**category_names_of(dataset)}
    first = min(saved)
    saved[first] = "not-" + saved[first]
    text = warnings_for(["--eval"], caplog, checkpoint={"categories": saved})
    assert f"{first}: not-{saved[first][4:]} / {saved[first][4:]}" in text
