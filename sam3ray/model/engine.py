"""Concept-grouped batched SAM 3 inference: the module that drives ``sam3``'s image model.

For a batch of B images and a concept set, the reference loop
(``Sam3Processor``) runs the text encoder and one grounding forward per
(image, prompt). Here the vision backbone runs once per image, each unique
text is encoded once for the life of the engine, and all (image, query) pairs
go through ``Sam3Image.forward_grounding`` in packs of ``queries_per_forward``
(``FindStage.img_ids``/``text_ids`` index the image and text batches; exemplar
boxes and points ride in one padded ``Prompt``).

Pixels: each original image is resized once to the model's input, by the very
transform ``Sam3Processor`` applies, on the model's device; boxes and masks
come back in original pixels (masks on a grid capped by ``inference.max_imgsz``
when that is set).

Post-processing stays on the device until one copy to the host per batch
(``model.batches``: threshold, NMS and ``max_det`` per (image, concept), masks
and their run-length counts).

Two phases, so a caller can overlap them: :meth:`Sam3Engine.launch` does the
device work of a batch and returns a :class:`PendingBatch`; its ``result()``
does the host work (in another thread if you like) while the next batch runs.
:meth:`Sam3Engine.predict` is both in one call.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sam3ray.config.schema import InferenceConfig, ModelConfig
from sam3ray.core.types import ConceptSet, Detection, ImageExemplars
from sam3ray.model.batches import (
    BatchContext,
    PendingBatch,
    finish_batch,
    post_processing_bytes,
)
from sam3ray.model.device import (
    device_type,
    is_out_of_memory,
    resolve_device,
    resolve_dtype,
    to_bfloat16_weights,
)
from sam3ray.model.queries import Query, build_queries, validate_images
from sam3ray.storage.location import Location

logger = logging.getLogger(__name__)


#: On CPU the grounding forward is memory-bound: packs beyond ~8 queries spill the
#: caches and run slower (tiny model, 8 images × 10 concepts: 64 → 2.6 s, 8 → 2.0 s).
CPU_QUERIES_PER_FORWARD = 8
#: images_per_batch "auto" where no device memory is measured (CPU).
CPU_IMAGES_PER_BATCH = 8
_MODEL_DEFAULTS = ModelConfig.model_fields


@dataclass
class EngineStats:
    """Counters that prove the work-sharing (tests assert on them)."""

    images: int = 0
    backbone_images: int = 0
    texts_encoded: int = 0
    grounding_forwards: int = 0
    queries: int = 0
    infer_s: float = 0.0  # device phase (launch)
    host_s: float = 0.0  # host phase (PendingBatch.result)
    out_of_memory: int = 0  # packs redone smaller after an out-of-memory error


class Sam3Engine:
    """Batched SAM 3 image inference over a fixed concept set.

    Construct once per worker (the model and the text-feature cache live as
    long as the engine) and call :meth:`predict` (or :meth:`launch` and
    ``result()``) per batch of images. The engine owns ``model``: it moves it
    to ``device`` and, for ``dtype="bfloat16"``, casts its weights.
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
        gpu_share: float = 1.0,
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
        self.gpu_share = gpu_share
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
        class_index = {c.class_id: i for i, c in enumerate(concepts)}
        self._batch_context = BatchContext(
            concepts, class_index, self.config, self.device, self.stats
        )
        self._pack_cap: int | None = None  # lowered after an out-of-memory error
        self._plan: Any = None
        if self.dtype == "bfloat16":
            to_bfloat16_weights(self.model)
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
        gpu_share: float = 1.0,
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
            gpu_share=gpu_share,
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
        *,
        gpu_share: float = 1.0,
    ) -> Sam3Engine:
        """The engine a job's ``model`` and ``inference`` sections describe.

        ``checkpoint`` carries the storage options (``JobConfig.checkpoint_location``);
        by default the model section's own. ``gpu_share`` is the fraction of the
        device this engine may plan to use (``resources.gpus_per_actor``).
        """
        return cls.from_checkpoint(
            checkpoint or Location(model.checkpoint, model.storage_options),
            concepts,
            inference,
            device=model.device,
            dtype=model.dtype,
            compile=model.compile,
            cache_dir=model.cache_dir,
            gpu_share=gpu_share,
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
        only: Collection[str] | None = None,
    ) -> list[list[Detection]]:
        """Detections per image, in the order of ``images``.

        ``images`` are H×W×3 uint8 RGB arrays at their original size; boxes,
        exemplar coordinates and masks are in their pixels. ``only`` limits the run
        to these class ids (a relabel of some concepts gives what a full run gives for
        them: every per-concept choice, NMS and ``max_det``, is made per concept).
        Raises ``ValueError`` naming the offending item before any work is done.
        Runs in batches of the plan's ``images_per_batch``, as the job does, so a
        list of any length costs one batch of device memory at a time.
        """
        sizes = validate_images(images)
        build_queries(self.concepts, exemplars, sizes, len(images))  # every check, up front
        step = max(1, int(self.batch_plan().images_per_batch))
        out: list[list[Detection]] = []
        for s in range(0, len(images), step):
            part = None if exemplars is None else exemplars[s : s + step]
            out += self.launch(images[s : s + step], part, only).result().per_image()
        return out

    def launch(
        self,
        images: Sequence[np.ndarray],
        exemplars: Sequence[ImageExemplars | None] | None = None,
        only: Collection[str] | None = None,
    ) -> PendingBatch:
        """The device phase of one batch of :meth:`predict` (all of ``images`` at once:
        the caller sizes the batch): forward, selection, NMS and mask encoding, up to
        the one bulk device→host copy, which is queued; ``result()`` on the returned
        batch finishes it. Shapes depend on the data, so it still synchronises with
        the device a few times per batch and per pack (candidate counts, NMS rounds)."""
        import torch

        sizes = validate_images(images)
        concepts = self.concepts
        if only is not None:
            keep = set(only)
            concepts = ConceptSet(tuple(c for c in concepts if c.class_id in keep))
            exemplars = _only_exemplars(exemplars, keep)
        queries = build_queries(concepts, exemplars, sizes, len(images))
        self.batch_plan()  # measured before a batch holds device memory (CUDA, "auto")
        t0 = time.perf_counter()
        with torch.inference_mode(), self.autocast():
            pixels = self._preprocess(images)
            backbone_out = self.model.backbone.forward_image(pixels)
            del pixels
            self.stats.backbone_images += len(images)
            self.encode_texts({q.text for q in queries})
            found = self._ground_all(backbone_out, queries)
            del backbone_out
            pending = finish_batch(found, sizes, queries, self._batch_context)
        self.stats.images += len(images)
        self.stats.queries += len(queries)
        self.stats.infer_s += time.perf_counter() - t0
        return pending

    def batch_plan(self) -> Any:
        """The :class:`~sam3ray.model.memory.BatchPlan` this engine runs with.

        Explicit ``images_per_batch``/``queries_per_forward`` are kept; "auto" is
        sized from measured activation sizes and this engine's share of the CUDA
        device; on CPU "auto" is 8 and 8 (and packs are capped at 8 there).
        """
        if self._plan is None:
            self._plan = self._make_plan()
        return self._plan

    def release_memory(self) -> None:
        """Give cached device memory back after an out-of-memory error."""
        import torch

        gc.collect()
        if device_type(self.device) == "cuda":
            torch.cuda.empty_cache()

    def autocast(self):
        """The autocast context of this engine's dtype (none for float32)."""
        import torch

        if self.dtype == "bfloat16":
            return torch.autocast(device_type(self.device), dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def encode_texts(self, texts: set[str]) -> None:
        """Encode only texts never seen by this engine, all in one forward."""
        missing = sorted(t for t in texts if t not in self._text_cache)
        if not missing:
            return
        out = self.model.backbone.forward_text(missing, device=self.device)
        feats, mask = out["language_features"], out["language_mask"]  # [S,T,D], [T,S]
        for i, text in enumerate(missing):
            self._text_cache[text] = (feats[:, i : i + 1].clone(), mask[i : i + 1].clone())
        self.stats.texts_encoded += len(missing)

    def text_features(self, text: str) -> tuple[Any, Any]:
        """(features [S, 1, D], mask [1, S]) of an encoded text."""
        return self._text_cache[text]

    # ------------------------------------------------------------------ internals
    def _make_plan(self) -> Any:
        from sam3ray.model.memory import (
            BatchPlan,
            device_budget,
            measure_activations,
            plan_batches,
        )

        ipb, qpf = self.config.images_per_batch, self.config.queries_per_forward
        if device_type(self.device) != "cuda":
            images = CPU_IMAGES_PER_BATCH if ipb == "auto" else int(ipb)
            queries = CPU_QUERIES_PER_FORWARD if qpf == "auto" else int(qpf)
            return BatchPlan(images, queries, "CPU defaults (no device memory to plan)")
        if ipb != "auto" and qpf != "auto":
            return BatchPlan(int(ipb), int(qpf), "as configured")
        sizes = measure_activations(self)
        self.release_memory()
        budget = device_budget(self.device, self.gpu_share)
        per_image_queries = sum(max(1, len(c.texts)) for c in self.concepts)
        mask_bytes = post_processing_bytes(self.config.max_imgsz)
        plan = plan_batches(sizes, budget, per_image_queries, ipb, qpf, mask_bytes=mask_bytes)
        logger.info(
            "batch plan: %d images, %d queries per forward (%s; per image %.0f MiB, "
            "per query %.0f MiB)",
            plan.images_per_batch,
            plan.queries_per_forward,
            plan.reason,
            sizes.per_image / 2**20,
            sizes.per_query / 2**20,
        )
        return plan

    def _preprocess(self, images: Sequence[np.ndarray]):
        """Each original image to the model input, as ``Sam3Processor.set_image`` does it
        (uint8 CHW tensor on the device, then the same v2 transform): one resize."""
        import torch

        batch = []
        for img in images:
            t = (
                torch.from_numpy(np.array(img, copy=not img.flags.writeable))
                .permute(2, 0, 1)
                .to(self.device)
            )
            batch.append(self._transform(t))
        return torch.stack(batch)

    def _pack_size(self) -> int:
        cap = int(self.batch_plan().queries_per_forward)
        if device_type(self.device) != "cuda":
            cap = min(cap, CPU_QUERIES_PER_FORWARD)
        if self._pack_cap is not None:
            cap = min(cap, self._pack_cap)
        return max(1, cap)

    def _ground_all(self, backbone_out: dict, queries: list[Query]) -> list[tuple]:
        """Every pack through the detector; a pack that runs out of memory is redone in
        halves (and later packs stay at that size)."""
        found = []
        start = 0
        while start < len(queries):
            step = self._pack_size()
            pack = queries[start : start + step]
            try:
                found.append(self._ground(backbone_out, pack, start))
            except Exception as exc:
                if not is_out_of_memory(exc) or len(pack) == 1:
                    raise
                oom = True
            else:
                oom = False
                start += len(pack)
            if oom:  # outside the except block: its traceback no longer pins the pack
                self._pack_cap = max(1, len(pack) // 2)
                self.stats.out_of_memory += 1
                logger.warning(
                    "out of memory in a pack of %d queries; now %d", len(pack), self._pack_cap
                )
                self.release_memory()
        return found

    def _ground(self, backbone_out: dict, queries: list[Query], offset: int) -> tuple:
        """One pack: (query index, score, box cxcywh, mask logits) of the candidates above
        their threshold, copied out so the pack's tensors can go."""
        import torch

        texts = sorted({q.text for q in queries})
        text_index = {t: i for i, t in enumerate(texts)}
        feats = torch.cat([self._text_cache[t][0] for t in texts], dim=1)
        masks = torch.cat([self._text_cache[t][1] for t in texts], dim=0)
        dev = self.device
        out = self.forward_pack(
            backbone_out,
            torch.tensor([q.image for q in queries], dtype=torch.long).to(dev),
            torch.tensor([text_index[q.text] for q in queries]).to(dev),
            feats,
            masks,
            _prompt(queries, dev),
        )
        self.stats.grounding_forwards += 1
        return self._select(out, queries, offset)

    def forward_pack(
        self,
        backbone_out: dict,
        img_ids: Any,
        text_ids: Any,
        feats: Any,
        masks: Any,
        prompt: Any = None,
    ) -> dict:
        """One grounding forward: query j looks at image ``img_ids[j]`` through text
        ``text_ids[j]`` of ``feats``/``masks``, with row j of ``prompt`` (default: no
        exemplars). The engine's packs and the memory planner's measurements run this."""
        from sam3.model.data_misc import FindStage

        find = FindStage(
            img_ids=img_ids,
            text_ids=text_ids,
            input_boxes=None,
            input_boxes_mask=None,
            input_boxes_label=None,
            input_points=None,
            input_points_mask=None,
        )
        if prompt is None:
            prompt = self.model._get_dummy_prompt(num_prompts=len(img_ids))
        return self.model.forward_grounding(
            backbone_out={**backbone_out, "language_features": feats, "language_mask": masks},
            find_input=find,
            find_target=None,
            geometric_prompt=prompt,
        )

    def _select(self, out: dict, queries: list[Query], offset: int) -> tuple:
        """The candidates of one pack's output above their class's threshold."""
        import torch

        dev = self.device
        probs = out["pred_logits"].float().sigmoid().squeeze(-1)
        probs = probs * out["presence_logit_dec"].float().sigmoid()  # [Q, nq] * [Q, 1]
        thresholds = torch.tensor([self._threshold(q.class_id) for q in queries]).to(dev)
        q_idx, d_idx = (probs >= thresholds[:, None]).nonzero(as_tuple=True)
        # Copies of the survivors only: views would pin this pack's full mask tensor
        # (queries × num_queries × h' × w') until the batch ends.
        return (
            q_idx + offset,
            probs[q_idx, d_idx],
            out["pred_boxes"][q_idx, d_idx].float(),
            out["pred_masks"][q_idx, d_idx],
        )

    def _threshold(self, class_id: str) -> float:
        c = self.concepts.by_id[class_id]
        return self.config.conf if c.min_score is None else c.min_score


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


def _only_exemplars(
    exemplars: Sequence[ImageExemplars | None] | None, keep: set[str]
) -> Sequence[ImageExemplars | None] | None:
    if exemplars is None:
        return None
    return [None if e is None else {c: v for c, v in e.items() if c in keep} for e in exemplars]
