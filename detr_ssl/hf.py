"""Conversion between our (= the official) DETR / Deformable DETR layout and Hugging Face
``transformers``' ``DetrForObjectDetection`` / ``DeformableDetrForObjectDetection``.

Used by ``scripts/convert_hf.py``; the core package never imports it, and it imports
``transformers`` only inside the functions that need it (the ``hf`` extra).

The two layouts hold the same tensors under other names, with one split: our
``nn.MultiheadAttention`` keeps query, key and value in one ``in_proj_weight`` (3C x C, in that
order), ``transformers`` in ``q_proj``/``k_proj``/``v_proj``. The backbone is timm's ResNet
(``use_timm_backbone=True``), whose parameter names are torchvision's. What ``transformers``
cannot express is refused (ViT backbones, pre-norm DETR) or dropped and named (pretext-task and
method heads, BatchNorm counters): see ``to_hf_state``.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from detr_ssl.utils.errors import UserError

HF_MODEL_TYPES = {"detr": "DetrForObjectDetection", "deformable_detr": "DeformableDetrForObjectDetection"}
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
UNNAMED = "N/A"  # id2label of class indices without a category name (as facebook/detr-resnet-50's config)


class ConversionError(UserError, ValueError):
    """A checkpoint or a transformers model that the other layout cannot hold."""


def import_transformers() -> Any:
    """The ``transformers`` module, or an error saying how to install it (an optional extra)."""
    try:
        import transformers
    except ImportError as err:
        raise UserError(f"Hugging Face conversion needs transformers and safetensors ({err}): "
                        "pip install -e '.[hf]'") from err
    return transformers


# ---------------------------------------------------------------------------------------------
# key renames


@dataclass(frozen=True)
class Rename:
    """A key prefix in our layout and its counterpart in transformers'; ``{n}`` is a layer index."""

    ours: str
    hf: str

    def apply(self, key: str, to_hf: bool) -> str | None:
        """``key`` renamed into the other layout, or None when it does not start with this prefix."""
        source, target = (self.ours, self.hf) if to_hf else (self.hf, self.ours)
        match = re.match(re.escape(source).replace(r"\{n\}", r"(\d+)"), key)
        if match is None:
            return None
        renamed = target
        for index in match.groups():
            renamed = renamed.replace("{n}", index, 1)
        return renamed + key[match.end():]


BACKBONE = [Rename("backbone.0.body.", "model.backbone.model."),
            Rename("backbone.1.row_embed.", "model.position_embedding.row_embeddings."),
            Rename("backbone.1.col_embed.", "model.position_embedding.column_embeddings.")]
FFN = [Rename("transformer.{part}.layers.{n}.linear1.", "model.{part}.layers.{n}.mlp.fc1."),
       Rename("transformer.{part}.layers.{n}.linear2.", "model.{part}.layers.{n}.mlp.fc2.")]


def _in(part: str, renames: list[Rename]) -> list[Rename]:
    """``renames`` of the encoder's or the decoder's layers (``part``)."""
    return [Rename(r.ours.replace("{part}", part), r.hf.replace("{part}", part)) for r in renames]


