"""Encoder pretext tasks on real photos: corruption, losses, gradients, learning, pictures."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import chisquare
from torchvision.transforms.v2 import functional as TF

from detr_ssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from detr_ssl.ssl import SCHEDULES, TASKS, build_pretext_task, schedule_value
from detr_ssl.ssl.jigsaw import derangements, jigsaw_counts, permute_patches
from detr_ssl.ssl.patches import patchify, token_masks, unpatchify
from detr_ssl.ssl.tokenizer import KMeansTokenizer

SAMPLE_TRAIN = Path(__file__).resolve().parent.parent / "data" / "sample" / "train"
PATCH = 32
HIDDEN = 64
# (height, width) of the three photos: the first two leave padding with partial tokens at the
# bottom/right of the 224 x 288 batch, the third fills it.
SIZES = [(200, 270), (170, 230), (224, 288)]
CONTINUOUS = ["reconstruction", "mim_continuous", "jigsaw_continuous"]


def load_batch(sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Real photos resized to ``sizes``, ImageNet-normalised, padded bottom/right into one batch
    whose sides are multiples of PATCH, and the real-pixel mask."""
    paths = sorted(SAMPLE_TRAIN.glob("*.jpg"))[: len(sizes)]
    assert len(paths) == len(sizes), f"sample photos missing under {SAMPLE_TRAIN}"
    height = math.ceil(max(h for h, _ in sizes) / PATCH) * PATCH
    width = math.ceil(max(w for _, w in sizes) / PATCH) * PATCH
    images = torch.zeros(len(sizes), 3, height, width)
    valid = torch.zeros(len(sizes), height, width, dtype=torch.bool)
    for i, (path, (h, w)) in enumerate(zip(paths, sizes)):
        image = TF.to_dtype(TF.pil_to_tensor(Image.open(path).convert("RGB")), torch.float32, scale=True)
        image = TF.normalize(TF.resize(image, [h, w], antialias=True), list(IMAGENET_MEAN), list(IMAGENET_STD))
        images[i, :, :h, :w] = image
        valid[i, :h, :w] = True
    return images, valid


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return load_batch(SIZES)


@pytest.fixture(scope="module")
def tokenizer_file(batch, tmp_path_factory) -> Path:
    """A small k-means codebook fitted on the batch's full patches."""
    images, valid = batch
    _, full = token_masks(valid, PATCH)
    tokenizer, _ = KMeansTokenizer.fit(patchify(images, PATCH)[full], 8, PATCH, iters=5)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.pt"
    tokenizer.save(path)
    return path


def make_task(name: str, tokenizer_file: Path, ratio: float = 0.5):
    torch.manual_seed(0)
    return build_pretext_task(name, HIDDEN, PATCH, ratio, tokenizer_path=str(tokenizer_file))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def full_counts(valid: torch.Tensor) -> list[int]:
    return token_masks(valid, PATCH)[1].flatten(1).sum(1).tolist()


def pixels_of(tokens: torch.Tensor) -> torch.Tensor:
    """(B, h, w) token mask -> (B, 3, H, W) mask of their pixels, independently of the package."""
    return tokens.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)[:, None].expand(-1, 3, -1, -1)


