"""Labelling fingerprints: what makes a committed shard stale on resume, and what not.

What counts is derived from the config schema's ``affects_labels`` field metadata
(``sam3ray.config.label_fields``), per path: a setting that decides only image
labels relabels no video, and a speed knob relabels nothing.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sam3ray.config import JobConfig, VideoConfig, label_fields
from sam3ray.core.shards import InputRef, Shard, VideoInfo
from sam3ray.core.types import Concept, ConceptSet, Exemplar
from sam3ray.output.markers import Marker, marker_from_bytes
from sam3ray.plan.fingerprint import Fingerprinter, job_settings
from sam3ray.plan.shards import make_shards, settings_changed, split_done
from sam3ray.plan.video import video_shards
from sam3ray.sources.prompts import GeometricPrompts

CAT = "6f1c2a4e-1b7d-4c1e-9a55-0d7f1c3e2b01"
DOG = "7a2b3c4d-5e6f-4a1b-8c9d-0e1f2a3b4c02"
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


def digests(config: JobConfig, concepts: ConceptSet = CONCEPTS) -> dict[str, str]:
    return Fingerprinter(config, concepts).digests


def digest(config: JobConfig, concepts: ConceptSet = CONCEPTS) -> str:
    """The image path's digest (the one every image shard without exemplars gets)."""
    return digests(config, concepts)["image"]


def test_result_changing_settings_change_the_digest():
    base = digest(cfg())
    assert digest(cfg(inference__conf=0.5)) != base
    assert digest(cfg(inference__iou=0.5)) != base
    assert digest(cfg(inference__nms=False)) != base
    assert digest(cfg(inference__max_det=10)) != base
    assert digest(cfg(inference__max_imgsz=512)) != base
    assert digest(cfg(model__checkpoint="/models/other.pt")) != base
    renamed = ConceptSet((Concept(CAT, "feline", ("cat", "kitten")), CONCEPTS.concepts[1]))
    assert digest(cfg(), renamed) != base
    fewer_texts = ConceptSet((Concept(CAT, "cat", ("cat",)), CONCEPTS.concepts[1]))
    assert digest(cfg(), fewer_texts) != base
    stricter = ConceptSet((Concept(CAT, "cat", ("cat", "kitten"), 0.7), CONCEPTS.concepts[1]))
    assert digest(cfg(), stricter) != base
    assert digest(cfg(), ConceptSet(CONCEPTS.concepts[:1])) != base


def test_speed_and_placement_settings_do_not():
    base = digest(cfg())
    assert digest(cfg(model__device="cuda", model__dtype="bfloat16", model__compile=True)) == base
    assert digest(cfg(inference__images_per_batch=32, inference__queries_per_forward=8)) == base
    assert digest(cfg(inference__images_per_batch=4, inference__queries_per_forward="auto")) == base
    assert digest(cfg(resources__gpus_per_actor=0.5, resources__actors=[2, 4])) == base
    assert digest(cfg(output__shard_size=16, video__shard_frames=32)) == base
    # Table order and text order are not settings.
    flipped = ConceptSet((Concept(DOG, "dog", ("dog",)), Concept(CAT, "cat", ("kitten", "cat"))))
    assert digest(cfg(), flipped) == base


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
#: Fields that only change speed or placement: never a relabel.
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
    ("video", "feature_cache_mib"): 0,
}


def test_label_fields_are_the_marked_schema_fields():
    both = {("inference", f) for f in ("conf", "iou", "nms", "max_det")} | {("model", "checkpoint")}
    assert set(label_fields("image")) == both | {("inference", "max_imgsz")}
    assert set(label_fields("video")) == both
    # Every marked field has a change below, so a new marked field fails here first.
    assert set(label_fields("image")) | set(label_fields("video")) == set(LABEL_CHANGES)
    assert not set(SPEED_CHANGES) & set(LABEL_CHANGES)


@pytest.mark.parametrize("field", sorted(LABEL_CHANGES), ids="{0[0]}.{0[1]}".format)
def test_a_marked_field_changes_exactly_the_digests_of_its_paths(field):
    section, name = field
    base = digests(cfg())
    changed = digests(cfg(**{f"{section}__{name}": LABEL_CHANGES[field]}))
    for path in ("image", "video"):
        marked = field in label_fields(path)
        assert (changed[path] != base[path]) == marked, (path, field)


def test_max_imgsz_relabels_images_only():
    base, smaller = digests(cfg()), digests(cfg(inference__max_imgsz=512))
    assert smaller["image"] != base["image"]
    assert smaller["video"] == base["video"]


@pytest.mark.parametrize(
    "field",
    [("inference", "conf"), ("inference", "iou"), ("inference", "nms"),
     ("inference", "max_det"), ("model", "checkpoint")],
    ids="{0[0]}.{0[1]}".format,
)  # fmt: skip
def test_thresholds_and_checkpoint_relabel_both_paths(field):
    section, name = field
    base = digests(cfg())
    changed = digests(cfg(**{f"{section}__{name}": LABEL_CHANGES[field]}))
    assert changed["image"] != base["image"]
    assert changed["video"] != base["video"]


