"""sam3ray.runner.metrics against a real local Ray: metrics are made and recorded inside an
actor (where the SAM 3 stage records them), and their values reach the node's
Prometheus endpoint when the metrics agent runs (it needs ``ray[default]``).
"""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from sam3ray.runner.metrics import (
    DETECTIONS_METRIC,
    IMAGES_METRIC,
    LATENCY_BOUNDARIES_MS,
    LATENCY_METRIC,
    RayMetrics,
)
from sam3ray.stages.metrics import Metrics, NullMetrics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_ready(request: pytest.FixtureRequest) -> Iterator[None]:
    """The suite's shared ``ray_session`` when conftest provides one, else our own."""
    import ray

    try:
        request.getfixturevalue("ray_session")
        own = False
    except pytest.FixtureLookupError:
        own = not ray.is_initialized()
    if own:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    if own:
        ray.shutdown()


def test_module_imports_without_ray() -> None:
    """Stages import sam3ray.stages.metrics; it must not pull Ray into them."""
    code = "import sys, sam3ray.stages.metrics; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_null_metrics_and_pickling() -> None:
    null = NullMetrics()
    assert isinstance(null, Metrics)
    null.record_image("ok", None)
    null.record_detections("cat", 2)
    null.record_latency(1.0)
    m = RayMetrics({"run_id": "r1"})
    assert isinstance(m, Metrics)
    m._images = object()  # a live handle must not travel into an actor
    clone = pickle.loads(pickle.dumps(m))
    assert clone.tags == {"run_id": "r1"} and clone._images is None and not clone.disabled


def _record_in_actor(metrics: RayMetrics) -> tuple[dict, object]:
    """Records in a live actor; the caller kills it after scraping, because a dead
    worker's not-yet-exported series may never reach the metrics agent."""
    import ray

    @ray.remote(num_cpus=0)
    class Recorder:
        def __init__(self, m: RayMetrics) -> None:
            self.m = m

        def run(self) -> dict:
            m = self.m
            m.record_image("ok")
            m.record_image("error", "decode_failed")
            m.record_detections("cat", 3)
            m.record_detections("cat", 0)  # ignored: Ray counters reject 0
            m.record_latency(12.5)
            return {
                "disabled": m.disabled,
                "types": [type(x).__name__ for x in (m._images, m._detections, m._latency)],
                "names": [x._name for x in (m._images, m._detections, m._latency)],
                "tag_keys": [tuple(x._tag_keys) for x in (m._images, m._detections)],
                "boundaries": list(m._latency.boundaries),
            }

    actor = Recorder.remote(metrics)
    try:
        return ray.get(actor.run.remote(), timeout=120), actor
    except BaseException:
        ray.kill(actor)
        raise


def _scrape(run_id: str, want: set[str], timeout_s: float = 90) -> dict[str, float]:
    """Series carrying ``run_id`` from every node's metrics endpoint, once all of
    ``want`` show (counters and histograms are exported on separate ticks)."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if not any(n.get("MetricsAgentPort", -1) > 0 for n in nodes):
        pytest.skip("no Ray metrics agent (install ray[default]): values not exported")
    urls = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in nodes]
    found: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # exported every few seconds
        found = {}
        for url in urls:
            try:
                body = urllib.request.urlopen(url, timeout=5).read().decode()
            except OSError:
                continue
            for line in body.splitlines():
                if f'run_id="{run_id}"' in line and not line.startswith("#"):
                    name, _, value = line.rpartition(" ")
                    found[_series_key(name)] = float(value)
        if want <= found.keys():
            return found
        time.sleep(1)
    return found


def _series_key(series: str) -> str:
    """``name{k=v,...}`` reduced to the name and the labels this test controls."""
    name, _, labels = series.partition("{")
    keep = ("status", "reason", "concept", "le")
    pairs = sorted(p for p in re.findall(r'(\w+)="([^"]*)"', labels) if p[0] in keep)
    return name + "{" + ",".join(f"{k}={v}" for k, v in pairs) + "}"


def test_ray_metrics_record_inside_actor(ray_ready: None) -> None:
    import ray

    run_id = uuid.uuid4().hex[:12]  # isolates this test's series on a shared cluster
    info, actor = _record_in_actor(RayMetrics({"run_id": run_id}))
    assert not info["disabled"]
    assert info["types"] == ["Counter", "Counter", "Histogram"]
    assert info["names"] == [IMAGES_METRIC, DETECTIONS_METRIC, LATENCY_METRIC]
    assert info["tag_keys"] == [("run_id", "status", "reason"), ("run_id", "concept")]
    assert info["boundaries"] == list(LATENCY_BOUNDARIES_MS)

    want = {
        "ray_sam3ray_images_total{reason=none,status=ok}",
        "ray_sam3ray_images_total{reason=decode_failed,status=error}",
        "ray_sam3ray_detections_total{concept=cat}",
        "ray_sam3ray_inference_latency_ms_count{}",
        "ray_sam3ray_inference_latency_ms_bucket{le=10.0}",
        "ray_sam3ray_inference_latency_ms_bucket{le=25.0}",
        "ray_sam3ray_inference_latency_ms_sum{}",
    }
    try:
        series = _scrape(run_id, want)
    finally:
        ray.kill(actor)
    assert series.get("ray_sam3ray_images_total{reason=none,status=ok}") == 1.0, series
    assert series.get("ray_sam3ray_images_total{reason=decode_failed,status=error}") == 1.0
    assert series.get("ray_sam3ray_detections_total{concept=cat}") == 3.0
    assert series.get("ray_sam3ray_inference_latency_ms_count{}") == 1.0
    # 12.5 ms lands in the (10, 25] bucket. Ray 2.60 records a histogram value at its
    # bucket's midpoint, so _sum is only known to lie within the bucket.
    assert series.get("ray_sam3ray_inference_latency_ms_bucket{le=10.0}") == 0.0
    assert series.get("ray_sam3ray_inference_latency_ms_bucket{le=25.0}") == 1.0
    assert 10.0 <= series.get("ray_sam3ray_inference_latency_ms_sum{}", -1) <= 25.0