# nn.MultiheadAttention modules: in_proj_* splits into q/k/v_proj.*, out_proj becomes o_proj
ATTENTION = {
    "detr": [Rename("transformer.encoder.layers.{n}.self_attn.", "model.encoder.layers.{n}.self_attn."),
             Rename("transformer.decoder.layers.{n}.self_attn.", "model.decoder.layers.{n}.self_attn."),
             Rename("transformer.decoder.layers.{n}.multihead_attn.", "model.decoder.layers.{n}.encoder_attn.")],
    "deformable_detr": [Rename("transformer.decoder.layers.{n}.self_attn.", "model.decoder.layers.{n}.self_attn.")],
}
RENAMES = {
    "detr": [
        *BACKBONE, *_in("encoder", FFN), *_in("decoder", FFN),
        Rename("transformer.encoder.layers.{n}.norm1.", "model.encoder.layers.{n}.self_attn_layer_norm."),
        Rename("transformer.encoder.layers.{n}.norm2.", "model.encoder.layers.{n}.final_layer_norm."),
        Rename("transformer.decoder.layers.{n}.norm1.", "model.decoder.layers.{n}.self_attn_layer_norm."),
        Rename("transformer.decoder.layers.{n}.norm2.", "model.decoder.layers.{n}.encoder_attn_layer_norm."),
        Rename("transformer.decoder.layers.{n}.norm3.", "model.decoder.layers.{n}.final_layer_norm."),
        Rename("transformer.decoder.norm.", "model.decoder.layernorm."),
        Rename("query_embed.", "model.query_position_embeddings."),
        Rename("input_proj.", "model.input_projection."),
        Rename("class_embed.", "class_labels_classifier."),
        Rename("bbox_embed.", "bbox_predictor."),
    ],
    "deformable_detr": [
        *BACKBONE, *_in("encoder", FFN), *_in("decoder", FFN),
        Rename("transformer.encoder.layers.{n}.self_attn.", "model.encoder.layers.{n}.self_attn."),
        Rename("transformer.encoder.layers.{n}.norm1.", "model.encoder.layers.{n}.self_attn_layer_norm."),
        Rename("transformer.encoder.layers.{n}.norm2.", "model.encoder.layers.{n}.final_layer_norm."),
        Rename("transformer.decoder.layers.{n}.cross_attn.", "model.decoder.layers.{n}.encoder_attn."),
        Rename("transformer.decoder.layers.{n}.norm1.", "model.decoder.layers.{n}.encoder_attn_layer_norm."),
        Rename("transformer.decoder.layers.{n}.norm2.", "model.decoder.layers.{n}.self_attn_layer_norm."),
        Rename("transformer.decoder.layers.{n}.norm3.", "model.decoder.layers.{n}.final_layer_norm."),
        Rename("transformer.decoder.bbox_embed.", "model.decoder.bbox_embed."),
        Rename("transformer.decoder.class_embed.", "model.decoder.class_embed."),
        *(Rename(f"transformer.{name}.", f"model.{name}.")
          for name in ("reference_points", "enc_output", "enc_output_norm", "pos_trans", "pos_trans_norm")),
        Rename("query_embed.", "model.query_position_embeddings."),
        Rename("input_proj.", "model.input_proj."),
        Rename("class_embed.", "class_embed."),
        Rename("bbox_embed.", "bbox_embed."),
    ],
}
EXACT = {"detr": {}, "deformable_detr": {"transformer.level_embed": "model.level_embed"}}
QKV = ("q", "k", "v")


def _renamed(key: str, model: str, to_hf: bool) -> str | None:
    """A key that is not part of an attention projection, in the other layout (None: no counterpart)."""
    exact = EXACT[model] if to_hf else {hf: ours for ours, hf in EXACT[model].items()}
    if key in exact:
        return exact[key]
    for attention in ATTENTION[model]:
        projection = Rename(attention.ours + "out_proj.", attention.hf + "o_proj.").apply(key, to_hf)
        if projection is not None:
            return projection
    return next((found for rename in RENAMES[model] if (found := rename.apply(key, to_hf)) is not None), None)


def _split_in_proj(key: str, tensor: Tensor, model: str) -> dict[str, Tensor] | None:
    """``...in_proj_weight|bias`` of an attention module as transformers' three projections."""
    for attention in ATTENTION[model]:
        renamed = Rename(attention.ours + "in_proj_", attention.hf + "{qkv}_proj.").apply(key, to_hf=True)
        if renamed is not None:
            return {renamed.replace("{qkv}", name): part for name, part in zip(QKV, tensor.chunk(3))}
    return None


def _join_key(key: str, model: str) -> tuple[str, int] | None:
    """(our ``in_proj_*`` key, the projection's place in it) of a transformers q/k/v key, else None."""
    for attention in ATTENTION[model]:
        for place, name in enumerate(QKV):
            renamed = Rename(attention.ours + "in_proj_", attention.hf + f"{name}_proj.").apply(key, to_hf=False)
            if renamed is not None:
                return renamed, place
    return None


