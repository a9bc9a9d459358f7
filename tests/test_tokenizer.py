"""k-means visual tokenizer on real photos, its file format, and scripts/fit_tokenizer.py end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from detr_ssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from detr_ssl.ssl.patches import patchify
from detr_ssl.ssl.tokenizer import KMeansTokenizer, load_tokenizer

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
PATCH = 16


@pytest.fixture(scope="module")
def patches() -> torch.Tensor:
    """All full 16 x 16 patches of the sample training photos at 128 x 160, normalised."""
    chunks = []
    for path in sorted((SAMPLE / "train").glob("*.jpg")):
        image = TF.to_dtype(TF.pil_to_tensor(Image.open(path).convert("RGB")), torch.float32, scale=True)
        image = TF.normalize(TF.resize(image, [128, 160], antialias=True), list(IMAGENET_MEAN), list(IMAGENET_STD))
        chunks.append(patchify(image[None], PATCH).flatten(0, 2))
    return torch.cat(chunks)


@pytest.fixture(scope="module")
def fitted(patches) -> tuple[KMeansTokenizer, float]:
    return KMeansTokenizer.fit(patches, 16, PATCH, iters=10, seed=0)


def test_fit_encode_decode(patches, fitted):
    tokenizer, inertia = fitted
    assert tokenizer.codebook_size == 16 and tokenizer.patch_size == PATCH
    ids = tokenizer.encode(patches)
    assert ids.dtype == torch.int64 and ids.shape == (len(patches),)
    assert torch.equal(ids, torch.cdist(patches, tokenizer.centroids).argmin(1)), "ids are the nearest centroids"
    assert torch.equal(tokenizer.decode(ids), tokenizer.centroids[ids])
    assert torch.equal(tokenizer.encode(tokenizer.centroids), torch.arange(16))
    error = (tokenizer.decode(ids) - patches).square().sum()
    assert inertia == pytest.approx(error.item(), rel=1e-4)
    assert error < 0.6 * (patches - patches.mean(0)).square().sum(), "16 codes explain the patches far better than 1"
    assert len(ids.unique()) == 16


def test_fit_is_seeded_and_lloyd_improves(patches, fitted):
    tokenizer, inertia = fitted
    again, _ = KMeansTokenizer.fit(patches, 16, PATCH, iters=10, seed=0)
    other, _ = KMeansTokenizer.fit(patches, 16, PATCH, iters=10, seed=1)
    _, start = KMeansTokenizer.fit(patches, 16, PATCH, iters=0, seed=0)
    assert torch.equal(tokenizer.centroids, again.centroids)
    assert not torch.equal(tokenizer.centroids, other.centroids)
    assert inertia < start


def test_fit_needs_enough_patches(patches):
    with pytest.raises(ValueError, match="codebook size"):
        KMeansTokenizer.fit(patches[:10], 16, PATCH)


def test_save_load_round_trip(tmp_path, patches, fitted):
    tokenizer, _ = fitted
    tokenizer.save(tmp_path / "tokenizer.pt")
    loaded = load_tokenizer(tmp_path / "tokenizer.pt")
    assert isinstance(loaded, KMeansTokenizer)
    assert (loaded.patch_size, loaded.codebook_size) == (PATCH, 16)
    assert loaded.mean == IMAGENET_MEAN and loaded.std == IMAGENET_STD
    assert torch.equal(loaded.centroids, tokenizer.centroids)
    assert torch.equal(loaded.encode(patches), tokenizer.encode(patches))
    record = torch.load(tmp_path / "tokenizer.pt", weights_only=True)
    assert record["kind"] == "kmeans" and set(record) == {"kind", "patch_size", "codebook_size", "mean", "std",
                                                          "state_dict"}


class CreatesFile:
    """Unpickling this creates ``path``: a stand-in for code a tokenizer file must not run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_code_executing_file_is_refused(tmp_path):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"kind": "kmeans", "payload": CreatesFile(marker)}, evil)
    with pytest.raises(ValueError, match="run code"):
        load_tokenizer(evil)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: a trusting load runs it
    assert marker.exists()


def test_unknown_or_foreign_file(tmp_path):
    torch.save({"kind": "dvae", "patch_size": 16}, tmp_path / "dvae.pt")
    with pytest.raises(ValueError, match="unknown kind 'dvae'"):
        load_tokenizer(tmp_path / "dvae.pt")
    torch.save({"model": torch.zeros(1)}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="not a tokenizer file"):
        load_tokenizer(tmp_path / "checkpoint.pt")


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "fit_tokenizer.py"), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("split, images", [("unlabelled", 7), ("train", 4)])
def test_fit_tokenizer_script(tmp_path, split, images):
    out = tmp_path / "tokenizer.pt"
    result = run_script("--data_path", str(SAMPLE / split), "--codebook_size", "8", "--out", str(out),
                        "--iters", "3", "--image_size", "160", "--max_patches", "100", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["images"] == images and summary["patches"] == 100
    assert summary["inertia"] > 0 and summary["time_s"] >= 0
    tokenizer = load_tokenizer(out)
    assert (tokenizer.patch_size, tokenizer.codebook_size) == (32, 8)


def test_fit_tokenizer_script_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    result = run_script("--data_path", str(tmp_path), "--codebook_size", "8", "--out", str(tmp_path / "t.pt"))
    assert result.returncode != 0
    assert "no image files" in result.stderr and str(tmp_path) in result.stderr
