"""Build the official SAM 3 image model from ``sam3`` classes at any size.

``sam3.model_builder`` hard-codes the full-size dimensions and precomputes
caches on ``device="cuda"``. This module builds the same module tree from the
same classes with the sizes as parameters, so one loader serves the released
checkpoint (``Sam3Arch.full()``; same state-dict keys and shapes, checked by a
test against the official builder) and the tiny random-weight model that tests,
the demo and benchmarks use. Caches are left lazy (``precompute_resolution=None``,
decoder ``resolution=None``): identical numbers, created on the model's device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from sam3ray.model import compat

PATCH_SIZE = 14  # fixed by the released weights


@dataclass(frozen=True)
class Sam3Arch:
    """Sizes of a SAM 3 image model. Defaults are the released model's."""

    resolution: int = 1008
    vit_dim: int = 1024
    vit_depth: int = 32
    vit_heads: int = 16
    vit_mlp_ratio: float = 4.625
    vit_window: int = 24
    vit_global_blocks: tuple[int, ...] = (7, 15, 23, 31)
    vit_pretrain_img_size: int = 336
    d_model: int = 256
    heads: int = 8
    ffn_dim: int = 2048
    encoder_layers: int = 6
    decoder_layers: int = 6
    num_queries: int = 200
    geo_layers: int = 3
    text_width: int = 1024
    text_heads: int = 16
    text_layers: int = 24
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def full(cls) -> Sam3Arch:
        return cls()

    @classmethod
    def tiny(cls, resolution: int = 336) -> Sam3Arch:
        """4.3 M parameters; ~17 ms backbone + ~35 ms per prompt on one CPU core at 336 px."""
        return cls(
            resolution=resolution,
            vit_dim=64,
            vit_depth=2,
            vit_heads=2,
            vit_mlp_ratio=2.0,
            vit_window=12,
            vit_global_blocks=(1,),
            d_model=64,
            heads=2,
            ffn_dim=128,
            encoder_layers=1,
            decoder_layers=2,
            num_queries=20,
            geo_layers=1,
            text_width=64,
            text_heads=2,
            text_layers=2,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["vit_global_blocks"] = list(self.vit_global_blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sam3Arch:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SAM 3 architecture fields {unknown}")
        d = dict(d)
        if "vit_global_blocks" in d:
            d["vit_global_blocks"] = tuple(d["vit_global_blocks"])
        return cls(**d)

    def validate(self) -> None:
        grid = self.resolution // PATCH_SIZE
        problems = []
        if self.resolution % PATCH_SIZE:
            problems.append(f"resolution {self.resolution} is not a multiple of {PATCH_SIZE}")
        if grid % self.vit_window:
            problems.append(f"patch grid {grid} is not a multiple of vit_window {self.vit_window}")
        if self.d_model % 8 or self.d_model % self.heads:
            problems.append(f"d_model {self.d_model} must be a multiple of 8 and of heads")
        if any(b >= self.vit_depth for b in self.vit_global_blocks):
            problems.append("vit_global_blocks must be < vit_depth")
        if problems:
            raise ValueError("invalid SAM 3 architecture: " + "; ".join(problems))


def _mha(arch: Sam3Arch, batch_first: bool | None, dropout: float = 0.1):
    from sam3.model.model_misc import MultiheadAttentionWrapper

    kwargs: dict[str, Any] = {
        "num_heads": arch.heads,
        "dropout": dropout,
        "embed_dim": arch.d_model,
    }
    if batch_first is not None:
        kwargs["batch_first"] = batch_first
    return MultiheadAttentionWrapper(**kwargs)


def _vision(arch: Sam3Arch):
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.position_encoding import PositionEmbeddingSine
    from sam3.model.vitdet import ViT

    vit = ViT(
        img_size=arch.resolution,
        pretrain_img_size=arch.vit_pretrain_img_size,
        patch_size=PATCH_SIZE,
        embed_dim=arch.vit_dim,
        depth=arch.vit_depth,
        num_heads=arch.vit_heads,
        mlp_ratio=arch.vit_mlp_ratio,
        norm_layer="LayerNorm",
        drop_path_rate=0.1,
        qkv_bias=True,
        use_abs_pos=True,
        tile_abs_pos=True,
        global_att_blocks=arch.vit_global_blocks,
        rel_pos_blocks=(),
        use_rope=True,
        use_interp_rope=True,
        window_size=arch.vit_window,
        pretrain_use_cls_token=True,
        retain_cls_token=False,
        ln_pre=True,
        ln_post=False,
        return_interm_layers=False,
        bias_patch_embed=False,
        compile_mode=None,
    )
    pos = PositionEmbeddingSine(num_pos_feats=arch.d_model, normalize=True, temperature=10000)
    return Sam3DualViTDetNeck(
        position_encoding=pos,
        d_model=arch.d_model,
        scale_factors=[4.0, 2.0, 1.0, 0.5],
        trunk=vit,
        add_sam2_neck=False,
    )


def _transformer(arch: Sam3Arch):
    from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
    from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
    from sam3.model.model_misc import TransformerWrapper

    enc_layer = TransformerEncoderLayer(
        activation="relu",
        d_model=arch.d_model,
        dim_feedforward=arch.ffn_dim,
        dropout=0.1,
        pos_enc_at_attn=True,
        pos_enc_at_cross_attn_keys=False,
        pos_enc_at_cross_attn_queries=False,
        pre_norm=True,
        self_attention=_mha(arch, batch_first=True),
        cross_attention=_mha(arch, batch_first=True),
    )
    encoder = TransformerEncoderFusion(
        layer=enc_layer,
        num_layers=arch.encoder_layers,
        d_model=arch.d_model,
        num_feature_levels=1,
        frozen=False,
        use_act_checkpoint=True,
        add_pooled_text_to_img_feat=False,
        pool_text_with_mask=True,
    )
    dec_layer = TransformerDecoderLayer(
        activation="relu",
        d_model=arch.d_model,
        dim_feedforward=arch.ffn_dim,
        dropout=0.1,
        cross_attention=_mha(arch, batch_first=None),
        n_heads=arch.heads,
        use_text_cross_attention=True,
    )
    decoder = TransformerDecoder(
        layer=dec_layer,
        num_layers=arch.decoder_layers,
        num_queries=arch.num_queries,
        return_intermediate=True,
        box_refine=True,
        num_o2m_queries=0,
        dac=True,
        boxRPB="log",
        d_model=arch.d_model,
        frozen=False,
        interaction_layer=None,
        dac_use_selfatt_ln=True,
        resolution=None,  # official: 1008 with a device="cuda" coordinate cache
        stride=None,
        use_act_checkpoint=True,
        presence_token=True,
    )
    return TransformerWrapper(encoder=encoder, decoder=decoder, d_model=arch.d_model)


def _geometry_encoder(arch: Sam3Arch):
    from sam3.model.encoder import TransformerEncoderLayer
    from sam3.model.geometry_encoders import SequenceGeometryEncoder
    from sam3.model.position_encoding import PositionEmbeddingSine

    layer = TransformerEncoderLayer(
        activation="relu",
        d_model=arch.d_model,
        dim_feedforward=arch.ffn_dim,
        dropout=0.1,
        pos_enc_at_attn=False,
        pre_norm=True,
        self_attention=_mha(arch, batch_first=False),
        pos_enc_at_cross_attn_queries=False,
        pos_enc_at_cross_attn_keys=True,
        cross_attention=_mha(arch, batch_first=False),
    )
    return SequenceGeometryEncoder(
        pos_enc=PositionEmbeddingSine(
            num_pos_feats=arch.d_model, normalize=True, temperature=10000
        ),
        encode_boxes_as_points=False,
        points_direct_project=True,
        points_pool=True,
        points_pos_enc=True,
        boxes_direct_project=True,
        boxes_pool=True,
        boxes_pos_enc=True,
        d_model=arch.d_model,
        num_layers=arch.geo_layers,
        layer=layer,
        use_act_ckpt=True,
        add_cls=True,
        add_post_encode_proj=True,
    )


def _heads(arch: Sam3Arch):
    import torch.nn as nn
    from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead
    from sam3.model.model_misc import MLP, DotProductScoring

    prompt_mlp = MLP(
        input_dim=arch.d_model,
        hidden_dim=arch.ffn_dim,
        output_dim=arch.d_model,
        num_layers=2,
        dropout=0.1,
        residual=True,
        out_norm=nn.LayerNorm(arch.d_model),
    )
    scoring = DotProductScoring(d_model=arch.d_model, d_proj=arch.d_model, prompt_mlp=prompt_mlp)
    seg_head = UniversalSegmentationHead(
        hidden_dim=arch.d_model,
        upsampling_stages=3,
        aux_masks=False,
        presence_head=False,
        dot_product_scorer=None,
        act_ckpt=True,
        cross_attend_prompt=_mha(arch, batch_first=None, dropout=0),
        pixel_decoder=PixelDecoder(
            num_upsampling_stages=3,
            interpolation_mode="nearest",
            hidden_dim=arch.d_model,
            compile_mode=None,
        ),
    )
    return scoring, seg_head


def build_image_model(arch: Sam3Arch):
    """An eval-mode ``sam3.model.sam3_image.Sam3Image`` on CPU with untrained weights.

    Callers load weights (loader.py) or initialise them (tiny.py): several
    parameters are created with ``torch.empty`` upstream and hold garbage until then.
    """
    arch.validate()
    compat.ensure()
    from sam3.model.sam3_image import Sam3Image
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer
    from sam3.model.vl_combiner import SAM3VLBackbone

    text = VETextEncoder(
        tokenizer=SimpleTokenizer(bpe_path=compat.bpe_path()),
        d_model=arch.d_model,
        width=arch.text_width,
        heads=arch.text_heads,
        layers=arch.text_layers,
    )
    backbone = SAM3VLBackbone(visual=_vision(arch), text=text, scalp=1)
    scoring, seg_head = _heads(arch)
    model = Sam3Image(
        backbone=backbone,
        transformer=_transformer(arch),
        input_geometry_encoder=_geometry_encoder(arch),
        segmentation_head=seg_head,
        num_feature_levels=1,
        o2m_mask_predict=True,
        dot_prod_scoring=scoring,
        use_instance_query=False,
        multimask_output=True,
        inst_interactive_predictor=None,
        matcher=None,
    )
    model.sam3ray_arch = arch  # lets the engine find the input resolution
    return model.eval()
