"""Labelling fingerprints per concept: what makes one concept of a committed shard stale.

What counts is derived from the config schema's ``affects_labels`` field metadata
(``sam3ray.config.label_fields``), per path, plus the concept itself and its
exemplars on the shard's own inputs: a global label setting relabels every concept,
``max_imgsz`` only images, a speed knob nothing, and a concept's own change (texts,
``min_score``, name, exemplars) only that concept.
"""

from __future__ import annotations

import json

import pytest

from sam3ray.config import JobConfig, VideoConfig, label_fields
from sam3ray.core.shards import InputRef, Shard, VideoInfo
from sam3ray.core.types import Concept, ConceptSet, Exemplar
from sam3ray.plan.fingerprint import ConceptPrints, job_settings
from sam3ray.plan.shards import new_image_tasks
from sam3ray.plan.video import video_shards
from sam3ray.sources.prompts import GeometricPrompts

CAT = "6f1c2a4e-1b7d-4c1e-9a55-0d7f1c3e2b01"
DOG = "7a2b3c4d-5e6f-4a1b-8c9d-0e1f2a3b4c02"
OWL = "1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e03"
CONCEPTS = ConceptSet((Concept(CAT, "cat", ("cat", "kitten")), Concept(DOG, "dog", ("dog",))))


def cfg(**overrides) -> JobConfig:
    data = {
        "input": {"uris": ["/data/images"]},
        "prompts": {"concepts": "/data/concepts.csv"},
        "model": {"checkpoint": "s3://models/sam3.pt"},
        "output": {"uri": "/data/labels"},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        data.setdefault(section, {})[key] = value
    return JobConfig.model_validate(data)


def by_path(config: JobConfig, concepts: ConceptSet = CONCEPTS) -> dict[str, dict[str, str]]:
    """{path: {class_id: fingerprint}} (what every shard without exemplars gets)."""
    return ConceptPrints(config, concepts).by_path


def image(config: JobConfig, concepts: ConceptSet = CONCEPTS) -> dict[str, str]:
    return by_path(config, concepts)["image"]


def changed(a: dict[str, str], b: dict[str, str]) -> set[str]:
    """Concepts of ``b`` whose fingerprint is not the one in ``a`` (new ones included)."""
    return {c for c, fp in b.items() if a.get(c) != fp}


# -- per concept --------------------------------------------------------------------------------


def test_every_concept_has_its_own_fingerprint_per_path():
    prints = by_path(cfg())
    assert set(prints) == {"image", "video"}
    for path in prints.values():
        assert set(path) == {CAT, DOG} and len(set(path.values())) == 2
    assert prints["image"][CAT] != prints["video"][CAT]


def test_adding_a_concept_leaves_the_others_fingerprints_unchanged():
    more = ConceptSet((*CONCEPTS.concepts, Concept(OWL, "owl", ("owl",))))
    for path in ("image", "video"):
        base, after = by_path(cfg())[path], by_path(cfg(), more)[path]
        assert changed(base, after) == {OWL}
        assert {c: after[c] for c in base} == base
    # ... and removing one leaves the rest as they were too.
    assert image(cfg(), ConceptSet(CONCEPTS.concepts[1:])) == {DOG: image(cfg())[DOG]}


@pytest.mark.parametrize(
    "edited",
    [
        Concept(CAT, "cat", ("cat",)),  # a text less
        Concept(CAT, "cat", ("cat", "kitten", "kitty")),  # a text more
        Concept(CAT, "cat", ("cat", "kitten"), 0.7),  # min_score
        Concept(CAT, "feline", ("cat", "kitten")),  # renamed
    ],
    ids=["fewer-texts", "more-texts", "min-score", "renamed"],
)
def test_editing_one_concept_changes_only_its_fingerprint(edited):
    edited_set = ConceptSet((edited, CONCEPTS.concepts[1]))
    for path in ("image", "video"):
        assert changed(by_path(cfg())[path], by_path(cfg(), edited_set)[path]) == {CAT}


def test_table_order_and_text_order_are_not_settings():
    flipped = ConceptSet((Concept(DOG, "dog", ("dog",)), Concept(CAT, "cat", ("kitten", "cat"))))
    assert by_path(cfg(), flipped) == by_path(cfg())


def test_job_settings_are_plain_json():
    settings = job_settings(cfg(), CONCEPTS)
    assert json.loads(json.dumps(settings)) == settings
    assert settings["image"] == {
        "inference.conf": 0.4, "inference.iou": 0.7, "inference.nms": True,
        "inference.max_det": 300, "inference.max_imgsz": None,
        "model.checkpoint": "s3://models/sam3.pt",
    }  # fmt: skip
    assert settings["video"] == {
        k: v for k, v in settings["image"].items() if k != "inference.max_imgsz"
    }
    assert settings["concepts"] == [
        [CAT, "cat", ["cat", "kitten"], None],
        [DOG, "dog", ["dog"], None],
    ]
    assert ConceptPrints(cfg(), CONCEPTS).settings == settings


# -- derived from the schema's field metadata ------------------------------------------------

#: Another valid value for every field the schema marks as deciding labels.
LABEL_CHANGES = {
    ("inference", "conf"): 0.55,
    ("inference", "iou"): 0.3,
    ("inference", "nms"): False,
    ("inference", "max_det"): 7,
    ("inference", "max_imgsz"): 512,
    ("model", "checkpoint"): "/models/other.pt",
}
#: Fields that only change speed, placement or how work is cut: never a relabel.
SPEED_CHANGES = {
    ("inference", "images_per_batch"): 32,
    ("inference", "queries_per_forward"): 8,
    ("model", "dtype"): "bfloat16",
    ("model", "device"): "cuda",
    ("model", "compile"): True,
    ("model", "cache_dir"): "/tmp/ckpt-cache",
    ("resources", "gpus_per_actor"): 1.0,
    ("resources", "cpus_per_actor"): 3.0,
    ("resources", "actors"): [3, 5],
    ("resources", "decode_cpus"): 0.5,
    ("resources", "decode_threads"): 2,
    ("resources", "ray_address"): "ray://head:10001",
    ("resources", "object_store_memory"): 10**9,
    ("output", "shard_size"): 16,
    ("video", "shard_frames"): 32,
    ("video", "feature_cache_mib"): 0,
    ("plan", "engine"): "ray",
    ("plan", "local_max_inputs"): 10,
}


def test_label_fields_are_the_marked_schema_fields():
    both = {("inference", f) for f in ("conf", "iou", "nms", "max_det")} | {("model", "checkpoint")}
    assert set(label_fields("image")) == both | {("inference", "max_imgsz")}
    assert set(label_fields("video")) == both
    # Every marked field has a change below, so a new marked field fails here first.
    assert set(label_fields("image")) | set(label_fields("video")) == set(LABEL_CHANGES)
    assert not set(SPEED_CHANGES) & set(LABEL_CHANGES)


@pytest.mark.parametrize("field", sorted(LABEL_CHANGES), ids="{0[0]}.{0[1]}".format)
def test_a_marked_field_changes_every_concepts_fingerprint_on_its_paths_only(field):
    section, name = field
    base = by_path(cfg())
    after = by_path(cfg(**{f"{section}__{name}": LABEL_CHANGES[field]}))
    for path in ("image", "video"):
        want = {CAT, DOG} if field in label_fields(path) else set()
        assert changed(base[path], after[path]) == want, (path, field)


@pytest.mark.parametrize(
    "field",
    [("inference", "conf"), ("model", "checkpoint")],
    ids="{0[0]}.{0[1]}".format,
)
def test_global_label_settings_relabel_every_concept_on_both_paths(field):
    section, name = field
    base = by_path(cfg())
    after = by_path(cfg(**{f"{section}__{name}": LABEL_CHANGES[field]}))
    assert changed(base["image"], after["image"]) == {CAT, DOG}
    assert changed(base["video"], after["video"]) == {CAT, DOG}


def test_max_imgsz_changes_image_fingerprints_only():
    base, smaller = by_path(cfg()), by_path(cfg(inference__max_imgsz=512))
    assert changed(base["image"], smaller["image"]) == {CAT, DOG}
    assert smaller["video"] == base["video"]


@pytest.mark.parametrize("field", sorted(SPEED_CHANGES), ids="{0[0]}.{0[1]}".format)
def test_speed_only_fields_change_no_fingerprint(field):
    section, name = field
    config = cfg(**{f"{section}__{name}": SPEED_CHANGES[field]})
    assert getattr(getattr(config, section), name) != getattr(getattr(cfg(), section), name)
    assert by_path(config) == by_path(cfg())
    assert job_settings(config, CONCEPTS) == job_settings(cfg(), CONCEPTS)


# -- per shard: exemplars ---------------------------------------------------------------------


def refs(n: int) -> list[InputRef]:
    return [InputRef.of(f"s3://b/img-{i:04d}.jpg") for i in range(n)]


def shards_of(items: list[InputRef], target: int, prints: ConceptPrints) -> list[Shard]:
    return [t.shard for t in new_image_tasks(items, target, prints)]


def test_an_exemplar_changes_only_its_concept_on_its_own_inputs_shard():
    items = refs(200)
    target = items[57]
    geometric = GeometricPrompts([(target.uri, None, CAT, Exemplar("box", (1, 2, 30, 40)))])
    plain = ConceptPrints(cfg(), CONCEPTS)
    with_box = ConceptPrints(cfg(), CONCEPTS, geometric)
    shards = shards_of(items, 8, plain)
    home = next(s for s in shards if target.uri in s.uris)
    for s in shards:
        want = {CAT} if s is home else set()
        assert changed(plain.for_shard(s), with_box.for_shard(s)) == want, s.shard_id
    # The shards without exemplars keep the path's fingerprints.
    assert with_box.by_path == plain.by_path
    single = shards_of([target], 1, plain)[0]
    other = GeometricPrompts([(target.uri, None, CAT, Exemplar("box", (1, 2, 30, 41)))])
    moved = ConceptPrints(cfg(), CONCEPTS, other).for_shard(single)
    assert changed(with_box.for_shard(single), moved) == {CAT}
    # The same exemplar named by image id instead of URI is the same setting.
    by_id = GeometricPrompts([(None, target.image_id, CAT, Exemplar("box", (1, 2, 30, 40)))])
    assert ConceptPrints(cfg(), CONCEPTS, by_id).for_shard(single) == with_box.for_shard(single)


def test_a_video_exemplar_changes_only_its_concept_on_that_videos_shards():
    video = VideoConfig(shard_frames=16, overlap_frames=4)
    a, b = InputRef.of("s3://b/a.mp4"), InputRef.of("s3://b/b.mp4")
    cut = {
        ref: video_shards(ref, VideoInfo(ref.uri, 40, 24.0, 64, 48, True, "h264"), video)
        for ref in (a, b)
    }
    assert len(cut[a]) == len(cut[b]) == 3
    geometric = GeometricPrompts([(a.uri, None, DOG, Exemplar("box", (1, 2, 30, 40), True, 12))])
    plain = ConceptPrints(cfg(), CONCEPTS)
    with_box = ConceptPrints(cfg(), CONCEPTS, geometric)
    for s in cut[a] + cut[b]:
        assert plain.for_shard(s) == plain.by_path["video"]
    assert all(changed(plain.for_shard(s), with_box.for_shard(s)) == {DOG} for s in cut[a])
    assert all(with_box.for_shard(s) == plain.for_shard(s) for s in cut[b])
    other_frame = GeometricPrompts([(a.uri, None, DOG, Exemplar("box", (1, 2, 30, 40), True, 13))])
    moved = ConceptPrints(cfg(), CONCEPTS, other_frame).for_shard(cut[a][0])
    assert changed(with_box.for_shard(cut[a][0]), moved) == {DOG}


def test_concept_prints_survive_pickling():
    import pickle

    geometric = GeometricPrompts([(refs(1)[0].uri, None, CAT, Exemplar("box", (1, 2, 3, 4)))])
    prints = ConceptPrints(cfg(), CONCEPTS, geometric)
    back = pickle.loads(pickle.dumps(prints))
    shard = shards_of(refs(3), 8, prints)[0]
    assert back.by_path == prints.by_path and back.for_shard(shard) == prints.for_shard(shard)