def stand_in_encoder(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(memory, pos): a fixed random projection of each clean patch, and random position embeddings."""
    generator = seeded(1)
    patches = patchify(images, PATCH)
    projection = torch.randn(patches.shape[-1], HIDDEN, generator=generator) / math.sqrt(patches.shape[-1])
    memory = patches @ projection
    pos = torch.randn(*memory.shape, generator=generator)
    return memory / memory.std(), pos


def perfect_prediction(task, targets) -> torch.Tensor:
    """The prediction that deserves a zero loss, built from the targets."""
    if task.name == "mim_discrete":
        return F.one_hot(targets.target, task.tokenizer.codebook_size).float() * 1e4
    if task.name == "jigsaw_discrete":
        logits = F.one_hot(targets.target, targets.target[0].numel()).float() * 1e4
        return logits.masked_fill(~targets.token_valid.flatten(1)[:, None, None, :], float("-inf"))
    return targets.target.clone()


def test_patchify_layout_and_round_trip(batch):
    images, _ = batch
    patches = patchify(images, PATCH)
    assert patches.shape == (3, 7, 9, PATCH * PATCH * 3)
    assert torch.equal(patches[1, 2, 3], images[1, :, 64:96, 96:128].permute(1, 2, 0).flatten())
    assert torch.equal(unpatchify(patches, PATCH), images)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patchify(images[..., :200], PATCH)


def test_token_masks(batch):
    _, valid = batch
    token_valid, token_full = token_masks(valid, PATCH)
    for i, (h, w) in enumerate(SIZES):
        assert token_valid[i].sum() == math.ceil(h / PATCH) * math.ceil(w / PATCH)
        assert token_full[i].sum() == (h // PATCH) * (w // PATCH)
    assert not token_full[0, 6].any() and token_valid[0, 6, 0]  # rows 192..223 of a 200-row image


@pytest.mark.parametrize("name", ["mim_continuous", "mim_discrete"])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 1.0])
def test_masking(name, ratio, batch, tokenizer_file):
    images, valid = batch
    task = make_task(name, tokenizer_file, ratio)
    corrupted, targets = task.corrupt(images, valid, seeded())
    masked = targets.loss_mask
    token_valid, token_full = token_masks(valid, PATCH)
    assert masked.flatten(1).sum(1).tolist() == [round(ratio * n) for n in full_counts(valid)]
    assert not (masked & ~token_full).any(), "only patches made entirely of real pixels are masked"
    assert torch.equal(targets.token_valid, token_valid)
    pixels = pixels_of(masked)
    assert (corrupted[pixels] == 0).all(), "masked patches hold the dataset mean colour, 0 after normalisation"
    assert torch.equal(corrupted[~pixels], images[~pixels]), "nothing else changes"
    if name == "mim_continuous":
        assert torch.equal(targets.target, patchify(images, PATCH))
    else:
        assert targets.target.shape == masked.shape and targets.target.dtype == torch.int64
        ids = task.tokenizer.encode(patchify(images, PATCH).flatten(0, 2))
        assert torch.equal(targets.target, ids.view(masked.shape))


def test_selection_is_per_image_and_seeded(tokenizer_file):
    images, valid = load_batch([(224, 288), (224, 288)])
    images[1] = images[0]
    task = make_task("mim_continuous", tokenizer_file)
    masks = [task.corrupt(images, valid, seeded(seed))[1].loss_mask for seed in (0, 0, 1)]
    assert not torch.equal(masks[0][0], masks[0][1]), "two copies of one image get different masks"
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def test_ratio_is_mutable(batch, tokenizer_file):
    images, valid = batch
    task = make_task("jigsaw_continuous", tokenizer_file, ratio=0.5)
    task.ratio = 0.25
    _, targets = task.corrupt(images, valid, seeded())
    assert targets.loss_mask.flatten(1).sum(1).tolist() == [round(0.25 * n) for n in full_counts(valid)]


def test_derangements_move_every_slot_of_each_row():
    counts = torch.tensor([0, 2, 3, 5, 40, 2, 0])
    for seed in range(20):
        permutation = derangements(counts, seeded(seed))
        assert permutation.shape == (7, 40) and permutation.dtype == torch.int64
        for row, n in zip(permutation, counts.tolist()):
            assert sorted(row[:n].tolist()) == list(range(n))
            assert not (row[:n] == torch.arange(n)).any(), "no element stays in place"
            assert torch.equal(row[n:], torch.arange(n, 40)), "slots past the count stay put"
    assert torch.equal(derangements(counts, seeded(3)), derangements(counts, seeded(3)))
    assert not torch.equal(derangements(counts, seeded(3)), derangements(counts, seeded(4)))
    assert derangements(torch.zeros(3, dtype=torch.int64)).shape == (3, 0)
    with pytest.raises(ValueError, match="cannot be moved"):
        derangements(torch.tensor([2, 1]))


def assert_uniform(outcomes: list[tuple], expected: int) -> None:
    """Each of ``expected`` outcomes about equally frequent (chi-square, p > 0.001 for a fixed seed)."""
    frequencies = Counter(outcomes)
    assert len(frequencies) == expected, f"{len(frequencies)} of {expected} outcomes ever drawn"
    assert chisquare(list(frequencies.values())).pvalue > 1e-3, frequencies


def test_derangements_are_uniform_over_all_derangements():
    """3 and 4 elements have 2 and 9 derangements; a cyclic shift would only ever give 2 and 6 of them."""
    counts = torch.tensor([3, 4]).repeat(4000)
    permutation = derangements(counts, seeded())
    assert_uniform([tuple(row[:3].tolist()) for row in permutation[0::2]], 2)
    assert_uniform([tuple(row.tolist()) for row in permutation[1::2]], 9)


def test_permuted_patches_are_a_uniform_subset_in_a_uniform_derangement():
    """A 3x3 token grid whose right column is padding: 6 full tokens, 4 of them move. Every
    (subset, derangement) pair of the 15 * 9 is about equally likely, drawn for a batch at once."""
    batch = 8000
    images = torch.arange(27.0).view(1, 3, 3, 3).repeat(batch, 1, 1, 1)
    valid = torch.ones(batch, 3, 3, dtype=torch.bool)
    valid[:, :, 2] = False
    corrupted, targets, source = permute_patches(images, valid, 1, 2 / 3, seeded())
    moved, source = targets.loss_mask.flatten(1), source.flatten(1)
    assert (moved.sum(1) == 4).all() and not moved[:, 2::3].any(), "padding never moves"
    assert torch.equal(source[~moved], torch.arange(9).repeat(batch, 1)[~moved])
    assert (source[moved] != torch.arange(9).repeat(batch, 1)[moved]).all()
    assert torch.equal(corrupted.flatten(2), images.flatten(2).gather(2, source[:, None].expand(-1, 3, -1)))
    assert_uniform([tuple(row.tolist()) for row in source], 135)


def test_jigsaw_counts_never_one():
    full = torch.zeros(3, 4, 4, dtype=torch.bool)
    full[0, :2, :2] = True  # 4 full tokens: 0.3 * 4 = 1.2 rounds to 1, which becomes 2
    full[1, 0, 0] = True  # a single full token: 1 becomes 0
    full[2] = True  # 16 full tokens: 0.3 * 16 = 4.8 -> 5
    assert jigsaw_counts(full, 0.3).tolist() == [2, 0, 5]
    assert jigsaw_counts(full, 1.0).tolist() == [4, 0, 16]


@pytest.mark.parametrize("name", ["jigsaw_continuous", "jigsaw_discrete"])
@pytest.mark.parametrize("ratio", [0.03, 0.5, 1.0])
def test_permutation(name, ratio, batch, tokenizer_file):
    images, valid = batch
    task = make_task(name, tokenizer_file, ratio)
    corrupted, targets = task.corrupt(images, valid, seeded())
    moved = targets.loss_mask
    _, token_full = token_masks(valid, PATCH)
    expected = [2 if round(ratio * n) == 1 else round(ratio * n) for n in full_counts(valid)]
    assert moved.flatten(1).sum(1).tolist() == expected
    assert not (moved & ~token_full).any(), "only full patches move, so padding never does"
    assert torch.equal(corrupted[~valid[:, None].expand_as(images)], images[~valid[:, None].expand_as(images)])
    for image, shuffled in zip(images, corrupted):
        assert torch.equal(image.flatten().sort().values, shuffled.flatten().sort().values), "pixels are only moved"

    original, now = patchify(images, PATCH).flatten(1, 2), patchify(corrupted, PATCH).flatten(1, 2)
    for b, image_moved in enumerate(moved.flatten(1)):
        positions = image_moved.nonzero().squeeze(1)
        # where each moved patch came from: the original patch equal to it (photo patches are distinct)
        sources = [int((original[b] == now[b, i]).all(1).nonzero()[0]) for i in positions]
        assert all(s != int(i) for s, i in zip(sources, positions)), "no patch stays in place"
        assert sorted(sources) == positions.tolist(), "patches move only among the selected ones"
        if name == "jigsaw_discrete":
            assert targets.target[b].flatten()[positions].tolist() == sources
            assert torch.equal(targets.target[b].flatten()[~image_moved], (~image_moved).nonzero().squeeze(1))
    assert torch.equal(now[~moved.flatten(1)], original[~moved.flatten(1)])
    if name == "jigsaw_continuous":
        assert torch.equal(targets.target, patchify(images, PATCH)), "the target of a position is its original patch"


@pytest.mark.parametrize("name", list(TASKS))
def test_loss_zero_when_perfect_positive_otherwise(name, batch, tokenizer_file):
    images, valid = batch
    task = make_task(name, tokenizer_file)
    _, targets = task.corrupt(images, valid, seeded())
    perfect = perfect_prediction(task, targets)
    assert task.loss(perfect, targets)["loss_ssl"].abs() < 1e-6

    ignored = perfect.clone()
    if task.name in CONTINUOUS:
        outside = ~(targets.pixel_valid & targets.loss_mask[..., None])
        ignored[outside] += 5.0  # padding pixels and tokens outside the loss never count
        assert task.loss(ignored, targets)["loss_ssl"].abs() < 1e-6
        wrong = perfect + 0.1
        assert task.loss(wrong, targets)["loss_ssl"].item() == pytest.approx(0.1, rel=1e-4)
    else:
        ignored[~targets.loss_mask] = ignored[~targets.loss_mask].roll(1, -1)
        assert task.loss(ignored, targets)["loss_ssl"].abs() < 1e-6
        wrong = perfect.roll(1, -1)
        if task.name == "jigsaw_discrete":
            wrong = wrong.masked_fill(~targets.token_valid.flatten(1)[:, None, None, :], float("-inf"))
        assert task.loss(wrong, targets)["loss_ssl"] > 1.0


@pytest.mark.parametrize("name", list(TASKS))
def test_gradients_reach_the_loss_tokens_only(name, batch, tokenizer_file):
    images, valid = batch
    task = make_task(name, tokenizer_file)
    corrupted, targets = task.corrupt(images, valid, seeded())
    memory, pos = stand_in_encoder(corrupted)
    memory.requires_grad_(True)
    task.loss(task.predict(memory, pos, targets), targets)["loss_ssl"].backward()
    norms = memory.grad.norm(dim=-1)
    assert (norms[targets.loss_mask] > 0).all()
    assert (norms[~targets.loss_mask] == 0).all()


def test_jigsaw_discrete_scores_own_positions(batch, tokenizer_file):
    images, valid = batch
    task = make_task("jigsaw_discrete", tokenizer_file)
    corrupted, targets = task.corrupt(images, valid, seeded())
    memory, pos = stand_in_encoder(corrupted)
    logits = task.predict(memory, pos, targets)
    assert logits.shape == (3, 7, 9, 63)
    on_image = targets.token_valid.flatten(1)[:, None, None, :].expand_as(logits)
    assert torch.isfinite(logits[on_image]).all() and torch.isneginf(logits[~on_image]).all()


@pytest.mark.parametrize("name", list(TASKS))
def test_visualize(name, batch, tokenizer_file):
    images, valid = batch
    task = make_task(name, tokenizer_file)
    corrupted, targets = task.corrupt(images, valid, seeded())
    grid = task.visualize(images, corrupted, perfect_prediction(task, targets), targets, valid)
    assert grid.shape == (8, 3, 224, 288)
    assert grid.min() >= 0 and grid.max() <= 1
    assert (grid[:, :, ~valid[0]][[0, 2, 4, 6]] == 0).all(), "padding is black"
    input_row, corrupted_row, prediction_row, target_row = grid.split(2)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(input_row, (images[:2] * std + mean).clamp(0, 1) * valid[:2, None])
    assert torch.allclose(prediction_row, target_row), "a perfect prediction draws the target"
    if name != "mim_discrete":  # its target is the codebook's picture of each masked patch
        assert torch.allclose(target_row, input_row, atol=1e-6)
    if task.corrupts_input:
        assert not torch.equal(corrupted_row, input_row)


def test_registry(tmp_path, tokenizer_file):
    assert set(TASKS) == {"reconstruction", "mim_continuous", "mim_discrete", "jigsaw_continuous", "jigsaw_discrete"}
    assert build_pretext_task("none", HIDDEN, PATCH, 0.5) is None
    assert [TASKS[n].corrupts_input for n in TASKS] == [False, True, True, True, True]
    with pytest.raises(ValueError, match="known"):
        build_pretext_task("rotation", HIDDEN, PATCH, 0.5)
    with pytest.raises(ValueError, match="--tokenizer"):
        build_pretext_task("mim_discrete", HIDDEN, PATCH, 0.5)
    task = build_pretext_task("mim_discrete", HIDDEN, PATCH, 0.5, tokenizer_path=str(tokenizer_file))
    assert task.head.out_features == task.tokenizer.codebook_size == 8
    with pytest.raises(ValueError, match="ratio"):
        build_pretext_task("mim_continuous", HIDDEN, PATCH, 1.5)

    other = tmp_path / "p16.pt"
    KMeansTokenizer(torch.zeros(4, 16 * 16 * 3), patch_size=16).save(other)
    with pytest.raises(ValueError, match=r"16.*32|32.*16"):
        build_pretext_task("mim_discrete", HIDDEN, PATCH, 0.5, tokenizer_path=str(other))
    unnormalised = tmp_path / "unnormalised.pt"
    KMeansTokenizer(torch.zeros(4, PATCH * PATCH * 3), PATCH, mean=(0.0,) * 3, std=(1.0,) * 3).save(unnormalised)
    with pytest.raises(ValueError, match="ImageNet"):
        build_pretext_task("mim_discrete", HIDDEN, PATCH, 0.5, tokenizer_path=str(unnormalised))


def test_schedules_fall_per_step_and_reach_their_end_after_the_last_step():
    assert [schedule_value("constant", 2.0, s, 4) for s in (0, 2, 4)] == [2.0, 2.0, 2.0]
    assert [schedule_value("linear", 2.0, s, 4) for s in (0, 1, 2, 3, 4)] == [2.0, 1.5, 1.0, 0.5, 0.0]
    cosine = [schedule_value("cosine", 2.0, s, 4) for s in (0, 1, 2, 3, 4)]
    assert cosine == pytest.approx([2.0, 1.0 + math.sqrt(0.5), 1.0, 1.0 - math.sqrt(0.5), 0.0])
    # the final step (3 of 4) still trains with a positive value: a whole last epoch at 0 is gone
    assert all(schedule_value(kind, 1.0, 3, 4) > 0 for kind in SCHEDULES)
    assert all(schedule_value(kind, 1.0, 0, 1) == 1.0 for kind in SCHEDULES)
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_value("step", 1.0, 0, 5)
    with pytest.raises(ValueError, match="step must be in"):
        schedule_value("linear", 1.0, 6, 5)
