"""Append-only shards: new inputs cut into new shards named from their members, and what a
committed shard needs when the concepts change (``plan.shards``). Pure functions."""

from __future__ import annotations

import random

import pytest

from sam3ray.config import JobConfig
from sam3ray.core.ids import stable_id
from sam3ray.core.shards import InputRef, Shard
from sam3ray.core.types import Concept, ConceptSet, Exemplar
from sam3ray.output.layout import detections_path, images_path
from sam3ray.plan.fingerprint import ConceptPrints
from sam3ray.plan.shards import cut, fresh_task, image_shard_id, new_image_tasks, stale_task
from sam3ray.sources.prompts import GeometricPrompts

CAT = "6f1c2a4e-1b7d-4c1e-9a55-0d7f1c3e2b01"
DOG = "7a2b3c4d-5e6f-4a1b-8c9d-0e1f2a3b4c02"
OWL = "1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e03"
TWO = ConceptSet((Concept(CAT, "cat", ("cat", "kitten")), Concept(DOG, "dog", ("dog",))))


def cfg(**inference) -> JobConfig:
    return JobConfig.model_validate(
        {
            "input": {"uris": ["/data/images"]},
            "prompts": {"concepts": "/data/concepts.csv"},
            "model": {"checkpoint": "s3://models/sam3.pt"},
            "output": {"uri": "/data/labels"},
            "inference": inference,
        }
    )


def prints(concepts: ConceptSet = TWO, geometric=None, **inference) -> ConceptPrints:
    return ConceptPrints(cfg(**inference), concepts, geometric)


def hashed(n: int, seed: int = 0) -> list[InputRef]:
    """Hash-named inputs (random hex keys, the layout of content-addressed lakes)."""
    rng = random.Random(seed)
    return [InputRef.of(f"s3://lake/{rng.getrandbits(64):016x}.jpg") for _ in range(n)]


# -- cutting new inputs ----------------------------------------------------------------------