@pytest.mark.parametrize("field", sorted(SPEED_CHANGES), ids="{0[0]}.{0[1]}".format)
def test_speed_only_fields_change_neither_digest(field):
    section, name = field
    config = cfg(**{f"{section}__{name}": SPEED_CHANGES[field]})
    assert getattr(getattr(config, section), name) != getattr(getattr(cfg(), section), name)
    assert digests(config) == digests(cfg())


# -- per shard: exemplars ---------------------------------------------------------------------


def refs(n: int) -> list[InputRef]:
    return [InputRef.of(f"s3://b/img-{i:04d}.jpg") for i in range(n)]


def one_shard(ref: InputRef) -> Shard:
    (shard,) = make_shards([ref], 1)
    return shard


def test_an_exemplar_changes_only_its_own_inputs_shard():
    items = refs(200)
    target = items[57]
    geometric = GeometricPrompts([(target.uri, None, CAT, Exemplar("box", (1, 2, 30, 40)))])
    plain, with_box = Fingerprinter(cfg(), CONCEPTS), Fingerprinter(cfg(), CONCEPTS, geometric)
    shards = make_shards(items, 8)
    changed = [s.shard_id for s in shards if plain(s) != with_box(s)]
    assert changed == [next(s.shard_id for s in shards if target.uri in s.uris)]
    # The shards without exemplars keep the path's digest.
    assert {with_box(s) for s in shards if s.shard_id not in changed} == {plain.digests["image"]}
    other = GeometricPrompts([(target.uri, None, CAT, Exemplar("box", (1, 2, 30, 41)))])
    single = one_shard(target)
    assert Fingerprinter(cfg(), CONCEPTS, other)(single) != with_box(single)
    # The same exemplar named by image id instead of URI is the same setting.
    by_id = GeometricPrompts([(None, target.image_id, CAT, Exemplar("box", (1, 2, 30, 40)))])
    assert Fingerprinter(cfg(), CONCEPTS, by_id)(single) == with_box(single)


def test_a_video_exemplar_changes_only_that_videos_shards():
    video = VideoConfig(shard_frames=16, overlap_frames=4)
    a, b = InputRef.of("s3://b/a.mp4"), InputRef.of("s3://b/b.mp4")
    cut = {
        ref: video_shards(ref, VideoInfo(ref.uri, 40, 24.0, 64, 48, True, "h264"), video)
        for ref in (a, b)
    }
    assert len(cut[a]) == len(cut[b]) == 3
    geometric = GeometricPrompts([(a.uri, None, CAT, Exemplar("box", (1, 2, 30, 40), True, 12))])
    plain, with_box = Fingerprinter(cfg(), CONCEPTS), Fingerprinter(cfg(), CONCEPTS, geometric)
    assert {plain(s) for shards in cut.values() for s in shards} == {plain.digests["video"]}
    assert all(with_box(s) != plain(s) for s in cut[a])
    assert all(with_box(s) == plain(s) for s in cut[b])
    assert with_box.digests == plain.digests
    other_frame = GeometricPrompts([(a.uri, None, CAT, Exemplar("box", (1, 2, 30, 40), True, 13))])
    assert Fingerprinter(cfg(), CONCEPTS, other_frame)(cut[a][0]) != with_box(cut[a][0])


def test_plan_redoes_shards_with_other_settings_and_reports_them():
    items = refs(120)
    shards = make_shards(items, 8)
    old, new = Fingerprinter(cfg(), CONCEPTS), Fingerprinter(cfg(inference__conf=0.6), CONCEPTS)

    def mark(shard, fp):
        return SimpleNamespace(members_hash=shard.members_hash, settings_hash=fp(shard), n_error=0)

    done = {s.shard_id: mark(s, new) for s in shards}
    done[shards[2].shard_id] = mark(shards[2], old)
    done[shards[4].shard_id] = SimpleNamespace(members_hash="x", settings_hash="y", n_error=0)
    todo, skipped = split_done(make_shards(items, 8), done, fingerprint=new)
    assert [s.shard_id for s in todo] == [shards[2].shard_id, shards[4].shard_id]
    assert all(s.settings_hash == new.digests["image"] for s in todo + skipped)
    # Only the membership-unchanged one counts as relabelled for new settings.
    assert [s.shard_id for s in settings_changed(todo, done)] == [shards[2].shard_id]


def test_marker_carries_the_settings_hash_and_old_markers_still_parse():
    marker = Marker("s1", "h", 1, 1, 0, 2, "run", ("images/part-s1.parquet",), "t", "abc")
    assert marker_from_bytes(marker.to_json()).settings_hash == "abc"
    legacy = marker.to_dict()
    del legacy["settings_hash"]
    assert marker_from_bytes(json.dumps(legacy).encode()).settings_hash == ""
    with pytest.raises(ValueError, match="settings_hash"):
        marker_from_bytes(json.dumps({**legacy, "settings_hash": 3}).encode())
