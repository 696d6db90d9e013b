"""Finding, fetching and loading SAM 3 checkpoints; the tiny model; the full architecture.

Every failure mode must end in one ``CheckpointError`` that names the path and
the problem: a model with random weights is never returned silently.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import sam3ray
from sam3ray import Concept, ConceptSet, InferenceConfig, Sam3Engine
from sam3ray.model.arch import Sam3Arch, build_image_model
from sam3ray.model.loader import (
    META_KEY,
    CheckpointError,
    load_checkpoint_into_new_model,
    resolve_checkpoint,
)
from sam3ray.model.tiny import build_tiny_model
from sam3ray.storage.location import Location

CAT = "0b0c7f5e-0000-4000-8000-000000000001"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_ckpt_dict(tiny_checkpoint):
    return torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)


def _save_variant(ckpt: dict, path: Path) -> str:
    torch.save(ckpt, path)
    return str(path)


def _detections(model, images):
    concepts = ConceptSet((Concept(CAT, "cat", ("cat", "dog")),))
    return Sam3Engine(model, concepts, InferenceConfig(conf=0.0, nms=False), device="cpu").predict(
        images
    )


# --------------------------------------------------------------------------- local paths


def test_local_path_and_file_uri_resolve_to_the_file(tiny_checkpoint):
    assert resolve_checkpoint(tiny_checkpoint) == tiny_checkpoint
    assert resolve_checkpoint("file://" + tiny_checkpoint) == tiny_checkpoint


def test_public_loader_returns_the_official_sam3_image_model(tiny_checkpoint):
    from sam3.model.sam3_image import Sam3Image

    model = sam3ray.load_sam3_image_model(tiny_checkpoint, device="cpu")
    assert isinstance(model, Sam3Image)
    assert not model.training
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.sam3ray_arch == Sam3Arch.tiny()


def test_missing_file_is_a_checkpoint_error_naming_it(tmp_path):
    path = str(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match=re.escape(path) + ".*no such file"):
        sam3ray.load_sam3_image_model(path)


# --------------------------------------------------------------------------- object store


class _Downloads:
    """Counts real object-store downloads (s3fs ``_get_file``) across threads."""

    def __init__(self, monkeypatch, before_download=None):
        import s3fs

        self.count = 0
        self._lock = threading.Lock()
        original = s3fs.S3FileSystem._get_file

        async def counting_get_file(fs, rpath, lpath, *args, **kwargs):
            with self._lock:
                self.count += 1
            if before_download is not None:
                before_download()
            return await original(fs, rpath, lpath, *args, **kwargs)

        monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", counting_get_file)


def _upload(moto_s3, path: str, name: str = "sam3-tiny.pt") -> str:
    bucket = moto_s3.new_bucket("ckpt")
    return moto_s3.put(bucket, f"models/{name}", Path(path).read_bytes())


def test_s3_checkpoint_is_copied_once_into_the_cache_and_loads(
    moto_s3, tiny_checkpoint, tmp_path, monkeypatch
):
    uri = _upload(moto_s3, tiny_checkpoint)
    downloads = _Downloads(monkeypatch)
    cache = tmp_path / "cache"
    opts = moto_s3.storage_options

    first = resolve_checkpoint(Location(uri, opts), cache_dir=cache)
    second = resolve_checkpoint(Location(uri, opts), cache_dir=cache)
    assert first == second and Path(first).parent == cache
    assert Path(first).read_bytes() == Path(tiny_checkpoint).read_bytes()
    assert downloads.count == 1
    assert not list(cache.glob("*.part"))  # no temporary file left behind

    # A truncated cached copy (e.g. a node that died mid-copy) is fetched again.
    Path(first).write_bytes(b"partial")
    assert resolve_checkpoint(Location(uri, opts), cache_dir=cache) == first
    assert downloads.count == 2
    assert Path(first).read_bytes() == Path(tiny_checkpoint).read_bytes()

    model = sam3ray.load_sam3_image_model(uri, cache_dir=str(cache), storage_options=opts)
    assert model.sam3ray_arch == Sam3Arch.tiny()
    assert downloads.count == 2


def test_concurrent_resolves_download_once_and_share_the_file(
    moto_s3, tiny_checkpoint, tmp_path, monkeypatch
):
    """Two resolvers race: the second must wait on the file lock while the first
    downloads, then reuse the copy. The download is held open until the second
    resolver is provably waiting for the lock, so the overlap is real, not luck."""
    import filelock

    uri = _upload(moto_s3, tiny_checkpoint)
    waiting = threading.Event()
    entered = []

    class RecordingLock(filelock.FileLock):
        def acquire(self, *args, **kwargs):
            entered.append(threading.get_ident())
            if len(entered) >= 2:
                waiting.set()
            return super().acquire(*args, **kwargs)

    monkeypatch.setattr(filelock, "FileLock", RecordingLock)
    downloads = _Downloads(monkeypatch, before_download=lambda: waiting.wait(timeout=60))
    start = threading.Barrier(2)
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def resolve(i: int) -> None:
        try:
            start.wait(timeout=60)
            results[i] = resolve_checkpoint(
                Location(uri, moto_s3.storage_options), cache_dir=tmp_path / "cache"
            )
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=resolve, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert waiting.is_set(), "the second resolver never reached the lock during the download"
    assert downloads.count == 1
    assert results[0] == results[1]
    assert Path(results[0]).read_bytes() == Path(tiny_checkpoint).read_bytes()


def test_missing_object_is_a_checkpoint_error(moto_s3, tmp_path):
    bucket = moto_s3.new_bucket("ckpt")
    uri = f"s3://{bucket}/models/absent.pt"
    with pytest.raises(CheckpointError, match=re.escape(uri) + ".*no such object"):
        resolve_checkpoint(Location(uri, moto_s3.storage_options), cache_dir=tmp_path)


def test_hub_id_offline_is_a_clear_checkpoint_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment at import time: mirror it for this test.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="facebook/sam3.*Hugging Face hub.*HF_TOKEN"):
        sam3ray.load_sam3_image_model("facebook/sam3")


# --------------------------------------------------------------------------- bad checkpoints


def test_unreadable_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*not a readable"):
        sam3ray.load_sam3_image_model(str(path))


def _drop_key(ckpt):
    state = dict(ckpt["model"])
    del state["detector.dot_prod_scoring.prompt_proj.weight"]
    return {**ckpt, "model": state}


def _wrong_shape(ckpt):
    state = dict(ckpt["model"])
    k = "detector.transformer.decoder.query_embed.weight"
    state[k] = torch.zeros(state[k].shape[0] + 1, state[k].shape[1])
    return {**ckpt, "model": state}


def _extra_key(ckpt):
    return {**ckpt, "model": {**ckpt["model"], "detector.surprise.weight": torch.zeros(3)}}


MISFITS = {
    "a key removed": (_drop_key, r"1 missing keys.*dot_prod_scoring\.prompt_proj\.weight"),
    "a tensor of the wrong shape": (_wrong_shape, r"1 shape mismatches.*query_embed\.weight"),
    "an unexpected key": (_extra_key, r"1 unexpected keys.*surprise\.weight"),
    "not a dict": (lambda c: [torch.zeros(2)], r"expected a dict, got list"),
    "bad arch metadata": (
        lambda c: {**c, META_KEY: {"arch": {**c[META_KEY]["arch"], "vit_colour": 3}}},
        r"bad sam3ray\.arch metadata.*vit_colour",
    ),
    "tiny weights under another arch": (
        lambda c: {**c, META_KEY: {"arch": Sam3Arch.tiny(resolution=504).to_dict()}},
        r"shape mismatches",
    ),
}


@pytest.mark.parametrize("case", list(MISFITS))
def test_mismatched_checkpoint_is_one_checkpoint_error(tiny_ckpt_dict, tmp_path, case):
    mutate, message = MISFITS[case]
    path = _save_variant(mutate(tiny_ckpt_dict), tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=re.escape(path) + ".*" + message):
        sam3ray.load_sam3_image_model(path)


def test_non_sam_dict_is_refused_before_building_a_model(tmp_path, monkeypatch):
    """A dict without ``detector.*`` keys (and so without sam3ray metadata) is not a
    SAM 3 checkpoint. It must be refused from its keys alone: building the default
    full-size architecture first allocates 840 M parameters (~3.4 GB, ~15 s on CPU)
    only to throw them away, and can OOM a small worker instead of raising."""
    import sam3ray.model.arch as arch_mod

    built: list[Sam3Arch] = []

    def spy(arch):
        built.append(arch)
        raise AssertionError(f"built a {arch.vit_dim}-wide model before checking the keys")

    monkeypatch.setattr(arch_mod, "build_image_model", spy)
    path = _save_variant({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=re.escape(path) + r".*no 'detector\.\*' keys"):
        sam3ray.load_sam3_image_model(path)
    assert built == []


class _Payload:
    """Pickles as a call to ``os.makedirs(marker)``: arbitrary code on an unsafe load."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickled_code_in_a_checkpoint_is_refused_and_never_runs(tiny_ckpt_dict, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = {**tiny_ckpt_dict, "extra": _Payload(str(marker))}
    path = _save_variant(ckpt, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=re.escape(path) + ".*not a readable"):
        sam3ray.load_sam3_image_model(path)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it (the test is not vacuous).
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.is_dir()


