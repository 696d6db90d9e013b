"""A batch's post-processing: from grounding candidates on the device to columns.

Everything stays on the device until the end (``model.postprocess``): score
threshold (per-concept override), one exact batched NMS and ``max_det`` per
(image, concept) group (which merges the separate queries of a class's
synonyms, and keeps a concept's labels independent of the other concepts),
masks upsampled for the survivors only and run-length encoded there. One
device→host copy per batch carries the counts, scores, boxes and indices
(:class:`PendingBatch`); the host turns counts into COCO strings
(:class:`BatchDetections`), in another thread if the caller likes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from sam3ray.config.schema import InferenceConfig
from sam3ray.core.types import ConceptSet, Detection
from sam3ray.model.queries import Query

#: Mask pixels upsampled and encoded at once (~8 bytes each in flight: 128 MB).
MASK_PIXELS_PER_STEP = 16_000_000
#: Bytes per mask pixel in flight while encoding (float logits, bool, transposed
#: copy, change points): the post-processing buffer a memory plan reserves.
MASK_BYTES_PER_PIXEL = 8


def post_processing_bytes(max_imgsz: int | None) -> int:
    """Device memory a batch's post-processing needs beyond the forward, for a memory
    plan: the larger of an NMS step and a mask-encoding step. A step upsamples up to
    ``MASK_PIXELS_PER_STEP`` pixels, or one mask if it is larger: with ``max_imgsz``
    that is at most ``max_imgsz``², without it an image's full size, which no plan
    can know (a lake of >16 MP photos should set ``max_imgsz``)."""
    from sam3ray.model.postprocess import NMS_BYTES_PER_ELEMENT, NMS_ELEMENTS_PER_STEP

    mask_pixels = max(MASK_PIXELS_PER_STEP, (max_imgsz or 0) ** 2)
    return max(MASK_BYTES_PER_PIXEL * mask_pixels, NMS_BYTES_PER_ELEMENT * NMS_ELEMENTS_PER_STEP)


#: Columns of the per-detection block of the one device→host copy.
_IMAGE, _QUERY, _SCORE, _BOX, _AREA, _NCOUNTS = 0, 1, 2, 3, 7, 8
_META_COLUMNS = 9


@dataclass(frozen=True)
class BatchContext:
    """What post-processing needs from the engine (its settings, not its model)."""

    concepts: ConceptSet
    class_index: dict[str, int]  # class id -> position in ``concepts``
    config: InferenceConfig
    device: str
    stats: Any  # EngineStats: host time is added to it


def mask_grid(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """(h, w) of the grid masks are stored at: the image's own, or its long side capped
    at ``max_side`` (short side rounded, at least 1 pixel)."""
    if max_side is None or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    if width >= height:
        return max(1, round(height * scale)), max_side
    return max_side, max(1, round(width * scale))


@dataclass(frozen=True)
class BatchDetections:
    """A batch's detections as columns, sorted by image, then score (best first).

    Row builders read the columns directly; :meth:`per_image` gives
    :class:`~sam3ray.core.types.Detection` objects for the Python API.
    """

    n_images: int
    image: np.ndarray  # int64 [N]: index of the image in the batch
    class_id: np.ndarray  # object [N] str
    concept: np.ndarray  # object [N] str
    query: np.ndarray  # object [N] str (core.types.query_label)
    score: np.ndarray  # float32 [N]
    box: np.ndarray  # float32 [N, 4] x0, y0, x1, y1 in original pixels
    mask_rle: list[bytes]  # COCO compressed counts
    mask_size: np.ndarray  # int32 [N, 2] (h, w) of the mask grid
    area: np.ndarray  # int64 [N] mask pixels on that grid

    def __len__(self) -> int:
        return int(self.image.size)

    def counts(self) -> np.ndarray:
        """Detections per image (length ``n_images``)."""
        return np.bincount(self.image, minlength=self.n_images)

    def per_image(self) -> list[list[Detection]]:
        out: list[list[Detection]] = [[] for _ in range(self.n_images)]
        scores, boxes = self.score.tolist(), self.box.tolist()
        sizes, areas = self.mask_size.tolist(), self.area.tolist()
        for j, i in enumerate(self.image.tolist()):
            out[i].append(
                Detection(
                    class_id=self.class_id[j],
                    concept=self.concept[j],
                    query=self.query[j],
                    score=scores[j],
                    box=tuple(boxes[j]),
                    mask_rle=self.mask_rle[j],
                    mask_size=tuple(sizes[j]),
                    area=areas[j],
                )
            )
        return out


class PendingBatch:
    """A batch whose device work is done (or queued); :meth:`result` finishes it on the host."""

    def __init__(self, stats: Any, buffer: Any, event: Any, n: int, meta: dict) -> None:
        self._stats = stats
        self._buffer = buffer
        self._event = event
        self._n = n
        self._meta = meta

    def result(self) -> BatchDetections:
        """Wait for the one device→host copy and build the columns (COCO strings included)."""
        t0 = time.perf_counter()
        if self._event is not None:
            self._event.synchronize()
        data = self._buffer.numpy()
        n, meta = self._n, self._meta
        block = data[: n * _META_COLUMNS].reshape(n, _META_COLUMNS)
        counts = data[n * _META_COLUMNS :]
        from sam3ray.model.postprocess import coco_strings

        image = block[:, _IMAGE].copy()
        query = block[:, _QUERY]
        floats = block[:, _SCORE:_AREA].astype(np.int32).view(np.float32)
        rles = coco_strings(counts, block[:, _NCOUNTS])
        labels, class_ids, names = meta["labels"], meta["class_ids"], meta["names"]
        out = BatchDetections(
            n_images=meta["n_images"],
            image=image,
            class_id=class_ids[query],
            concept=names[query],
            query=labels[query],
            score=np.ascontiguousarray(floats[:, 0]),
            box=np.ascontiguousarray(floats[:, 1:5]),
            mask_rle=rles,
            mask_size=meta["grids"][image] if n else np.zeros((0, 2), np.int32),
            area=block[:, _AREA].copy(),
        )
        self._stats.host_s += time.perf_counter() - t0
        return out


def finish_batch(
    found: list[tuple],
    sizes: list[tuple[int, int]],
    queries: list[Query],
    ctx: BatchContext,
) -> PendingBatch:
    """Threshold survivors → boxes in pixels → NMS → max_det → masks → RLE counts,
    all on the device; then one queued copy to the host."""
    import torch
    import torch.nn.functional as F
    from sam3.model.box_ops import box_cxcywh_to_xyxy

    from sam3ray.model.postprocess import batched_nms, rle_counts

    dev = ctx.device
    if not found:  # no query at all (exemplar-only concepts without exemplars here)
        found = [_no_candidates(dev)]
    q, scores, boxes_cxcywh, low_masks = (
        parts[0] if len(parts) == 1 else torch.cat(parts) for parts in zip(*found)
    )
    del found
    q_image = torch.tensor([x.image for x in queries], dtype=torch.long).to(dev)
    q_class = torch.tensor([ctx.class_index[x.class_id] for x in queries]).to(dev)
    wh = torch.tensor([(w, h) for h, w in sizes], dtype=torch.float32).to(dev)
    image = q_image[q]
    size = wh[image]  # [N, 2] (w, h)
    boxes = box_cxcywh_to_xyxy(boxes_cxcywh) * size.repeat(1, 2)
    # Clamp first: NMS must judge the boxes the caller receives.
    boxes[:, 0::2] = torch.minimum(boxes[:, 0::2].clamp(min=0), size[:, 0:1])
    boxes[:, 1::2] = torch.minimum(boxes[:, 1::2].clamp(min=0), size[:, 1:2])
    keep = torch.arange(q.numel(), device=dev)
    # NMS and max_det act per (image, concept): a concept's labels never depend on
    # which other concepts ran with it (a relabel of one concept equals a full run).
    groups = image * len(ctx.concepts) + q_class[q]
    if ctx.config.nms and q.numel() > 1:
        keep = keep[batched_nms(boxes, scores, groups, float(ctx.config.iou))]
    # Best first per group; equal scores keep candidate order (stable sorts).
    keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
    keep = keep[torch.argsort(groups[keep], stable=True)]
    _, per_group = torch.unique_consecutive(groups[keep], return_counts=True)
    first = torch.repeat_interleave(torch.cumsum(per_group, 0) - per_group, per_group)
    keep = keep[torch.arange(keep.numel(), device=dev) - first < ctx.config.max_det]
    # Then best first per image, as the caller reads them.
    keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
    keep = keep[torch.argsort(image[keep], stable=True)]
    n_per_image = torch.bincount(image[keep], minlength=len(sizes)).tolist()
    grids = [mask_grid(h, w, ctx.config.max_imgsz) for h, w in sizes]
    counts, n_counts, areas = [], [], []
    start = 0
    for i, n in enumerate(n_per_image):
        if n == 0:
            continue
        gh, gw = grids[i]
        step = max(1, MASK_PIXELS_PER_STEP // (gh * gw))
        for s in range(start, start + n, step):
            low = low_masks[keep[s : min(s + step, start + n)]].float()
            up = F.interpolate(low[:, None], (gh, gw), mode="bilinear", align_corners=False)
            # logit > 0  <=>  sigmoid > 0.5 (Sam3Processor's test), without the sigmoid
            c, k, a = rle_counts(up[:, 0] > 0)
            del up
            counts.append(c)
            n_counts.append(k)
            areas.append(a)
        start += n
    n = int(keep.numel())
    meta_block = torch.zeros((n, _META_COLUMNS), dtype=torch.int64, device=dev)
    if n:
        meta_block[:, _IMAGE] = image[keep]
        meta_block[:, _QUERY] = q[keep]
        floats = torch.cat([scores[keep, None], boxes[keep]], dim=1).float()
        meta_block[:, _SCORE:_AREA] = floats.contiguous().view(torch.int32).long()
        meta_block[:, _AREA] = torch.cat(areas)
        meta_block[:, _NCOUNTS] = torch.cat(n_counts)
    buffer = torch.cat([meta_block.flatten(), *counts])
    event = None
    if buffer.device.type == "cuda":
        buffer = buffer.to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    meta = {
        "n_images": len(sizes),
        "grids": np.array(grids, dtype=np.int32).reshape(-1, 2),
        "labels": np.array([x.label for x in queries] or [""], dtype=object),
        "class_ids": np.array([x.class_id for x in queries] or [""], dtype=object),
        "names": np.array(
            [ctx.concepts.by_id[x.class_id].name for x in queries] or [""], dtype=object
        ),
    }
    return PendingBatch(ctx.stats, buffer, event, n, meta)


def _no_candidates(device: str) -> tuple:
    import torch

    return (
        torch.zeros(0, dtype=torch.long, device=device),
        torch.zeros(0, device=device),
        torch.zeros((0, 4), device=device),
        torch.zeros((0, 1, 1), device=device),
    )
