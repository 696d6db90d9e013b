"""Content-defined sharding: determinism, locality of changes, cap, resume planning."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import pytest

from sam3ray.core.ids import members_hash, stable_id
from sam3ray.core.shards import InputRef, Shard
from sam3ray.plan.shards import make_shards, orphaned_shard_ids, split_done


def ref(uri: str) -> InputRef:
    return InputRef.of(uri)


def refs(n: int, prefix: str = "s3://bucket/img/") -> list[InputRef]:
    return [ref(f"{prefix}{i:06d}.jpg") for i in range(n)]


def starts(r: InputRef, target: int) -> bool:
    return int(r.image_id[:8], 16) % target == 0


def content_runs(items: list[InputRef], target: int) -> list[list[InputRef]]:
    """Runs between content-defined boundaries only (no cap), the test's reference."""
    runs: list[list[InputRef]] = []
    for r in sorted(items, key=lambda r: r.uri):
        if not runs or starts(r, target):
            runs.append([])
        runs[-1].append(r)
    return runs


def memberships(shards: list[Shard]) -> set[tuple[str, ...]]:
    return {s.uris for s in shards}


def test_shards_cover_inputs_once_in_uri_order_and_ids_are_deterministic():
    items = refs(500)
    shards = make_shards(items, target=8)
    flat = [u for s in shards for u in s.uris]
    assert flat == sorted(r.uri for r in items)
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    assert make_shards(shuffled, target=8) == shards
    for s in shards:
        assert s.shard_id == "s" + stable_id(s.uris[0])
        assert len(s.shard_id) == 17
        assert s.members_hash == stable_id("\n".join(sorted(s.image_ids)))
        assert s.image_ids == tuple(stable_id(u) for u in s.uris)
        assert len(s) == len(s.uris)
    assert len({s.shard_id for s in shards}) == len(shards)


def test_every_non_first_shard_starts_at_a_boundary_or_a_cap():
    target = 4
    shards = make_shards(refs(3000), target)
    by_uri = {r.uri: r for r in refs(3000)}
    for prev, s in zip(shards, shards[1:], strict=False):
        assert starts(by_uri[s.uris[0]], target) or len(prev) == 2 * target
        assert len(s) <= 2 * target


def test_hard_cap_bounds_shard_size():
    target = 50  # 60 content runs expected; P(run > 2 * target) ~ e**-2 each
    items = refs(3000)
    shards = make_shards(items, target)
    assert max(len(s) for s in shards) <= 2 * target
    long_runs = [run for run in content_runs(items, target) if len(run) > 2 * target]
    assert long_runs, "fixture should contain a run longer than the cap"
    assert sum(len(s) == 2 * target for s in shards) >= len(long_runs)


def test_target_one_gives_singletons_and_bad_arguments_raise():
    assert [len(s) for s in make_shards(refs(10), 1)] == [1] * 10
    with pytest.raises(ValueError, match="target"):
        make_shards(refs(3), 0)
    with pytest.raises(ValueError, match="hex"):
        make_shards([InputRef("a", "not-hex-at-all")], 4)
    assert make_shards([], 4) == []


def test_duplicate_uris_are_dropped():
    items = refs(20)
    shards = make_shards(items + items[:5], 4)
    assert sum(len(s) for s in shards) == 20


@pytest.mark.parametrize("target", [4, 16])
def test_one_insertion_or_removal_only_changes_its_own_run(target):
    rng = random.Random(target)
    base = refs(2000)
    base_shards = memberships(make_shards(base, target))
    counted = 0
    for trial in range(150):
        if trial % 2:
            new = ref(f"s3://bucket/img/{rng.randrange(2000):06d}-x{trial}.jpg")
            items, changed_item = [*base, new], new
        else:
            changed_item = base[rng.randrange(len(base))]
            items = [r for r in base if r is not changed_item]
        after = memberships(make_shards(items, target))
        added, removed = after - base_shards, base_shards - after
        # Every changed shard lies inside the content run(s) touching the changed input.
        bigger = [*base, changed_item] if changed_item not in base else base
        runs = content_runs(bigger, target)
        idx = next(i for i, run in enumerate(runs) if changed_item in run)
        near = {idx} | ({idx - 1} if runs[idx][0] is changed_item and idx > 0 else set())
        allowed = {r.uri for i in near for r in runs[i]}
        for members in added | removed:
            assert set(members) <= allowed
        assert added or removed
        touched = [run for lst in (base, items) for run in content_runs(lst, target)]
        if all(len(run) < 2 * target for run in touched if {r.uri for r in run} & allowed):
            counted += 1  # no cap cut involved: a split, a merge, or one shard changed
            assert len(added) <= 2 and len(removed) <= 2
            assert len(added) + len(removed) <= 3
    assert counted > 50  # most trials exercise the strict count, not only confinement


def plan_shards(
    items: Sequence[InputRef], target: int, markers: Mapping, retry_errors: bool = False
) -> tuple[list[Shard], list[Shard]]:
    """Cut, then split by the resume rule: what the planner does for image shards."""
    return split_done(make_shards(items, target), markers, retry_errors)


def marker(h: str, n_error: int = 0) -> SimpleNamespace:
    return SimpleNamespace(members_hash=h, settings_hash="", n_error=n_error)


def test_plan_skips_done_shards_and_redoes_changed_ones():
    items = refs(300)
    shards = make_shards(items, 8)
    done = {s.shard_id: marker(s.members_hash) for s in shards}
    todo, skipped = plan_shards(items, 8, done)
    assert todo == [] and skipped == shards

    # A shard whose membership changed since its marker is redone.
    victim = shards[3]
    done[victim.shard_id] = marker(members_hash(victim.image_ids[1:]))
    # A shard without a marker is redone.
    del done[shards[5].shard_id]
    todo, skipped = plan_shards(items, 8, done)
    assert todo == [victim, shards[5]]
    assert len(skipped) == len(shards) - 2


def test_plan_retry_errors():
    items = refs(100)
    shards = make_shards(items, 8)
    done = {s.shard_id: marker(s.members_hash) for s in shards}
    done[shards[0].shard_id] = marker(shards[0].members_hash, n_error=2)
    todo, skipped = plan_shards(items, 8, done, retry_errors=False)
    assert todo == []
    todo, skipped = plan_shards(items, 8, done, retry_errors=True)
    assert todo == [shards[0]] and len(skipped) == len(shards) - 1


def test_removing_a_shard_starting_input_orphans_its_marker():
    target = 8
    items = refs(400)
    shards = make_shards(items, target)
    done = {s.shard_id: marker(s.members_hash) for s in shards}
    # A shard cut by the content rule (not the cap), small enough to merge without a cap cut.
    i = next(
        i
        for i in range(1, len(shards))
        if len(shards[i]) >= 2
        and starts(ref(shards[i].uris[0]), target)
        and len(shards[i - 1]) + len(shards[i]) - 1 < 2 * target
    )
    remaining = [r for r in items if r.uri != shards[i].uris[0]]
    todo, _ = plan_shards(remaining, target, done)
    assert [s.shard_id for s in todo] == [shards[i - 1].shard_id]  # absorbed shard i's rest
    assert todo[0].uris == shards[i - 1].uris + shards[i].uris[1:]
    assert orphaned_shard_ids(make_shards(remaining, target), done) == [shards[i].shard_id]
