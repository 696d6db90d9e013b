"""Device post-processing against the references it replaces (CPU torch).

- ``rle_counts`` + ``coco_strings`` give pycocotools' compressed counts byte for byte
  (random and blob masks, odd sizes, empty, full, 1×N, N×1, and huge runs);
- ``batched_nms`` keeps exactly what the old loop kept: ``torchvision::nms`` called
  once per (image, class) group.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from sam3ray.model import compat
from sam3ray.model.postprocess import batched_nms, box_iou, coco_strings, rle_counts

compat.ensure()  # torchvision::nms exists (a plain-torch kernel on CPU-only torch)


def pycoco(masks: np.ndarray) -> tuple[list[bytes], list[int]]:
    """The reference: pycocotools on an N×H×W boolean stack."""
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [r["counts"] for r in rles], [int(a) for a in mask_utils.area(rles)]


def encoded(masks: np.ndarray) -> tuple[list[bytes], list[int]]:
    counts, lengths, areas = rle_counts(torch.from_numpy(masks))
    return coco_strings(counts.numpy(), lengths.numpy()), areas.tolist()


def blobs(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Discs and rectangles, like real instance masks (long runs, few changes per column)."""
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        r = rng.integers(1, max(2, max(h, w) // 2))
        out[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        if i % 3 == 0:
            out[i, : h // 3, w // 2 :] = True
    return out


CASES = {
    "random 7x5": lambda r: r.random((6, 7, 5)) > 0.5,
    "random sparse 33x65": lambda r: r.random((5, 33, 65)) > 0.97,
    "blobs 777x1036": lambda r: blobs(r, 12, 777, 1036),
    "blobs odd 251x397": lambda r: blobs(r, 9, 251, 397),
    "empty": lambda r: np.zeros((3, 40, 30), dtype=bool),
    "full": lambda r: np.ones((3, 40, 30), dtype=bool),
    "1xN": lambda r: r.random((4, 1, 257)) > 0.5,
    "Nx1": lambda r: r.random((4, 257, 1)) > 0.5,
    "1x1": lambda r: np.array([[[True]], [[False]]]),
    "starts with 1": lambda r: np.pad(np.ones((2, 5, 5), bool), ((0, 0), (0, 3), (0, 3))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rle_is_byte_identical_to_pycocotools(case):
    masks = CASES[case](np.random.default_rng(7))
    got, areas = encoded(masks)
    want, want_areas = pycoco(masks)
    assert got == want
    assert areas == want_areas == [int(m.sum()) for m in masks]


def test_mixed_masks_in_one_call_and_empty_batch():
    """Many masks of one size in one call (as the engine does per image), and none at all."""
    rng = np.random.default_rng(3)
    masks = np.concatenate(
        [np.zeros((1, 61, 47), bool), blobs(rng, 5, 61, 47), np.ones((1, 61, 47), bool)]
    )
    masks = masks[rng.permutation(len(masks))]
    assert encoded(masks) == pycoco(masks)
    assert encoded(np.zeros((0, 8, 8), bool)) == ([], [])


def test_large_counts_use_many_characters():
    """Runs far beyond 5-bit groups (a 3000×4000 mask with one long run, and its
    complement): values needing 5+ characters, negative differences included."""
    h, w = 3000, 4000
    masks = np.zeros((2, h, w), dtype=bool)
    masks[0, :, 1000:3999] = True  # one run of 2999 columns
    masks[1] = ~masks[0]
    masks[1, 1500, 2000] = True
    got, areas = encoded(masks)
    want, want_areas = pycoco(masks)
    assert got == want and areas == want_areas
    assert max(map(len, got)) > 6


# --------------------------------------------------------------------------- NMS


def per_group_loop(boxes, scores, groups, iou):
    """The engine's old NMS: torchvision::nms once per group (candidate order in each).

    On this project's CPU-only torch, ``torchvision::nms`` is ``compat.nms_reference``
    (the wheel's C++ ops do not load): a plain greedy loop, so the tests here check
    the batched fixed-point NMS against the greedy algorithm with the same IoU
    formula. ``tests/gpu`` checks it against torchvision's own CUDA kernel."""
    keep = []
    for g in dict.fromkeys(groups.tolist()):
        idx = torch.nonzero(groups == g).flatten()
        if len(idx) > 1:
            kept = torch.ops.torchvision.nms(boxes[idx], scores[idx], float(iou))
            keep.extend(idx[kept].tolist())
        else:
            keep.extend(idx.tolist())
    return sorted(keep)


def random_boxes(rng: np.random.Generator, n: int, size: float = 500.0):
    xy = rng.random((n, 2)) * size
    wh = rng.random((n, 2)) * size / 3 + 1
    boxes = np.concatenate([xy, xy + wh], axis=1).clip(0, size)
    return torch.tensor(boxes, dtype=torch.float32)


@pytest.mark.parametrize("iou", [0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("seed", range(4))
def test_batched_nms_keeps_what_the_per_group_loop_keeps(iou, seed):
    rng = np.random.default_rng(seed)
    n = 400
    boxes = random_boxes(rng, n)
    # near-duplicates (what NMS exists for) and exact score ties
    dup = rng.integers(0, n, 120)
    noise = rng.normal(0, 1, (60, 4)) * rng.choice([0.3, 4.0], (60, 1))
    boxes[dup[:60]] = boxes[dup[60:]] + torch.tensor(noise, dtype=torch.float32)
    scores = torch.tensor(rng.random(n), dtype=torch.float32)
    scores[rng.integers(0, n, 30)] = 0.5
    groups = torch.tensor(rng.integers(0, 12, n))
    groups[dup[:60]] = groups[dup[60:]]  # most near-duplicates in one group
    want = per_group_loop(boxes, scores, groups, iou)
    got = torch.nonzero(batched_nms(boxes, scores, groups, iou)).flatten().tolist()
    assert got == want
    assert 0 < len(want) < n  # the threshold had work to do


def test_batched_nms_long_suppression_chain_and_edge_cases():
    # A chain: each box overlaps the next by IoU ~0.82 and scores descend, so greedy keeps
    # every second one; the fixed point needs many rounds to get there.
    n = 60
    x0 = torch.arange(n, dtype=torch.float32) * 10
    boxes = torch.stack([x0, torch.zeros(n), x0 + 100, torch.full((n,), 50.0)], dim=1)
    scores = torch.linspace(1, 0.1, n)
    groups = torch.zeros(n, dtype=torch.long)
    got = torch.nonzero(batched_nms(boxes, scores, groups, 0.8)).flatten().tolist()
    assert got == per_group_loop(boxes, scores, groups, 0.8) == list(range(0, n, 2))
    # nothing, one, identical boxes with equal scores (the first wins), zero-area boxes
    empty = batched_nms(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert empty.shape == (0,)
    one = batched_nms(boxes[:1], scores[:1], groups[:1], 0.5)
    assert one.tolist() == [True]
    same = torch.tensor([[0, 0, 10, 10]] * 3, dtype=torch.float32)
    tied = batched_nms(same, torch.ones(3), torch.tensor([0, 0, 1]), 0.5)
    assert tied.tolist() == [True, False, True]
    flat = torch.tensor([[5, 5, 5, 9], [5, 5, 5, 9]], dtype=torch.float32)
    assert batched_nms(flat, torch.ones(2), torch.zeros(2, dtype=torch.long), 0.5).tolist() == [
        True,
        True,
    ]


def test_box_iou_by_hand_and_batched():
    a = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 0, 5]], dtype=torch.float32)
    b = torch.tensor([[5, 5, 15, 15], [20, 20, 30, 30]], dtype=torch.float32)
    want = torch.tensor([[25 / 175, 0.0], [25 / 175, 0.0], [0.0, 0.0]])  # a flat box: 0
    assert torch.allclose(box_iou(a, b), want)
    assert torch.equal(box_iou(a[None].expand(3, 3, 4), b[None].expand(3, 2, 4))[1], box_iou(a, b))
