"""Real-size photos through the whole job, against the official ``Sam3Processor``.

Most photos are far larger than the model input. The job must label what the
official processor labels on the *original* image (one resize to the model
input; boxes and masks in original pixels): a landscape and a portrait photo
above 2000 px (the portrait stored sideways with an EXIF orientation, as phones
do), and a 3:1 panorama. They are objects in the session's moto S3 server, so
the actor's reader fetches them over HTTP in parallel. The same tolerances as
the engine's own fidelity test: scores within 1e-4, boxes within 0.5 px, mask
IoU >= 0.99; and the job equals the engine run directly (scores within 1e-5).
"""

from __future__ import annotations

import io
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image, ImageOps

from sam3ray.core.ids import input_id
from sam3ray.core.masks import decode_rle
from sam3ray.runner.job import run_job
from tests.support.images import scene

pytestmark = pytest.mark.integration

CAT = "6f1c2a4e-1b7d-4c1e-9a55-0d7f1c3e2b01"
PERSON = "0b8e3d52-9f4a-4f7b-8c21-5e6d7a8b9c02"
TEXTS = {CAT: "cat", PERSON: "person"}
CONF = 0.5
#: name -> (stored (h, w), upright (h, w), format, EXIF orientation)
PHOTOS = {
    "landscape.jpg": ((1500, 2000), (1500, 2000), "JPEG", None),
    "portrait-sideways.jpg": ((1600, 2400), (2400, 1600), "JPEG", 6),
    "panorama.png": ((1000, 3000), (1000, 3000), "PNG", None),
}


def photo_bytes(seed: int, stored: tuple[int, int], fmt: str, orientation: int | None) -> bytes:
    im = Image.fromarray(scene(seed, stored))
    buf = io.BytesIO()
    kw = {"quality": 92} if fmt == "JPEG" else {}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def large_job(it, moto_s3, ray_session, tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("large")
    bucket = moto_s3.new_bucket("large-photos")
    uris = {}
    for seed, (name, (stored, _, fmt, orientation)) in enumerate(PHOTOS.items()):
        data = photo_bytes(80 + seed, stored, fmt, orientation)
        uris[name] = moto_s3.put(bucket, f"photos/{name}", data)
    concepts = it.write_concepts(
        root / "concepts.csv", f"class_id,name,text\n{CAT},cat,cat\n{PERSON},person,person\n"
    )
    cfg = it.job_config(
        uris=[f"s3://{bucket}/photos/"],
        storage_options=moto_s3.storage_options,
        concepts=concepts,
        checkpoint=tiny_checkpoint,
        output=str(root / "labels"),
        actors=(1, 1),
        inference={"conf": CONF, "nms": False, "max_det": 10_000, "images_per_batch": 2},
    )
    summary = run_job(cfg)
    images, detections = it.read_output(str(root / "labels"))
    return {"uris": uris, "summary": summary, "images": images, "detections": detections}


def upright(data: bytes) -> Image.Image:
    """What a user hands Sam3Processor: the decoded photo, EXIF applied, RGB."""
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


def test_large_photos_match_the_official_processor(large_job, moto_s3, tiny_model):
    import torch
    from sam3.model.sam3_image_processor import Sam3Processor

    from sam3ray.storage.location import Location

    assert large_job["summary"]["ok"] == len(PHOTOS) and large_job["summary"]["errors"] == 0
    rows = large_job["images"].to_pylist()
    by_uri = {r["uri"]: r for r in rows}
    found = defaultdict(list)
    for d in large_job["detections"].to_pylist():
        found[(d["image_id"], str(d["class_id"]))].append(d)
    processor = Sam3Processor(
        tiny_model,
        resolution=tiny_model.sam3ray_arch.resolution,
        device="cpu",
        confidence_threshold=CONF,
    )
    compared = 0
    for name, (_, (h, w), _, _) in PHOTOS.items():
        uri = large_job["uris"][name]
        assert (by_uri[uri]["height"], by_uri[uri]["width"]) == (h, w), name  # upright
        image = upright(Location(uri, moto_s3.storage_options).read_bytes())
        for class_id, text in TEXTS.items():
            state = processor.set_image(image)
            state = processor.set_text_prompt(text, state)
            boxes = state["boxes"].float().clone()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            order = torch.argsort(state["scores"], descending=True, stable=True)
            ref_scores = state["scores"][order].tolist()
            ref_boxes = boxes[order].tolist()
            ref_masks = state["masks"][order, 0].numpy()
            mine = sorted(found[(input_id(uri), class_id)], key=lambda d: -d["score"])
            where = f"{name} ({h}x{w}), {text}"
            assert len(mine) == len(ref_scores), where
            for d, s, b, m in zip(mine, ref_scores, ref_boxes, ref_masks):
                assert d["mask_size"] == [h, w], where
                assert abs(d["score"] - s) <= 1e-4, where
                assert max(abs(x - y) for x, y in zip(d["box"], b)) <= 0.5, where
                mask = decode_rle(d["mask_rle"], d["mask_size"])
                union = np.logical_or(mask, m).sum()
                iou = 1.0 if union == 0 else np.logical_and(mask, m).sum() / union
                assert iou >= 0.99, (where, iou)
                assert d["area"] == int(mask.sum())
                compared += 1
    assert compared >= 6, "too few detections to say anything"


def test_large_photos_equal_the_engine_run_directly(it, large_job, moto_s3, tiny_checkpoint):
    from sam3ray import Concept, ConceptSet, InferenceConfig, Sam3Engine

    concepts = ConceptSet((Concept(CAT, "cat", ("cat",)), Concept(PERSON, "person", ("person",))))
    cfg = InferenceConfig(conf=CONF, nms=False, max_det=10_000)
    engine = Sam3Engine.from_checkpoint(tiny_checkpoint, concepts, cfg, device="cpu")
    uris = sorted(large_job["uris"].values())
    want: dict = defaultdict(list)
    for start in range(0, len(uris), 2):  # the job's batches: 2 images, in URI order
        chunk = uris[start : start + 2]
        images = [it.decode_like_the_job(u, moto_s3.storage_options) for u in chunk]
        for uri, dets in zip(chunk, engine.predict(images)):
            for d in dets:
                want[(input_id(uri), d.class_id)].append(float(d.score))
    want = {k: sorted(v, reverse=True) for k, v in want.items()}
    it.assert_same_as_engine(it.scores_by_key(large_job["detections"]), want)
