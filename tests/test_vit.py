"""ViT backbones (timm) with ViTDet's windowed attention and simple feature pyramid: builds,
pyramid levels, padding invariance, MAE / timm weights, and DETR / Deformable DETR end to end."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from detr_ssl.__main__ import main  # noqa: E402
from detr_ssl.config import parse_args  # noqa: E402
from detr_ssl.models import build_model  # noqa: E402
from detr_ssl.models.backbone import BackboneWeightsError, build_backbone  # noqa: E402
from detr_ssl.models.position_encoding import build_position_encoding  # noqa: E402
from detr_ssl.models.vit import (VIT_BACKBONES, build_vit, global_block_indices, load_vit_weights,  # noqa: E402
                                 vit_strides)
from detr_ssl.utils.errors import UserError  # noqa: E402
from detr_ssl.utils.misc import NestedTensor  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE = REPO_ROOT / "data" / "sample"
TINY_VIT = ["--device", "cpu", "--num_workers", "0", "--backbone", "vit_tiny_patch16", "--backbone_weights", "none",
            "--pyramid_channels", "64", "--vit_window_size", "4", "--hidden_dim", "64", "--nheads", "4",
            "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward", "128", "--num_queries", "10",
            "--min_size", "128", "--max_size", "192", "--batch_size", "2", "--epochs", "1",
            "--limit_train_batches", "2", "--limit_val_batches", "1", "--vis_every", "1"]
DEFORMABLE = ["--model", "deformable_detr", "--num_feature_levels", "4", "--msda_backend", "pytorch"]
# name -> (depth, width, parameters of timm's ViT without class token, final norm and classifier)
SIZES = {"vit_tiny_patch16": (12, 192, 5_523_648), "vit_small_patch16": (12, 384, 21_664_128),
         "vit_base_patch16": (12, 768, 85_795_584), "vit_large_patch16": (24, 1024, 303_297_536)}


def vit_backbone(*flags: str, stages: tuple[str, ...] = ("layer4",)):
    args = parse_args([*TINY_VIT, *flags])
    return build_backbone(args, build_position_encoding(args), return_stages=stages)


def mae_state_dict(name: str = "vit_tiny_patch16_224", **kwargs) -> dict[str, torch.Tensor]:
    """timm's own model's weights plus MAE's decoder keys: the layout of mae_pretrain_vit_*.pth."""
    state = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).state_dict()
    width = state["pos_embed"].shape[-1]
    state.update({"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, width),
                  "decoder_pos_embed": torch.zeros(1, 197, 16), "decoder_blocks.0.norm1.weight": torch.ones(16),
                  "decoder_norm.weight": torch.ones(16), "decoder_pred.weight": torch.zeros(768, 16)})
    return state


@pytest.mark.parametrize("name", list(VIT_BACKBONES))
def test_every_backbone_name_builds(name):
    """All four sizes build from timm without a download (on the meta device: no memory, no time)."""
    depth, width, parameters = SIZES[name]
    with torch.device("meta"):
        vit = build_vit(name, drop_path=0.1)
    assert len(vit.blocks) == depth and vit.embed_dim == width and vit.cls_token is None
    assert sum(p.numel() for p in vit.parameters()) == parameters
    assert vit.pos_embed.shape == (1, 196, width)  # 14 x 14 tokens, no class-token entry


def test_global_blocks_are_evenly_spaced():
    assert global_block_indices(12) == (2, 5, 8, 11)
    assert global_block_indices(24) == (5, 11, 17, 23)


@pytest.mark.parametrize("flags, stages, strides", [
    ([], ("layer4",), [32]),
    (["--vit_detr_stride", "16"], ("layer4",), [16]),
    (["--num_feature_levels", "4"], ("layer2", "layer3", "layer4"), [8, 16, 32, 64]),
    (["--num_feature_levels", "3", "--vit_pyramid", "global_blocks"], ("layer2", "layer3", "layer4"), [8, 16, 32]),
], ids=["detr", "detr_stride16", "deformable", "global_blocks"])
def test_pyramid_strides_and_channels(coco_batch, flags, stages, strides):
    samples, _ = coco_batch
    backbone = vit_backbone(*flags, "--pyramid_channels", "32", stages=stages)
    assert backbone.strides == strides and backbone.num_channels == [32] * len(strides)
    features, positions = backbone(samples)
    height, width = samples.tensors.shape[-2:]
    for stride, feature, position in zip(strides, features, positions):
        assert feature.tensors.shape == (2, 32, math.ceil(height / stride), math.ceil(width / stride))
        assert feature.mask.shape == feature.tensors.shape[::2][:1] + feature.tensors.shape[2:]
        assert position.shape[-2:] == feature.tensors.shape[-2:] and torch.isfinite(feature.tensors).all()


