"""One Ray batch of ``sam3ray.label`` without Ray: decoding ahead of the model, bad inputs.

The operator's actor decodes a batch with :func:`decode_inputs` (a bounded
prefetch) and labels it with :func:`label_items` through the job's
``SegmentStage``. Checked here: decoding runs at most a window ahead and
overlaps the model (the stage gets a generator, not a finished list), one bad
input is one error row whatever its value, ``uri_column`` values are made
canonical as the job's URIs, and ``jobs/label_table.py`` passes what the
operator takes from a job config and refuses what it cannot do.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from sam3ray import Concept, ConceptSet, InferenceConfig, ModelConfig
from sam3ray.config import ConfigError, InputConfig, ResourcesConfig
from sam3ray.core.ids import input_id
from sam3ray.runner.operator import decode_input, decode_inputs, label_items
from sam3ray.stages.decode import prefetch
from sam3ray.stages.segment import SegmentStage
from tests.support.images import scene_bytes
from tests.support.jobs import CAT, PERSON

REPO = Path(__file__).resolve().parents[3]
CONCEPTS = ConceptSet(
    (Concept(CAT, "cat", ("cat", "kitten")), Concept(PERSON, "person", ("person",)))
)
#: Two images per model batch, so a Ray batch of six is three model batches.
INFERENCE = InferenceConfig(conf=0.3, iou=0.7, nms=True, max_det=20, images_per_batch=2)
SIZES = [(96, 128), (120, 90), (64, 64), (80, 100), (72, 72), (90, 60)]

pytestmark = pytest.mark.usefixtures("one_thread")


def _decode_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("sam3ray-decode")}


@pytest.fixture(scope="module")
def stage(tiny_checkpoint) -> SegmentStage:
    stage = SegmentStage(
        ModelConfig(checkpoint=tiny_checkpoint, device="cpu"),
        INFERENCE,
        InputConfig.model_construct(storage_options={}, max_pixels=10**8),
        ResourcesConfig(gpus_per_actor=0, decode_threads=2),
        CONCEPTS,
        run_id="run-op",
    )
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    return [scene_bytes(40 + i, size) for i, size in enumerate(SIZES)]


class Launches:
    """Wraps the stage's engine; records how many inputs had been decoded at each launch."""

    def __init__(self, inner, decoded: list[int]) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.decoded = decoded
        self.at: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def launch(self, images, exemplars=None, only=None):
        self.at.append(self.decoded[0])
        return self.inner.launch(images, exemplars, only)


# --------------------------------------------------------------------------- prefetch


def test_prefetch_keeps_order_and_runs_at_most_window_ahead():
    """ThreadPoolExecutor.map would start every call at once; here the n-th result in
    the consumer's hands means at most n + window calls started."""
    lock, started = threading.Lock(), []

    def work(i: int) -> int:
        with lock:
            started.append(i)
        return i * 10

    got = []
    for n, value in enumerate(prefetch(work, ((i,) for i in range(20)), threads=2, window=3), 1):
        time.sleep(0.01)  # the threads may run as far ahead as they are let
        with lock:
            assert len(started) <= n + 3, (n, len(started))
        got.append(value)
    assert got == [i * 10 for i in range(20)]


def test_a_closed_prefetch_leaves_no_thread_and_starts_nothing_more():
    before = _decode_threads()
    lock, started = threading.Lock(), []

    def work(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.02)
        return i

    items = prefetch(work, ((i,) for i in range(50)), threads=2, window=2)
    assert next(items) == 0
    items.close()
    assert _decode_threads() == before
    assert len(started) <= 3  # the first, and the window behind it
    with pytest.raises(ValueError, match="window"):
        next(prefetch(work, [(1,)], threads=1, window=0))


# --------------------------------------------------------------------------- one bad input


def test_a_value_that_cannot_be_named_is_an_error_not_an_exception():
    """A str where bytes were expected used to raise while computing the input's id,
    before the try: the whole Ray batch failed."""
    for value in ("a string in a bytes column", 5):
        got = decode_input(value, "bytes")
        assert got.pixels is None and got.error_reason == "unsupported"
        assert got.uri == "" and got.image_id == input_id("")
        assert type(value).__name__ in got.error


def test_uri_column_values_are_canonical_as_the_jobs(tmp_path):
    """``file://`` and relative forms name the file as a job's listing does, so the
    ``image_id`` joins with a job's output."""
    path = tmp_path / "imgs" / "a.png"
    for given in (f"file://{path}", str(tmp_path / "imgs" / ".." / "imgs" / "a.png")):
        got = decode_input(b"not an image", "bytes", given)
        assert got.uri == str(path) and got.image_id == input_id(str(path))
        assert got.error_reason == "not_an_image"
    assert decode_input(None, "bytes", f"file://{path}").uri == str(path)