# --------------------------------------------------------------------------- tiny model


def test_tiny_checkpoint_is_finite_official_layout_and_records_its_arch(tiny_ckpt_dict):
    state = tiny_ckpt_dict["model"]
    assert state and all(k.startswith("detector.") for k in state)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert bad == []
    assert Sam3Arch.from_dict(tiny_ckpt_dict[META_KEY]["arch"]) == Sam3Arch.tiny()
    n_params = sum(v.numel() for k, v in state.items() if v.is_floating_point())
    assert 3e6 < n_params < 6e6


def test_loader_rebuilds_the_tiny_arch_and_reload_is_bit_identical(tiny_checkpoint, tiny_model):
    model, info = load_checkpoint_into_new_model(tiny_checkpoint)
    assert info.arch == Sam3Arch.tiny()
    assert re.fullmatch(r"sam3-tiny\.pt@[0-9a-f]{12}", info.model_id)

    memory, _ = build_tiny_model(seed=0)  # the same seed conftest's checkpoint used
    mem_state, disk_state = memory.state_dict(), model.state_dict()
    assert mem_state.keys() == disk_state.keys()
    assert all(torch.equal(mem_state[k], disk_state[k]) for k in mem_state)

    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)]
    a, b = _detections(memory, images), _detections(tiny_model, images)
    assert len(a[0]) == 40
    assert [(d.score, d.box, d.mask_rle) for d in a[0]] == [
        (d.score, d.box, d.mask_rle) for d in b[0]
    ]