def test_levels_beyond_the_pyramid_come_from_the_detector():
    """A fifth Deformable DETR level is the detector's own stride-2 convolution of the stride-64 one."""
    args = parse_args([*TINY_VIT, "--num_feature_levels", "5"])
    assert vit_strides(args, ("layer2", "layer3", "layer4")) == (8, 16, 32, 64)


@pytest.mark.parametrize("flags", [[], ["--vit_rel_pos", "--vit_pyramid", "global_blocks"]],
                         ids=["simple", "rel_pos_global_blocks"])
def test_padding_never_changes_valid_outputs(coco_images, flags):
    """An image alone and the same image in a larger padded batch give the same pyramid at every
    valid position: masked keys, the window padding and the pyramid's pooling/3x3 convolutions
    never reach a valid output. A size off the patch grid with zero padding (as the collate pads),
    and a size on it with noise in the padding (only the mask may keep it out)."""
    torch.manual_seed(0)
    stages = ("layer2", "layer3", "layer4")
    backbone = vit_backbone(*flags, "--num_feature_levels", "4", stages=stages).eval()
    with torch.no_grad():  # non-zero relative position biases, so that they count
        for name, p in backbone.named_parameters():
            if "rel_pos" in name:
                p.normal_()
    image = coco_images[0][:, :100, :150]
    for crop, fill in (((100, 150), torch.zeros), ((96, 144), torch.randn)):
        alone = image[:, :crop[0], :crop[1]]
        padded = fill(1, 3, crop[0] + 70, crop[1] + 90)
        padded[0, :, :crop[0], :crop[1]] = alone
        mask = torch.ones(1, *padded.shape[-2:], dtype=torch.bool)
        mask[0, :crop[0], :crop[1]] = False
        with torch.no_grad():
            small = backbone[0](NestedTensor(alone[None], torch.zeros(1, *crop, dtype=torch.bool)))
            large = backbone[0](NestedTensor(padded, mask))
        for a, b in zip(small, large):
            valid = ~a.mask[0]
            h, w = a.tensors.shape[-2:]
            assert (~b.mask[0, :h, :w] == valid).all() and not (~b.mask[0, h:]).any()
            torch.testing.assert_close(b.tensors[0, :, :h, :w][:, valid], a.tensors[0][:, valid], atol=2e-5, rtol=1e-4)