def test_bad_inputs_among_good_ones_cost_one_row_each(stage, pngs, tmp_path):
    """A str, garbage bytes and a null among encoded images: one error row each, and
    the good images get the labels they get alone."""
    named = tmp_path / "named.png"
    values = [pngs[0], "not bytes", pngs[1], b"garbage", None, pngs[2]]
    uris = [f"file://{named}", None, None, f"file://{tmp_path}/junk.png", None, None]
    keys = pa.table({"key": ["a", "str", "b", "junk", "null", "c"]})
    items = decode_inputs(values, uris, "bytes", threads=2, window=3)
    got = label_items(stage, items, keys)

    errors = {r["key"]: r for r in got.filter(pc.equal(got["status"], "error")).to_pylist()}
    assert {k: r["error_reason"] for k, r in errors.items()} == {
        "str": "unsupported", "junk": "not_an_image", "null": "empty"
    }  # fmt: skip
    assert errors["junk"]["uri"] == str(tmp_path / "junk.png")
    assert errors["junk"]["image_id"] == input_id(str(tmp_path / "junk.png"))
    assert all(r["class_id"] is None and r["score"] is None for r in errors.values())

    ok = got.filter(pc.equal(got["status"], "ok"))
    assert ok.num_rows > 0 and set(ok["key"].to_pylist()) <= {"a", "b", "c"}
    for r in ok.to_pylist():
        assert r["image_id"] == input_id(r["uri"])
        if r["key"] == "a":  # named by its uri_column value, made canonical
            assert r["uri"] == str(named)
        else:
            assert r["uri"].startswith("sha1:")
    alone = label_items(
        stage,
        decode_inputs(
            [pngs[i] for i in (0, 1, 2)], uris[:1] + [None, None], "bytes", threads=2, window=3
        ),  # fmt: skip
        pa.table({"key": ["a", "b", "c"]}),
    )
    columns = ["key", "image_id", "class_id", "score", "box", "mask_rle"]
    assert ok.select(columns).sort_by("key").equals(alone.select(columns).sort_by("key"))


# --------------------------------------------------------------------------- overlap


def test_the_stage_labels_as_inputs_decode_not_after_the_whole_batch(stage, pngs):
    """The first model batch (2 images) runs once 2 inputs are decoded, not 6: decoding
    overlaps the model and a Ray batch's originals never all wait at once."""
    decoded = [0]

    def counted():
        for item in decode_inputs(pngs, [None] * len(pngs), "bytes", threads=2, window=3):
            decoded[0] += 1
            yield item

    engine = stage.engine
    stage.engine = launches = Launches(engine, decoded)
    try:
        got = label_items(stage, counted(), pa.table({"n": list(range(len(pngs)))}))
    finally:
        stage.engine = engine
    assert launches.at == [2, 4, 6]  # was [6, 6, 6]: the batch decoded in full first
    assert got.num_rows > 0 and set(got["status"].to_pylist()) == {"ok"}


# --------------------------------------------------------------------------- label_table


def _script():
    spec = importlib.util.spec_from_file_location("label_table", REPO / "jobs" / "label_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _config(tmp_path: Path, tiny_checkpoint: str, **prompts: str) -> Path:
    concepts = tmp_path / "concepts.csv"
    concepts.write_text(f"class_id,name,text\n{CAT},cat,cat\n")
    extra = "".join(f"  {k}: {v}\n" for k, v in prompts.items())
    path = tmp_path / "job.yaml"
    path.write_text(
        f"input:\n  uris: [{tmp_path}]\n  max_pixels: 12345\n"
        f"prompts:\n  concepts: {concepts}\n{extra}"
        f"model:\n  checkpoint: {tiny_checkpoint}\n  device: cpu\n"
        f"output:\n  uri: {tmp_path / 'out'}\n"
    )
    return path


class _Stop(Exception):
    pass


def test_label_table_refuses_geometric_prompts_before_any_work(
    tmp_path, tiny_checkpoint, monkeypatch
):
    """The operator has no exemplar prompts: a concept given only by boxes would
    silently get no labels, so the config is refused, naming the field."""
    import ray

    boxes = tmp_path / "boxes.csv"
    boxes.write_text("class_id,uri,x0,y0,x1,y1,label\n")
    cfg = _config(tmp_path, tiny_checkpoint, geometric=str(boxes))

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a refused config")

    monkeypatch.setattr(ray, "init", no_ray)
    with pytest.raises(ConfigError, match=r"prompts\.geometric: .*boxes\.csv"):
        _script().main(["t.parquet", str(tmp_path / "labels"), "--config", str(cfg)])


def test_label_table_passes_max_pixels_and_storage_options(tmp_path, tiny_checkpoint, monkeypatch):
    """The job config's input.max_pixels reaches the operator (it used to be dropped:
    the operator's default applied)."""
    import ray
    import ray.data

    import sam3ray

    seen: dict = {}

    def fake_label(ds, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.data, "read_parquet", lambda *a, **k: "dataset")
    monkeypatch.setattr(sam3ray, "label", fake_label)
    cfg = _config(tmp_path, tiny_checkpoint)
    with pytest.raises(_Stop):
        _script().main(["t.parquet", str(tmp_path / "labels"), "--config", str(cfg)])
    assert seen["max_pixels"] == 12345 and seen["storage_options"] == {}