def to_hf_state(state: dict[str, Tensor], model: str) -> tuple[dict[str, Tensor], list[str]]:
    """(transformers' state dict, our keys it has no place for) of our ``state`` of ``model``.

    Dropped are the keys without a counterpart: pretext-task and method heads (``ssl_head.``,
    ``patch2query.``, ``feature_embed.``...) and trainable BatchNorm's ``num_batches_tracked``
    counters (transformers freezes BatchNorm; evaluation never reads them)."""
    converted, dropped = {}, []
    for key, tensor in state.items():
        split = _split_in_proj(key, tensor, model)
        renamed = None if split is not None or key.endswith("num_batches_tracked") else _renamed(key, model, True)
        if split is not None:
            converted.update(split)
        elif renamed is not None:
            converted[renamed] = tensor
        else:
            dropped.append(key)
    return converted, dropped


def from_hf_state(state: dict[str, Tensor], model: str) -> tuple[dict[str, Tensor], list[str]]:
    """(our state dict, transformers' keys it has no place for) of transformers' ``state``."""
    converted, unmapped, parts = {}, [], {}
    for key, tensor in state.items():
        joined = _join_key(key, model)
        renamed = None if joined is not None else _renamed(key, model, False)
        if joined is not None:
            parts.setdefault(joined[0], {})[joined[1]] = tensor
        elif renamed is not None:
            converted[renamed] = tensor
        else:
            unmapped.append(key)
    for key, projections in parts.items():
        if len(projections) < len(QKV):
            unmapped.append(f"{key} (only {len(projections)} of q/k/v_proj)")
            continue
        converted[key] = torch.cat([projections[place] for place in range(len(QKV))])
    return converted, unmapped


# ---------------------------------------------------------------------------------------------
# configurations


def refuse_inexpressible(args: argparse.Namespace, where: str) -> None:
    """Raise ``ConversionError`` for the options transformers' models have no equivalent of."""
    if args.backbone not in RESNETS:
        raise ConversionError(f"{where}: --backbone {args.backbone}: transformers' DETR and Deformable DETR take "
                              f"a timm ResNet ({', '.join(RESNETS)}); a ViT with ViTDet's simple feature pyramid "
                              "has no equivalent there, so this checkpoint cannot be converted")
    if args.model == "detr" and args.pre_norm:
        raise ConversionError(f"{where}: --pre_norm: transformers' DETR layers are post-norm only")


def id2label(names: dict[int, str], num_labels: int) -> dict[int, str]:
    """transformers' ``id2label`` of every class index: the category name, or N/A where none is known."""
    return {index: names.get(index, UNNAMED) for index in range(num_labels)}


def category_names_of(config: Any) -> dict[int, str]:
    """Our category names from a transformers config: its ``id2label`` without placeholders."""
    return {int(index): str(name) for index, name in config.id2label.items()
            if name != UNNAMED and name != f"LABEL_{index}"}


def hf_config(args: argparse.Namespace, num_labels: int, names: dict[int, str]) -> Any:
    """transformers' configuration of the detector that ``args`` builds (a timm ResNet backbone
    without pretrained weights, so building it downloads nothing).

    ``auxiliary_loss`` stays off: it is training-only, and transformers' DETR decoder with it
    feeds each layer the previous layer's normalised output, unlike the official one.
    Refinement without two-stage has one class head per decoder layer, which transformers
    would tie into one unless ``tie_word_embeddings`` is off."""
    transformers = import_transformers()
    labels = id2label(names, num_labels)
    common = dict(use_timm_backbone=True, backbone=args.backbone, use_pretrained_backbone=False,
                  d_model=args.hidden_dim, encoder_layers=args.enc_layers, decoder_layers=args.dec_layers,
                  encoder_ffn_dim=args.dim_feedforward, decoder_ffn_dim=args.dim_feedforward,
                  encoder_attention_heads=args.nheads, decoder_attention_heads=args.nheads, dropout=args.dropout,
                  activation_function="relu", position_embedding_type=args.position_embedding,
                  dilation=args.dilation, auxiliary_loss=False, num_queries=args.num_queries,
                  id2label=labels, label2id={name: index for index, name in labels.items()})
    if args.model == "detr":
        return transformers.DetrConfig(**common)
    return transformers.DeformableDetrConfig(
        **common, num_feature_levels=args.num_feature_levels, encoder_n_points=args.enc_n_points,
        decoder_n_points=args.dec_n_points, with_box_refine=args.with_box_refine, two_stage=args.two_stage,
        two_stage_num_proposals=args.num_queries, tie_word_embeddings=not (args.with_box_refine and not args.two_stage))