def test_position_embeddings_follow_each_images_own_grid():
    backbone = vit_backbone()
    body = backbone[0].body
    valid = torch.zeros(2, 9, 12, dtype=torch.bool)
    valid[0, :7, :12] = True
    valid[1, :9, :5] = True
    embedding = body.position_embedding(valid)
    table = body.vit.pos_embed.detach().view(1, 14, 14, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(table, size=(7, 12), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(embedding[0, :7].detach(), expected[0].permute(1, 2, 0))
    assert (embedding[0, 7:] == 0).all() and (embedding[1, :, 5:] == 0).all()


def test_mae_checkpoint_loads_strictly_and_lists_its_unused_keys(tmp_path, caplog):
    state = mae_state_dict()
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": state}, path)
    vit = build_vit("vit_tiny_patch16", drop_path=0.0)
    with caplog.at_level("INFO", logger="detr_ssl"):
        ignored = load_vit_weights(vit, str(path), "vit_tiny_patch16")
    assert {"mask_token", "decoder_embed.weight", "decoder_pred.weight", "cls_token", "norm.weight"} <= set(ignored)
    assert "decoder_blocks" in caplog.text and "mask_token" in caplog.text
    torch.testing.assert_close(vit.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"])
    torch.testing.assert_close(vit.pos_embed, state["pos_embed"][:, 1:])  # the class-token entry dropped
    # and through the CLI flag, into the detector's backbone.0.body.vit
    model, _, _ = build_model(parse_args([*TINY_VIT, "--backbone_weights", str(path)]))
    torch.testing.assert_close(model.state_dict()["backbone.0.body.vit.patch_embed.proj.weight"],
                               state["patch_embed.proj.weight"])


def test_mangled_checkpoint_names_every_bad_key(tmp_path):
    state = mae_state_dict()
    state["blocks.0.attn.qkv_w"] = state.pop("blocks.0.attn.qkv.weight")
    del state["blocks.1.mlp.fc1.bias"]
    state["patch_embed.proj.bias"] = torch.zeros(7)
    path = tmp_path / "mangled.pth"
    torch.save(state, path)  # a plain state dict this time
    with pytest.raises(BackboneWeightsError) as error:
        load_vit_weights(build_vit("vit_tiny_patch16", drop_path=0.0), str(path), "vit_tiny_patch16")
    message = str(error.value)
    for part in ("missing blocks.0.attn.qkv.weight", "missing blocks.1.mlp.fc1.bias", "unexpected blocks.0.attn.qkv_w",
                 "patch_embed.proj.bias: file (7,) vs model (192,)"):
        assert part in message


def test_position_embeddings_of_another_grid_are_resized(tmp_path):
    state = mae_state_dict("vit_tiny_patch16_384")  # 24 x 24 tokens + class token
    path = tmp_path / "timm_384.pth"
    torch.save(state, path)
    vit = build_vit("vit_tiny_patch16", drop_path=0.0)
    load_vit_weights(vit, str(path), "vit_tiny_patch16")
    grid = state["pos_embed"][:, 1:].reshape(1, 24, 24, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(vit.pos_embed, expected.flatten(2).transpose(1, 2))


def test_imagenet_weights_and_missing_timm_are_clear_errors(monkeypatch):
    with pytest.raises(BackboneWeightsError, match="MAE checkpoint"):
        build_model(parse_args([*TINY_VIT, "--backbone_weights", "imagenet"]))
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(UserError, match=r"pip install -e '\.\[vit\]'"):
        build_model(parse_args(TINY_VIT))


def test_resnets_never_import_timm():
    code = ("import sys; from detr_ssl.config import parse_args; from detr_ssl.models import build_model; "
            "build_model(parse_args(['--device', 'cpu', '--backbone', 'resnet18', '--backbone_weights', 'none'])); "
            "print('timm' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert result.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("model_flags", [[], DEFORMABLE], ids=["detr", "deformable_detr"])
def test_training_steps_reduce_the_loss(coco_batch, model_flags):
    torch.manual_seed(0)
    model, criterion, _ = build_model(parse_args([*TINY_VIT, *model_flags, "--dropout", "0", "--drop_path", "0",
                                                  "--num_classes", "91"]))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    samples, targets = coco_batch
    losses = []
    for _ in range(6):
        loss_dict = criterion(model(samples), targets)
        loss = sum(loss_dict[k] * w for k, w in criterion.weight_dict.items() if k in loss_dict)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and min(losses[-2:]) < losses[0], losses


@pytest.mark.parametrize("model_flags, task, patch", [([], "mim_continuous", 32), (DEFORMABLE, "jigsaw_continuous", 8)],
                         ids=["detr", "deformable_detr"])
def test_cli_trains_and_evaluates_with_an_encoder_task(tmp_path, model_flags, task, patch):
    """DETR reads the stride-32 level, Deformable DETR's encoder task the stride-8 one: the task's
    patch size is that stride."""
    argv = [*TINY_VIT, *model_flags, "--ssl_task", task, "--ssl_mode", "multitask", "--data_path", str(SAMPLE),
            "--output_dir", str(tmp_path)]
    model, _, _ = build_model(parse_args(argv))
    assert model.ssl_head.patch_size == patch
    main(argv)
    log = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(log["train_loss"]) and log["train_loss_ssl"] > 0 and "val_AP" in log
    main([*argv, "--eval", "--resume", str(tmp_path / "checkpoint.pth")])


@pytest.mark.parametrize("task, flags, patch", [
    ("reconstruction", ["--ssl_mode", "pretrain"], 32),
    ("mim_continuous", ["--vit_detr_stride", "16"], 16),
    ("mim_discrete", DEFORMABLE, 8),
    ("jigsaw_continuous", [], 32),
    ("jigsaw_discrete", [*DEFORMABLE, "--vit_pyramid", "global_blocks"], 8),
])
def test_every_encoder_task_trains_the_vit_from_the_level_the_encoder_reads(coco_batch, tmp_path, task, flags, patch):
    """Each pretext task once on a ViT: its patch is the stride of the level it reads (DETR's
    --vit_detr_stride, Deformable DETR's stride-8 level), and its loss reaches the ViT's blocks."""
    from detr_ssl.ssl.tokenizer import fit_kmeans_tokenizer_on_folder

    tokenizer = []
    if task == "mim_discrete":
        fit_kmeans_tokenizer_on_folder(SAMPLE / "unlabelled", tmp_path / "tokens.pt", codebook_size=8, patch_size=patch,
                                       iters=3, image_size=64)
        tokenizer = ["--tokenizer", str(tmp_path / "tokens.pt")]
    model, criterion, _ = build_model(parse_args([*TINY_VIT, *flags, "--ssl_task", task, *tokenizer,
                                                  "--lr_backbone", "1e-5"]))
    assert model.ssl_head.patch_size == patch
    samples, targets = coco_batch
    losses = criterion(model.train()(samples), targets)
    assert losses["loss_ssl"] > 0 and torch.isfinite(losses["loss_ssl"])
    losses["loss_ssl"].backward()
    block = model.backbone[0].body.vit.blocks[0].attn.qkv.weight
    assert block.grad is not None and block.grad.abs().sum() > 0
