"""Concept-grouped batched SAM 3 inference: the only module that drives ``sam3``.

For a batch of B images and a concept set, the reference loop
(``Sam3Processor``) runs the text encoder and one grounding forward per
(image, prompt). Here the vision backbone runs once per image, each unique
text is encoded once for the life of the engine, and all (image, query) pairs
go through ``Sam3Image.forward_grounding`` in packs of ``queries_per_forward``
(``FindStage.img_ids``/``text_ids`` index the image and text batches; exemplar
boxes and points ride in one padded ``Prompt``). Post-processing then runs per
image: score threshold (per-concept override), NMS within each class (which
merges the separate queries of a class's synonyms), ``max_det``, and masks
upsampled to original pixels only for the survivors, encoded as COCO RLE.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sam3ray.config.schema import InferenceConfig, ModelConfig
from sam3ray.core.masks import encode_rle_fortran
from sam3ray.core.types import ConceptSet, Detection, ImageExemplars
from sam3ray.model.queries import Query, build_queries, validate_images
from sam3ray.storage.location import Location

logger = logging.getLogger(__name__)


#: On CPU the grounding forward is memory-bound: packs beyond ~8 queries spill the
#: caches and run slower (tiny model, 8 images × 10 concepts: 64 → 2.6 s, 8 → 2.0 s).
CPU_QUERIES_PER_FORWARD = 8
#: Upper bound on float32 mask pixels upsampled at once (memory cap for huge images).
MASK_PIXELS_PER_STEP = 64_000_000
_MODEL_DEFAULTS = ModelConfig.model_fields


@dataclass
class EngineStats:
    """Counters that prove the work-sharing (tests assert on them)."""

    images: int = 0
    backbone_images: int = 0
    texts_encoded: int = 0
    grounding_forwards: int = 0
    queries: int = 0
    infer_s: float = 0.0


@dataclass
class _Candidate:
    image: int
    class_id: str
    query: Query
    score: float
    box_cxcywh: Any  # 4-tensor, normalised
    mask_logits: Any  # h'×w' tensor


@dataclass
class _PerImage:
    candidates: list[_Candidate] = field(default_factory=list)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device is 'cuda' but no CUDA device is visible")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """``model.dtype`` on a resolved device: auto is bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return dtype