def _backbone_name(config: Any) -> str:
    """The timm ResNet of a transformers config; anything else is refused."""
    backbone = config.backbone_config
    kind = getattr(backbone, "model_type", None)
    name = getattr(backbone, "backbone", None)
    if kind != "timm_backbone" or name not in RESNETS:
        raise ConversionError(f"the backbone is {kind} {name or ''}; only timm ResNets ({', '.join(RESNETS)}, "
                              "use_timm_backbone=True) have our layout")
    return name


def architecture_flags(config: Any) -> list[str]:
    """Our command-line flags of the architecture of a transformers DETR / Deformable DETR config."""
    if config.model_type not in HF_MODEL_TYPES:
        raise ConversionError(f"model_type {config.model_type!r}: only {', '.join(HF_MODEL_TYPES)} convert")
    different = [f"{a} {getattr(config, a)} != {b} {getattr(config, b)}"
                 for a, b in (("encoder_ffn_dim", "decoder_ffn_dim"), ("encoder_attention_heads",
                                                                        "decoder_attention_heads"))
                 if getattr(config, a) != getattr(config, b)]
    if config.activation_function != "relu":
        different.append(f"activation_function {config.activation_function} (ours: relu)")
    if different:
        raise ConversionError(f"our layout has one FFN width, head count and ReLU for encoder and decoder: "
                              f"{'; '.join(different)}")
    flags = ["--model", config.model_type, "--backbone", _backbone_name(config),
             "--hidden_dim", str(config.d_model), "--enc_layers", str(config.encoder_layers),
             "--dec_layers", str(config.decoder_layers), "--dim_feedforward", str(config.encoder_ffn_dim),
             "--nheads", str(config.encoder_attention_heads), "--dropout", str(config.dropout),
             "--position_embedding", config.position_embedding_type, "--num_classes", str(config.num_labels),
             "--backbone_weights", "none", "--backbone_norm", "frozen"]
    flags += ["--dilation"] if config.dilation else []
    if config.model_type == "detr":
        return flags + ["--num_queries", str(config.num_queries)]
    queries = config.two_stage_num_proposals if config.two_stage else config.num_queries
    flags += ["--num_queries", str(queries), "--num_feature_levels", str(config.num_feature_levels),
              "--enc_n_points", str(config.encoder_n_points), "--dec_n_points", str(config.decoder_n_points)]
    return flags + ["--with_box_refine"] * config.with_box_refine + ["--two_stage"] * config.two_stage


def hf_model_class(model: str) -> type:
    """transformers' detection class of our ``--model``."""
    return getattr(import_transformers(), HF_MODEL_TYPES[model])


def alias_groups(model: nn.Module) -> list[list[str]]:
    """State-dict keys of ``model`` that name one tensor (shared heads), in groups of two or more."""
    groups: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def differing_aliases(state: dict[str, Tensor], model: nn.Module) -> list[str]:
    """Groups of keys that are one tensor in ``model`` but hold different values in ``state``:
    a transformers model whose tied-in-ours heads were trained apart cannot become ours."""
    return [", ".join(keys) for keys in alias_groups(model)
            if all(k in state for k in keys) and not all(torch.equal(state[keys[0]], state[k]) for k in keys[1:])]