@pytest.mark.parametrize("n, target", [(1, 8), (8, 8), (9, 8), (13, 4), (100, 7), (250, 16)])
def test_new_inputs_are_cut_into_few_balanced_shards_none_above_target(n, target):
    tasks = new_image_tasks(hashed(n), target, prints())
    sizes = [len(t.shard) for t in tasks]
    assert len(tasks) == -(-n // target), "as few shards as the target allows"
    assert max(sizes) <= target
    assert max(sizes) - min(sizes) <= 1, f"balanced: {sizes}"
    covered = [i for t in tasks for i in t.shard.image_ids]
    assert sorted(covered) == sorted(r.image_id for r in hashed(n)), "each input once"


def test_cut_keeps_order_and_refuses_a_target_below_one():
    assert cut([], 4) == []
    assert cut(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [len(c) for c in cut(list(range(10)), 1)] == [1] * 10
    with pytest.raises(ValueError, match="target"):
        cut([1, 2], 0)


def test_a_shard_is_named_from_its_members_whatever_their_order():
    refs = hashed(40)
    tasks = new_image_tasks(refs, 8, prints())
    shuffled = refs[:]
    random.Random(3).shuffle(shuffled)
    assert new_image_tasks(shuffled, 8, prints()) == tasks
    for t in tasks:
        s = t.shard
        assert s.shard_id == "s" + stable_id("\n".join(sorted(s.image_ids)))
        assert s.shard_id == image_shard_id(reversed(s.image_ids))
        assert s.image_ids == tuple(stable_id(u) for u in s.uris) and s.kind == "image"
        assert list(s.uris) == sorted(s.uris), "members in URI order"
    assert len({t.shard_id for t in tasks}) == len(tasks)


def test_other_members_give_another_shard_id():
    ids = [r.image_id for r in hashed(10)]
    base = image_shard_id(ids)
    assert image_shard_id(ids[:-1]) != base, "one member fewer"
    assert image_shard_id([*ids, hashed(1, seed=9)[0].image_id]) != base, "one member more"
    assert image_shard_id([*ids[:-1], hashed(1, seed=9)[0].image_id]) != base, "one swapped"
    # New inputs never fall into a committed shard: a second batch gets shards of its own.
    first = {t.shard_id for t in new_image_tasks(hashed(30), 8, prints())}
    later = {t.shard_id for t in new_image_tasks(hashed(3, seed=5), 8, prints())}
    assert not first & later


def test_an_input_listed_twice_is_cut_once():
    refs = hashed(20)
    tasks = new_image_tasks(
        refs + refs[:7] + [InputRef(refs[0].uri, refs[0].image_id)], 4, prints()
    )
    ids = [i for t in tasks for i in t.shard.image_ids]
    assert len(ids) == len(set(ids)) == 20


def test_a_fresh_task_labels_every_concept_and_may_overwrite_its_own_files_only():
    (task,) = new_image_tasks(hashed(5), 8, prints())
    p = prints()
    assert task.fresh and task.first and task.drop == ()
    assert task.concepts == tuple(sorted([CAT, DOG]))
    assert dict(task.prints) == p.by_path["image"] == p.for_shard(task.shard)
    sid = task.shard_id
    assert set(task.previous_files) == {
        images_path(sid),
        detections_path(CAT, sid),
        detections_path(DOG, sid),
    }
    assert task.kept == ()
    assert fresh_task(task.shard, p) == task


# -- what a committed shard needs ------------------------------------------------------------


def committed(p: ConceptPrints) -> tuple[Shard, dict[str, str]]:
    (task,) = new_image_tasks(hashed(6), 8, p)
    return task.shard, dict(task.prints)


def test_a_shard_labelled_with_the_current_settings_needs_nothing():
    shard, current = committed(prints())
    assert stale_task(shard, current, prints()) is None
    # speed settings are no label settings
    assert stale_task(shard, current, prints(images_per_batch=64)) is None


def test_an_added_concept_is_labelled_alone_and_the_others_are_kept():
    shard, current = committed(prints())
    three = ConceptSet((*TWO.concepts, Concept(OWL, "owl", ("owl",))))
    task = stale_task(shard, current, prints(three))
    assert task.concepts == (OWL,) and task.drop == ()
    assert not task.fresh and not task.first
    assert set(task.kept) == {CAT, DOG}
    assert dict(task.prints) == prints(three).for_shard(shard)
    assert set(task.previous_files) == {
        images_path(shard.shard_id),
        detections_path(OWL, shard.shard_id),
    }


def test_an_edited_concept_is_relabelled_alone():
    shard, current = committed(prints())
    for edited in (
        Concept(CAT, "cat", ("cat",)),  # a text less
        Concept(CAT, "cat", ("cat", "kitten"), 0.7),  # its own threshold
        Concept(CAT, "feline", ("cat", "kitten")),  # renamed
    ):
        task = stale_task(shard, current, prints(ConceptSet((edited, TWO.concepts[1]))))
        assert task.concepts == (CAT,) and task.drop == () and task.kept == (DOG,), edited


def test_a_removed_concept_is_dropped_and_nothing_is_labelled():
    shard, current = committed(prints())
    task = stale_task(shard, current, prints(ConceptSet(TWO.concepts[1:])))
    assert task.concepts == () and task.drop == (CAT,) and task.kept == (DOG,)
    assert dict(task.prints) == {DOG: current[DOG]}
    assert detections_path(CAT, shard.shard_id) in task.previous_files
    assert detections_path(DOG, shard.shard_id) not in task.previous_files


def test_a_global_label_setting_relabels_every_concept():
    shard, current = committed(prints())
    task = stale_task(shard, current, prints(conf=0.55))
    assert task.concepts == tuple(sorted([CAT, DOG])) and task.kept == () and task.drop == ()


def test_an_exemplar_relabels_only_its_concept_on_its_own_inputs_shard():
    refs = hashed(24)
    tasks = new_image_tasks(refs, 8, prints())
    target = refs[5]
    boxes = GeometricPrompts([(target.uri, None, DOG, Exemplar("box", (1, 2, 30, 40)))])
    with_box = prints(geometric=boxes)
    needs = {t.shard_id: stale_task(t.shard, dict(t.prints), with_box) for t in tasks}
    home = next(t.shard_id for t in tasks if target.image_id in t.shard.image_ids)
    assert {sid for sid, task in needs.items() if task is not None} == {home}
    assert needs[home].concepts == (DOG,) and needs[home].kept == (CAT,)