class Sam3Engine:
    """Batched SAM 3 image inference over a fixed concept set.

    Construct once per worker (the model and the text-feature cache live as
    long as the engine) and call :meth:`predict` per batch of images.
    """

    def __init__(
        self,
        model: Any,
        concepts: ConceptSet,
        inference: InferenceConfig | None = None,
        *,
        device: str = _MODEL_DEFAULTS["device"].default,
        dtype: str = _MODEL_DEFAULTS["dtype"].default,
        resolution: int | None = None,
        model_id: str = "sam3",
    ) -> None:
        import torch
        from torchvision.transforms import v2

        if len(concepts) == 0:
            raise ValueError("the concept set is empty: give at least one concept")
        self.model = model
        self.concepts = concepts
        self.config = inference or InferenceConfig()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model_id = model_id
        self.resolution = resolution or _model_resolution(model)
        self._autocast = self.dtype == "bfloat16"
        self.stats = EngineStats()
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._transform = v2.Compose(  # identical to Sam3Processor's
            [
                v2.ToDtype(torch.uint8, scale=True),
                v2.Resize(size=(self.resolution, self.resolution)),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
            ]
        )
        self.model.to(self.device)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Location,
        concepts: ConceptSet,
        inference: InferenceConfig | None = None,
        *,
        device: str = _MODEL_DEFAULTS["device"].default,
        dtype: str = _MODEL_DEFAULTS["dtype"].default,
        compile: bool = _MODEL_DEFAULTS["compile"].default,
        cache_dir: str | None = None,
    ) -> Sam3Engine:
        """Load a checkpoint (path, ``Location`` with storage options, or hub id)."""
        from sam3ray.model.loader import load_checkpoint_into_new_model, resolve_checkpoint

        path = resolve_checkpoint(checkpoint, cache_dir=cache_dir)
        model, info = load_checkpoint_into_new_model(path)
        engine = cls(
            model,
            concepts,
            inference,
            device=device,
            dtype=dtype,
            resolution=info.arch.resolution,
            model_id=info.model_id,
        )
        if compile:
            engine.compile()
        return engine

    @classmethod
    def from_config(
        cls,
        model: ModelConfig,
        concepts: ConceptSet,
        inference: InferenceConfig,
        checkpoint: Location | None = None,
    ) -> Sam3Engine:
        """The engine a job's ``model`` and ``inference`` sections describe.

        ``checkpoint`` carries the storage options (``JobConfig.checkpoint_location``);
        by default the model section's own.
        """
        return cls.from_checkpoint(
            checkpoint or Location(model.checkpoint, model.storage_options),
            concepts,
            inference,
            device=model.device,
            dtype=model.dtype,
            compile=model.compile,
            cache_dir=model.cache_dir,
        )

    def compile(self) -> None:
        """torch.compile the vision backbone (fixed input shape; the dominant cost)."""
        import torch

        backbone = self.model.backbone
        backbone.forward_image = torch.compile(backbone.forward_image, dynamic=False)

    # ------------------------------------------------------------------ public API
    def predict(
        self,
        images: Sequence[np.ndarray],
        exemplars: Sequence[ImageExemplars | None] | None = None,
        orig_sizes: Sequence[tuple[int, int]] | None = None,
        only: Collection[str] | None = None,
    ) -> list[list[Detection]]:
        """Detections per image, in the order of ``images``.

        ``images`` are H×W×3 uint8 RGB arrays. ``orig_sizes[i] = (height, width)``
        says the array was already downscaled from that size (e.g. by the decode
        stage): boxes, masks and exemplar coordinates are then in those pixels.
        ``only`` limits the run to these class ids (a relabel of some concepts).
        Raises ``ValueError`` naming the offending item before any work is done.
        """
        import torch

        sizes = validate_images(images, orig_sizes)
        concepts = self.concepts
        if only is not None:
            concepts = ConceptSet(tuple(c for c in concepts if c.class_id in set(only)))
            exemplars = _only_exemplars(exemplars, set(only))
        queries = build_queries(concepts, exemplars, sizes, len(images))
        t0 = time.perf_counter()
        with torch.inference_mode(), self._autocast_ctx():
            pixel_batch = self._preprocess(images)
            backbone_out = self.model.backbone.forward_image(pixel_batch)
            self.stats.backbone_images += len(images)
            self._encode_texts({q.text for q in queries})
            per_image = [_PerImage() for _ in images]
            step = self._pack_size()
            for start in range(0, len(queries), step):
                self._ground(backbone_out, queries[start : start + step], per_image)
            results = [self._finish(i, per_image[i], sizes[i]) for i in range(len(images))]
        self.stats.images += len(images)
        self.stats.queries += len(queries)
        self.stats.infer_s += time.perf_counter() - t0
        return results

    # ------------------------------------------------------------------ internals
    def _autocast_ctx(self):
        import contextlib

        import torch

        if self._autocast:
            return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _preprocess(self, images: Sequence[np.ndarray]):
        import torch

        from sam3ray.sources.images import downscale_long_side

        batch = []
        for img in images:
            img = downscale_long_side(img, self.config.max_imgsz)
            t = (
                torch.from_numpy(np.array(img, copy=not img.flags.writeable))
                .permute(2, 0, 1)
                .to(self.device)
            )
            batch.append(self._transform(t))
        return torch.stack(batch)

    def _encode_texts(self, texts: set[str]) -> None:
        """Encode only texts never seen by this engine, all in one forward."""
        missing = sorted(t for t in texts if t not in self._text_cache)
        if not missing:
            return
        out = self.model.backbone.forward_text(missing, device=self.device)
        feats, mask = out["language_features"], out["language_mask"]  # [S,T,D], [T,S]
        for i, text in enumerate(missing):
            self._text_cache[text] = (feats[:, i : i + 1].clone(), mask[i : i + 1].clone())
        self.stats.texts_encoded += len(missing)

    def _ground(self, backbone_out: dict, queries: list[Query], per_image: list[_PerImage]) -> None:
        import torch
        from sam3.model.data_misc import FindStage

        texts = sorted({q.text for q in queries})
        text_index = {t: i for i, t in enumerate(texts)}
        feats = torch.cat([self._text_cache[t][0] for t in texts], dim=1)
        masks = torch.cat([self._text_cache[t][1] for t in texts], dim=0)
        dev = self.device
        find = FindStage(
            img_ids=torch.tensor([q.image for q in queries], device=dev, dtype=torch.long),
            text_ids=torch.tensor([text_index[q.text] for q in queries], device=dev),
            input_boxes=None,
            input_boxes_mask=None,
            input_boxes_label=None,
            input_points=None,
            input_points_mask=None,
        )
        out = self.model.forward_grounding(
            backbone_out={**backbone_out, "language_features": feats, "language_mask": masks},
            find_input=find,
            find_target=None,
            geometric_prompt=_prompt(queries, dev),
        )
        self.stats.grounding_forwards += 1
        probs = out["pred_logits"].float().sigmoid().squeeze(-1)
        probs = probs * out["presence_logit_dec"].float().sigmoid()  # [Q, nq] * [Q, 1]
        boxes = out["pred_boxes"].float()
        pred_masks = out["pred_masks"]
        thresholds = torch.tensor(
            [self._threshold(q.class_id) for q in queries], device=probs.device
        )
        keep = (probs >= thresholds[:, None]).nonzero()
        # Copy out only the survivors: views would pin this pack's full mask
        # tensor (queries × num_queries × h' × w') until the batch ends.
        q_idx, d_idx = keep[:, 0], keep[:, 1]
        kept_scores = probs[q_idx, d_idx].tolist()
        kept_boxes = boxes[q_idx, d_idx]
        kept_masks = pred_masks[q_idx, d_idx]
        for j, qi in enumerate(q_idx.tolist()):
            q = queries[qi]
            per_image[q.image].candidates.append(
                _Candidate(q.image, q.class_id, q, kept_scores[j], kept_boxes[j], kept_masks[j])
            )

    def _pack_size(self) -> int:
        cap = self.config.queries_per_forward
        if self.device == "cpu":
            cap = min(cap, CPU_QUERIES_PER_FORWARD)
        return max(1, cap)

    def _threshold(self, class_id: str) -> float:
        c = self.concepts.by_id[class_id]
        return self.config.conf if c.min_score is None else c.min_score

    def _finish(self, index: int, acc: _PerImage, size: tuple[int, int]) -> list[Detection]:
        import torch
        import torch.nn.functional as F
        from sam3.model.box_ops import box_cxcywh_to_xyxy

        cands = acc.candidates
        if not cands:
            return []
        h, w = size
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=cands[0].box_cxcywh.device)
        boxes = box_cxcywh_to_xyxy(torch.stack([c.box_cxcywh for c in cands])) * scale
        scores = torch.tensor([c.score for c in cands], device=boxes.device)
        # Clamp first: NMS must judge the boxes the caller receives.
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        keep: list[int] = []
        by_class: dict[str, list[int]] = {}
        for i, c in enumerate(cands):
            by_class.setdefault(c.class_id, []).append(i)
        for idx in by_class.values():
            if self.config.nms and len(idx) > 1:
                sel = torch.tensor(idx, device=boxes.device)
                kept = torch.ops.torchvision.nms(boxes[sel], scores[sel], float(self.config.iou))
                keep.extend(sel[kept].tolist())
            else:
                keep.extend(idx)
        keep.sort(key=lambda i: (-cands[i].score, i))
        keep = keep[: self.config.max_det]
        step = max(1, MASK_PIXELS_PER_STEP // max(1, h * w))
        encoded: list[tuple[bytes, int]] = []
        for s in range(0, len(keep), step):
            low = torch.stack([cands[i].mask_logits for i in keep[s : s + step]]).float()
            up = F.interpolate(low[:, None], (h, w), mode="bilinear", align_corners=False)[:, 0]
            # logit > 0  <=>  sigmoid > 0.5 (Sam3Processor's test), without the sigmoid;
            # (N, W, H) C-order is the H×W×N Fortran layout pycocotools wants: no copy there.
            binary = (up > 0).to(torch.uint8).transpose(1, 2).contiguous().cpu().numpy()
            encoded.extend(encode_rle_fortran(binary.transpose(2, 1, 0)))
        out = []
        box_list = boxes.cpu().tolist()
        for i, (rle, area) in zip(keep, encoded):
            c = cands[i]
            out.append(
                Detection(
                    class_id=c.class_id,
                    concept=self.concepts.by_id[c.class_id].name,
                    query=c.query.label,
                    score=c.score,
                    box=tuple(box_list[i]),
                    mask_rle=rle,
                    mask_size=(h, w),
                    area=area,
                )
            )
        return out


def _only_exemplars(
    exemplars: Sequence[ImageExemplars | None] | None, keep: set[str]
) -> Sequence[ImageExemplars | None] | None:
    if exemplars is None:
        return None
    return [None if e is None else {c: v for c, v in e.items() if c in keep} for e in exemplars]


def _prompt(queries: list[Query], device: str):
    """One padded ``Prompt`` for a pack of queries (True in a mask = padding)."""
    import torch
    from sam3.model.geometry_encoders import Prompt

    q = len(queries)
    nb = max((len(x.boxes) for x in queries), default=0)
    npt = max((len(x.points) for x in queries), default=0)
    box_emb = torch.zeros(nb, q, 4)
    box_lab = torch.ones(nb, q, dtype=torch.long)
    box_mask = torch.ones(q, nb, dtype=torch.bool)
    pt_emb = torch.zeros(npt, q, 2)
    pt_lab = torch.ones(npt, q, dtype=torch.long)
    pt_mask = torch.ones(q, npt, dtype=torch.bool)
    for j, x in enumerate(queries):
        for k, (coords, positive) in enumerate(x.boxes):
            box_emb[k, j] = torch.tensor(coords)
            box_lab[k, j] = int(positive)
            box_mask[j, k] = False
        for k, (coords, positive) in enumerate(x.points):
            pt_emb[k, j] = torch.tensor(coords)
            pt_lab[k, j] = int(positive)
            pt_mask[j, k] = False
    return Prompt(
        box_embeddings=box_emb.to(device),
        box_mask=box_mask.to(device),
        box_labels=box_lab.to(device),
        point_embeddings=pt_emb.to(device) if npt else None,
        point_mask=pt_mask.to(device) if npt else None,
        point_labels=pt_lab.to(device) if npt else None,
    )


def _model_resolution(model: Any) -> int:
    """The input size the model was built for (set by arch.build_image_model;
    the released model's 1008 otherwise)."""
    arch = getattr(model, "sam3ray_arch", None)
    return int(arch.resolution) if arch is not None else 1008