def test_tiny_model_detects_at_the_default_conf_on_random_images(tiny_model):
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(96, 128), (150, 100)]]
    engine = Sam3Engine(tiny_model, ConceptSet((Concept(CAT, "cat", ("cat",)),)), device="cpu")
    assert engine.config.conf == 0.4
    out = engine.predict(images)
    assert all(len(dets) > 0 for dets in out)
    assert all(d.score >= 0.4 for dets in out for d in dets)


def test_engine_from_checkpoint_uses_the_checkpoint_arch_and_id(tiny_checkpoint):
    concepts = ConceptSet((Concept(CAT, "cat", ("cat",)),))
    engine = Sam3Engine.from_checkpoint(tiny_checkpoint, concepts, device="cpu")
    _, info = load_checkpoint_into_new_model(tiny_checkpoint)
    assert engine.resolution == 336
    assert engine.model_id == info.model_id
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert len(engine.predict([image])) == 1


def test_copy_of_the_checkpoint_loads_with_a_model_id_from_its_content(tiny_checkpoint, tmp_path):
    copy = tmp_path / "renamed.pt"
    shutil.copyfile(tiny_checkpoint, copy)
    _, a = load_checkpoint_into_new_model(tiny_checkpoint)
    _, b = load_checkpoint_into_new_model(str(copy))
    assert a.model_id.split("@")[1] == b.model_id.split("@")[1]
    assert b.model_id.startswith("renamed.pt@")


# --------------------------------------------------------------------------- full arch


def test_full_arch_matches_the_official_builder_on_the_meta_device(meta_device):
    """``Sam3Arch.full()`` rebuilds exactly the official module tree and state-dict
    layout (the released checkpoint's keys and shapes), without allocating its 840 M
    parameters: both builds run on the meta device."""

    from sam3ray.model import compat

    compat.ensure()
    import sam3.model_builder as official

    with meta_device():
        ours = build_image_model(Sam3Arch.full())
        theirs = official.build_sam3_image_model(
            bpe_path=compat.bpe_path(),
            load_from_HF=False,
            checkpoint_path=None,
            device="cpu",
            enable_inst_interactivity=False,
        )
    assert {p.device.type for p in ours.parameters()} == {"meta"}
    assert {p.device.type for p in theirs.parameters()} == {"meta"}
    assert type(ours) is type(theirs)

    a, b = ours.state_dict(), theirs.state_dict()
    assert sorted(a) == sorted(b)
    assert {k: (tuple(v.shape), v.dtype) for k, v in a.items()} == {
        k: (tuple(v.shape), v.dtype) for k, v in b.items()
    }
    assert {n: type(m) for n, m in ours.named_modules()} == {
        n: type(m) for n, m in theirs.named_modules()
    }
    n_params = sum(p.numel() for p in ours.parameters())
    assert 830e6 < n_params < 850e6
