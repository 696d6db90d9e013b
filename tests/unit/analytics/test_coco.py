"""COCO export: loads in pycocotools, self-evaluates to AP 1.0, masks equal the Parquet's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from test_scan import CIRCLE, RING, SQUARE, UNUSED, build_output

from sam3ray.analytics.coco import export_coco


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return build_output(str(root / "out"), {}, str(root / "images"))


@pytest.fixture(scope="module")
def exported(synthetic, tmp_path_factory):
    d = tmp_path_factory.mktemp("coco-files")
    done = export_coco(synthetic.loc, synthetic.at(str(d / "coco.json")),
                       results=synthetic.at(str(d / "res.json")))  # fmt: skip
    return done, COCO(done.path)


def _key(image: dict, ann: dict) -> tuple:
    return image["sam3ray_image_id"], image.get("frame_index"), ann["category_id"], ann["score"]


def test_categories_images_and_videos(synthetic, exported):
    done, gt = exported
    cats = gt.loadCats(gt.getCatIds())
    # ids 1..N by sorted UUID, the UUID kept; the concept without detections is a category too
    assert [(c["id"], c["class_id"], c["name"]) for c in cats] == [
        (1, UNUSED, "unused"),
        (2, CIRCLE, "circle"),
        (3, SQUARE, "square"),
        (4, RING, "ring"),
    ]
    images = gt.loadImgs(gt.getImgIds())
    still = [i for i in images if "frame_index" not in i]
    frames = [i for i in images if "frame_index" in i]
    assert {i["sam3ray_image_id"] for i in still} == set(synthetic.ok_images)  # incl. no-detection
    assert {i["uri"] for i in still} == set(synthetic.ok_images.values())
    assert synthetic.error_uri not in {i["uri"] for i in images}
    assert sorted(i["frame_index"] for i in frames) == [0, 1, 2]
    assert {i["video_id"] for i in frames} == {1}
    video_uri = synthetic.output.rsplit("/", 1)[0] + "/images/clip.mp4"
    assert gt.dataset["videos"] == [
        {"id": 1, "sam3ray_image_id": synthetic.video_id, "uri": video_uri}
    ]
    assert [i["id"] for i in images] == list(range(1, len(images) + 1))
    for image in images:
        assert image["file_name"] and image["width"] > 0 and image["height"] > 0
    assert done.images == len(images) and done.categories == 4


def test_masks_boxes_and_scores_match_the_parquet(synthetic, exported):
    _, gt = exported
    anns = gt.loadAnns(gt.getAnnIds())
    assert len(anns) == len(synthetic.detections)
    cat_ids = {c["class_id"]: c["id"] for c in gt.loadCats(gt.getCatIds())}
    truth = {(d["image_id"], d["frame_index"], cat_ids[d["class_id"]], round(d["score"], 6)): d
             for d in synthetic.detections}  # fmt: skip
    for ann in anns:
        image = gt.imgs[ann["image_id"]]
        det = truth[_key(image, ann)]
        assert isinstance(ann["segmentation"]["counts"], str)
        assert ann["segmentation"]["size"] == [image["height"], image["width"]]
        assert np.array_equal(gt.annToMask(ann).astype(bool), det["mask"])
        x0, y0, x1, y1 = det["box"]
        assert ann["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-3)
        assert ann["area"] == det["area"] == det["mask"].sum()
        assert ann["iscrowd"] == 0
        assert ("track_id" in ann) == (det["frame_index"] is not None)


def test_self_evaluation_gives_ap_1(exported):
    done, gt = exported
    with open(done.results_path, encoding="utf-8") as f:
        results = json.load(f)
    assert set(results[0]) == {"image_id", "category_id", "segmentation", "bbox", "score"}
    for iou_type in ("segm", "bbox"):
        ev = COCOeval(gt, gt.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0), iou_type  # AP@[.5:.95]
        assert ev.stats[1] == pytest.approx(1.0), iou_type  # AP@.5
    assert len(gt.loadRes(done.results_path).anns) == len(results)  # the file path works too


def test_filters_keep_category_ids(synthetic, tmp_path):
    out = tmp_path / "sub.json"
    done = export_coco(synthetic.loc, synthetic.at(str(out)), concepts=["Ring", CIRCLE],
                       min_score=0.5)  # fmt: skip
    data = json.loads(out.read_text(encoding="utf-8"))
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(2, "circle"), (4, "ring")]
    expected = [d for d in synthetic.detections
                if d["class_id"] in (RING, CIRCLE) and d["score"] >= 0.5]  # fmt: skip
    assert done.annotations == len(data["annotations"]) == len(expected) > 0
    assert {a["category_id"] for a in data["annotations"]} == {2, 4}
    assert len(data["images"]) == done.images == len(synthetic.ok_images) + 3
    with pytest.raises(ValueError, match="unknown concept"):
        export_coco(synthetic.loc, synthetic.at(str(out)), concepts=["dog"])


def test_coco_cli(synthetic, tmp_path, capsys):
    from sam3ray.cli import main

    code = main(["export", "coco", synthetic.output, "--out", str(tmp_path / "c.json"),
                 "--results", str(tmp_path / "r.json"), "--min-score", "0.9"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "COCO:" in printed and "loadRes" in printed
    results = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert all(r["score"] >= 0.9 for r in results)
    assert main(["export", "coco", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
