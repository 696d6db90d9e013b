"""Labelling fingerprints: what makes a committed shard stale on resume, and what not."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sam3ray.config import JobConfig
from sam3ray.fingerprint import Fingerprinter, job_settings
from sam3ray.output_io import Marker, marker_from_bytes
from sam3ray.prompts import GeometricPrompts
from sam3ray.shards import make_shards, plan_shards, settings_changed
from sam3ray.types import Concept, ConceptSet, Exemplar, stable_id

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


def digest(config: JobConfig, concepts: ConceptSet = CONCEPTS) -> str:
    return Fingerprinter(config, concepts).job_digest


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
    assert digest(cfg(resources__gpus_per_actor=0.5, resources__actors=[2, 4])) == base
    assert digest(cfg(output__shard_size=16, video__shard_frames=32)) == base
    # Table order and text order are not settings.
    flipped = ConceptSet((Concept(DOG, "dog", ("dog",)), Concept(CAT, "cat", ("kitten", "cat"))))
    assert digest(cfg(), flipped) == base


def test_job_settings_are_plain_json():
    settings = job_settings(cfg(), CONCEPTS)
    assert json.loads(json.dumps(settings)) == settings
    assert settings["inference"] == {
        "conf": 0.4, "iou": 0.7, "nms": True, "max_det": 300, "max_imgsz": 1036,
    }  # fmt: skip


def refs(n: int) -> list[SimpleNamespace]:
    uris = [f"s3://b/img-{i:04d}.jpg" for i in range(n)]
    return [SimpleNamespace(uri=u, image_id=stable_id(u)) for u in uris]


def test_an_exemplar_changes_only_its_own_inputs_shard():
    items = refs(200)
    target = items[57]
    geometric = GeometricPrompts([(target.uri, None, CAT, Exemplar("box", (1, 2, 30, 40)))])
    plain, with_box = Fingerprinter(cfg(), CONCEPTS), Fingerprinter(cfg(), CONCEPTS, geometric)
    shards = make_shards(items, 8)
    changed = [
        s.shard_id
        for s in shards
        if plain.for_inputs(zip(s.uris, s.image_ids))
        != with_box.for_inputs(zip(s.uris, s.image_ids))
    ]
    assert changed == [next(s.shard_id for s in shards if target.uri in s.uris)]
    other = GeometricPrompts([(target.uri, None, CAT, Exemplar("box", (1, 2, 30, 41)))])
    pair = [(target.uri, target.image_id)]
    assert Fingerprinter(cfg(), CONCEPTS, other).for_inputs(pair) != with_box.for_inputs(pair)
    # The same exemplar named by image id instead of URI is the same setting.
    by_id = GeometricPrompts([(None, target.image_id, CAT, Exemplar("box", (1, 2, 30, 40)))])
    assert Fingerprinter(cfg(), CONCEPTS, by_id).for_inputs(pair) == with_box.for_inputs(pair)


def test_plan_redoes_shards_with_other_settings_and_reports_them():
    items = refs(120)
    shards = make_shards(items, 8)
    old, new = Fingerprinter(cfg(), CONCEPTS), Fingerprinter(cfg(inference__conf=0.6), CONCEPTS)

    def mark(shard, fp):
        return SimpleNamespace(
            members_hash=shard.members_hash,
            settings_hash=fp.for_inputs(zip(shard.uris, shard.image_ids)),
            n_error=0,
        )

    done = {s.shard_id: mark(s, new) for s in shards}
    done[shards[2].shard_id] = mark(shards[2], old)
    done[shards[4].shard_id] = SimpleNamespace(members_hash="x", settings_hash="y", n_error=0)
    todo, skipped = plan_shards(items, 8, done, fingerprint=lambda s: new.job_digest)
    assert [s.shard_id for s in todo] == [shards[2].shard_id, shards[4].shard_id]
    assert all(s.settings_hash == new.job_digest for s in todo + skipped)
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
