"""Build the official SAM 3 video model from ``sam3`` classes at any size.

Mirrors ``sam3.model_builder.build_sam3_video_model`` and ``build_tracker``
(detector ``Sam3ImageOnVideoMultiGPU`` + tracker ``Sam3TrackerPredictor`` in a
``Sam3VideoInferenceWithInstanceInteractivity``) with the sizes as parameters,
so one loader serves the released checkpoint (``Sam3VideoArch.full()``: same
state-dict keys and shapes) and the tiny random-weight video model of tests and
benchmarks. Differences from the official builder, all numerically neutral:
position-encoding caches are lazy (``precompute_resolution=None``; upstream
precomputes them on ``device="cuda"``) and the model stays on CPU until the
caller moves it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from sam3ray.model import compat
from sam3ray.model.arch import PATCH_SIZE, Sam3Arch

#: ``build_sam3_video_model(apply_temporal_disambiguation=True)`` heuristics.
DEFAULT_HEURISTICS: dict[str, Any] = {
    "score_threshold_detection": 0.5,
    "assoc_iou_thresh": 0.1,
    "det_nms_thresh": 0.1,
    "new_det_thresh": 0.7,
    "hotstart_delay": 15,
    "hotstart_unmatch_thresh": 8,
    "hotstart_dup_thresh": 8,
    "suppress_unmatched_only_within_hotstart": True,
    "min_trk_keep_alive": -1,
    "max_trk_keep_alive": 30,
    "init_trk_keep_alive": 30,
    "suppress_overlapping_based_on_recent_occlusion_threshold": 0.7,
    "suppress_det_close_to_boundary": False,
    "fill_hole_area": 16,
    "recondition_every_nth_frame": 16,
    "masklet_confirmation_enable": False,
    "decrease_trk_keep_alive_for_empty_masklets": False,
}


@dataclass(frozen=True)
class Sam3VideoArch:
    """Sizes of a SAM 3 video model: the detector's ``Sam3Arch`` plus the tracker's."""

    detector: Sam3Arch = field(default_factory=Sam3Arch.full)
    mem_dim: int = 64
    tracker_layers: int = 4
    tracker_ffn_dim: int = 2048
    num_maskmem: int = 7
    temporal_disambiguation: bool = True
    heuristics: dict[str, Any] = field(default_factory=dict)  # overrides of DEFAULT_HEURISTICS

    @classmethod
    def full(cls) -> Sam3VideoArch:
        return cls()

    @classmethod
    def tiny(cls, resolution: int = 336, num_queries: int = 8) -> Sam3VideoArch:
        """Tiny detector (see ``Sam3Arch.tiny``) + 1-layer tracker at d=64.

        Few queries on purpose: the video model's mask NMS is quadratic in
        detections, and 200 queries at a low threshold allocate gigabytes.
        No hotstart: upstream holds objects back for 15 frames until they are
        re-detected 8 times, which random weights rarely do, so short test
        shards would show nothing on their first half.
        """
        det = Sam3Arch.tiny(resolution=resolution)
        det = Sam3Arch.from_dict({**det.to_dict(), "num_queries": num_queries})
        no_hotstart = {"hotstart_delay": 0, "hotstart_unmatch_thresh": 0, "hotstart_dup_thresh": 0}
        return cls(
            detector=det, mem_dim=16, tracker_layers=1, tracker_ffn_dim=128, heuristics=no_hotstart
        )

    @property
    def resolution(self) -> int:
        return self.detector.resolution

    def heuristic_kwargs(self) -> dict[str, Any]:
        out = dict(DEFAULT_HEURISTICS)
        if not self.temporal_disambiguation:  # the official ablation variant
            out.update(hotstart_delay=0, hotstart_unmatch_thresh=0, hotstart_dup_thresh=0)
            out.update(recondition_every_nth_frame=0)
        unknown = sorted(set(self.heuristics) - set(DEFAULT_HEURISTICS))
        if unknown:
            raise ValueError(f"unknown SAM 3 video heuristics {unknown}")
        out.update(self.heuristics)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["detector"] = self.detector.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sam3VideoArch:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SAM 3 video architecture fields {unknown}")
        d = dict(d)
        if "detector" in d:
            d["detector"] = Sam3Arch.from_dict(d["detector"])
        return cls(**d)


def _vision_with_tracker_neck(det: Sam3Arch):
    """The detector's vision neck with the SAM 2-style convs the tracker reads
    (``add_sam2_neck=True``, as ``_create_vision_backbone`` builds it for video)."""
    from sam3.model.necks import Sam3DualViTDetNeck

    from sam3ray.model.arch import _vision

    plain = _vision(det)
    return Sam3DualViTDetNeck(
        position_encoding=plain.position_encoding,
        d_model=det.d_model,
        scale_factors=[4.0, 2.0, 1.0, 0.5],
        trunk=plain.trunk,
        add_sam2_neck=True,
    )


def _tracker_transformer(a: Sam3VideoArch):
    from sam3.model.decoder import TransformerDecoderLayerv2, TransformerEncoderCrossAttention
    from sam3.model.model_misc import TransformerWrapper
    from sam3.sam.transformer import RoPEAttention

    d = a.detector.d_model
    grid = [a.resolution // PATCH_SIZE] * 2
    common = {"embedding_dim": d, "num_heads": 1, "downsample_rate": 1, "dropout": 0.1}
    layer = TransformerDecoderLayerv2(
        cross_attention_first=False,
        activation="relu",
        dim_feedforward=a.tracker_ffn_dim,
        dropout=0.1,
        pos_enc_at_attn=False,
        pre_norm=True,
        self_attention=RoPEAttention(
            **common, rope_theta=10000.0, feat_sizes=grid, use_fa3=False, use_rope_real=False
        ),
        d_model=d,
        pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False,
        cross_attention=RoPEAttention(
            **common,
            kv_in_dim=a.mem_dim,
            rope_theta=10000.0,
            feat_sizes=grid,
            rope_k_repeat=True,
            use_fa3=False,
            use_rope_real=False,
        ),
    )
    encoder = TransformerEncoderCrossAttention(
        remove_cross_attention_layers=[],
        batch_first=True,
        d_model=d,
        frozen=False,
        pos_enc_at_input=True,
        layer=layer,
        num_layers=a.tracker_layers,
        use_act_checkpoint=False,
    )
    return TransformerWrapper(encoder=encoder, decoder=None, d_model=d)


def build_tracker(a: Sam3VideoArch):
    """``model_builder.build_tracker`` at ``a``'s sizes (no backbone: it reads the detector's)."""
    from sam3.model.memory import CXBlock, SimpleFuser, SimpleMaskDownSampler, SimpleMaskEncoder
    from sam3.model.position_encoding import PositionEmbeddingSine
    from sam3.model.sam3_tracking_predictor import Sam3TrackerPredictor

    d = a.detector.d_model
    mask_size = a.resolution // PATCH_SIZE * 16
    maskmem = SimpleMaskEncoder(
        out_dim=a.mem_dim,
        position_encoding=PositionEmbeddingSine(
            num_pos_feats=a.mem_dim, normalize=True, temperature=10000
        ),
        mask_downsampler=SimpleMaskDownSampler(
            embed_dim=d, kernel_size=3, stride=2, padding=1, interpol_size=[mask_size] * 2
        ),
        fuser=SimpleFuser(
            layer=CXBlock(dim=d, kernel_size=7, padding=3, layer_scale_init_value=1.0e-06),
            num_layers=2,
        ),
        in_dim=d,
    )
    return Sam3TrackerPredictor(
        image_size=a.resolution,
        num_maskmem=a.num_maskmem,
        backbone=None,
        backbone_stride=PATCH_SIZE,
        transformer=_tracker_transformer(a),
        maskmem_backbone=maskmem,
        multimask_output_in_sam=True,
        forward_backbone_per_frame_for_eval=True,
        trim_past_non_cond_mem_for_eval=False,
        multimask_output_for_tracking=True,
        multimask_min_pt_num=0,
        multimask_max_pt_num=1,
        always_start_from_first_ann_frame=False,
        non_overlap_masks_for_mem_enc=False,
        non_overlap_masks_for_output=False,
        max_cond_frames_in_attn=4,
        offload_output_to_cpu_for_eval=False,
        sam_mask_decoder_extra_args={
            "dynamic_multimask_via_stability": True,
            "dynamic_multimask_stability_delta": 0.05,
            "dynamic_multimask_stability_thresh": 0.98,
        },
        clear_non_cond_mem_around_input=True,
        fill_hole_area=0,
        use_memory_selection=a.temporal_disambiguation,
    )


def build_video_model(a: Sam3VideoArch):
    """An eval-mode ``Sam3VideoInferenceWithInstanceInteractivity`` on CPU, untrained.

    Callers load weights (``video.load_video_model``) or initialise them
    (``tiny_video``): some parameters are ``torch.empty`` upstream.
    """
    a.detector.validate()
    compat.ensure()
    from sam3.model.sam3_image import Sam3ImageOnVideoMultiGPU
    from sam3.model.sam3_video_inference import Sam3VideoInferenceWithInstanceInteractivity
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer
    from sam3.model.vl_combiner import SAM3VLBackbone

    from sam3ray.model.arch import _geometry_encoder, _heads, _transformer

    det = a.detector
    text = VETextEncoder(
        tokenizer=SimpleTokenizer(bpe_path=compat.bpe_path()),
        d_model=det.d_model,
        width=det.text_width,
        heads=det.text_heads,
        layers=det.text_layers,
    )
    scoring, seg_head = _heads(det)
    detector = Sam3ImageOnVideoMultiGPU(
        num_feature_levels=1,
        backbone=SAM3VLBackbone(scalp=1, visual=_vision_with_tracker_neck(det), text=text),
        transformer=_transformer(det),
        segmentation_head=seg_head,
        semantic_segmentation_head=None,
        input_geometry_encoder=_geometry_encoder(det),
        use_early_fusion=True,
        use_dot_prod_scoring=True,
        dot_prod_scoring=scoring,
        supervise_joint_box_scores=True,
    )
    model = Sam3VideoInferenceWithInstanceInteractivity(
        detector=detector,
        tracker=build_tracker(a),
        image_size=a.resolution,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        compile_model=False,
        **a.heuristic_kwargs(),
    )
    model.sam3ray_arch = a
    return model.eval()
