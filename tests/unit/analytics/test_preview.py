"""The HTML gallery: files and links, thumbnails, object storage, and a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_scan import CIRCLE, NAMES, RING, UNUSED, build_output

from sam3ray.analytics.preview import render_preview, render_thumbnail
from sam3ray.core.masks import encode_rle

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--window-size=1200,900"]  # fmt: skip


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("preview")
    return build_output(str(root / "out"), {}, str(root / "images"))


@pytest.fixture(scope="module")
def gallery(synthetic, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("gallery") / "site"
    result = render_preview(synthetic.loc, synthetic.at(str(out)), per_concept=3)
    return out, result


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt-get once per session if missing (root only)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("chromium is not installed and apt-get (as root) is unavailable to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    for cmd in (["apt-get", "update", "-q"], install):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200,
                                  stdin=subprocess.DEVNULL)  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.skip(f"{' '.join(cmd)} timed out")
        if done.returncode != 0:
            pytest.skip(f"{' '.join(cmd)} failed: {done.stderr.strip()[-400:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get installed chromium but no chromium binary is on PATH")
    return found


def _img_sources(html: str) -> list[str]:
    return re.findall(r"<img [^>]*src=[\"']([^\"']+)[\"']", html)


def test_gallery_files_and_relative_links(synthetic, gallery):
    site, result = gallery
    html = (site / "index.html").read_text(encoding="utf-8")
    sources = _img_sources(html)
    assert result.thumbnails == len([s for s in sources if s.startswith("thumbs/")]) > 0
    assert result.failed == 0
    for src in sources:  # relative links to files that exist
        assert "://" not in src and not src.startswith("/")
        assert (site / src).is_file(), src
    for name in NAMES.values():
        assert name in html
    assert "no sample images" in html  # the concept without detections has its section
    for cid in (CIRCLE, RING):
        thumbs = list((site / "thumbs" / cid).glob("*.jpg"))
        images = {d["image_id"] for d in synthetic.masks(cid) if d["frame_index"] is None}
        assert len(thumbs) == min(3, len(images))
        assert synthetic.video_id not in {t.stem for t in thumbs}  # video frames are not drawn
        for thumb in thumbs:
            with Image.open(thumb) as im:
                assert im.format == "JPEG" and max(im.size) <= 512
    for cid in NAMES:
        with Image.open(site / "hist" / f"{cid}.png") as im:
            assert im.format == "PNG" and np.asarray(im.convert("L")).std() > 5
    assert not (site / "thumbs" / UNUSED).exists()


def test_thumbnail_tints_the_mask_and_scales_down():
    image = np.zeros((1000, 800, 3), np.uint8)
    mask = np.zeros((1000, 800), bool)
    mask[200:600, 100:500] = True
    counts, _ = encode_rle(mask)
    det = {"mask_rle": counts, "mask_size": [1000, 800], "box": [100, 200, 500, 600], "score": 0.9}
    thumb = np.asarray(render_thumbnail(image, [det], "box", max_side=512))
    assert thumb.shape == (512, 410, 3)
    assert thumb[205, 154].sum() > 60  # inside the mask (scale 0.512): tinted
    assert thumb[480, 380].sum() == 0  # outside: untouched black


def test_unreadable_image_is_left_out(tmp_path):
    syn = build_output(str(tmp_path / "out"), {}, str(tmp_path / "images"))
    victim = next(d["uri"] for d in syn.masks(CIRCLE) if d["frame_index"] is None)
    os.remove(victim)
    result = render_preview(syn.loc, syn.at(str(tmp_path / "site")), per_concept=10)
    html = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert result.failed >= 1 and "could not be read" in html
    assert all((tmp_path / "site" / s).is_file() for s in _img_sources(html))


def test_tools_on_object_storage(moto_s3, tmp_path):
    """Output, images, concept table and results on S3 (moto), via storage options only."""
    from sam3ray.analytics.coco import export_coco
    from sam3ray.analytics.labelstudio import export_labelstudio
    from sam3ray.analytics.stats import compute_stats

    bucket = moto_s3.new_bucket("gallery")
    opts = moto_s3.storage_options
    syn = build_output(f"s3://{bucket}/out", opts, f"s3://{bucket}/images")
    stats = compute_stats(syn.loc, write=True)
    rows = {r["class_id"]: r for r in stats.concepts.to_pylist()}
    assert rows[CIRCLE]["detections"] == len(syn.masks(CIRCLE))
    assert rows[UNUSED]["detections"] == 0 and rows[UNUSED]["concept"] == "unused"
    assert syn.at(stats.concepts_uri).exists() and syn.at(stats.runs_uri).exists()
    result = render_preview(syn.loc, syn.at(f"s3://{bucket}/site"), per_concept=2)
    assert result.thumbnails >= 4 and result.failed == 0
    assert syn.at(result.index).exists()
    coco = export_coco(syn.loc, syn.at(f"s3://{bucket}/exports/coco.json"))
    data = json.loads(syn.at(coco.path).read_bytes())
    assert len(data["annotations"]) == coco.annotations == len(syn.detections)
    tasks = export_labelstudio(syn.loc, syn.at(f"s3://{bucket}/exports/ls.json"))
    assert len(json.loads(syn.at(tasks.path).read_bytes())) == tasks.tasks == len(syn.ok_images)


def test_preview_cli(synthetic, tmp_path, capsys):
    from sam3ray.cli import main

    assert main(["preview", synthetic.output, "--out", str(tmp_path / "g"), "--per-concept", "1",
                 "--concepts", "circle"]) == 0  # fmt: skip
    assert "preview: 1 thumbnails" in capsys.readouterr().out
    assert len(list((tmp_path / "g" / "thumbs").rglob("*.jpg"))) == 1


def test_gallery_in_headless_chromium(gallery, chromium, tmp_path):
    """Real browser: a screenshot that shows the thumbnails (found in it pixel by pixel),
    and every <img> loaded (naturalWidth > 0)."""
    import cv2

    site, _ = gallery
    url = (site / "index.html").as_uri()
    sources = _img_sources((site / "index.html").read_text(encoding="utf-8"))
    n_images = len(sources)
    shot = tmp_path / "shot.png"
    base = [chromium, *CHROMIUM_FLAGS, "--virtual-time-budget=10000",
            "--force-device-scale-factor=1"]  # fmt: skip
    run = dict(capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    done = subprocess.run([*base, f"--user-data-dir={tmp_path / 'p1'}", f"--screenshot={shot}",
                           url], **run)  # fmt: skip
    assert shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (900, 1200)
    assert pixels.var() > 100  # not a blank page
    # The first section's thumbnails are on screen, drawn as rendered (1:1 pixels).
    screen = cv2.cvtColor(pixels.astype(np.uint8), cv2.COLOR_RGB2GRAY)
    first = [src for src in sources if src.startswith("thumbs/")][:3]
    for src in first:
        with Image.open(site / src) as im:
            thumb = np.asarray(im.convert("L"))
        found = cv2.matchTemplate(screen, thumb, cv2.TM_CCOEFF_NORMED).max()
        assert found > 0.9, (src, found)
        noise = np.random.default_rng(0).integers(0, 256, thumb.shape, dtype=np.uint8)
        assert cv2.matchTemplate(screen, noise, cv2.TM_CCOEFF_NORMED).max() < 0.5  # a control
    assert len(first) == 3
    done = subprocess.run([*base, f"--user-data-dir={tmp_path / 'p2'}", "--dump-dom", url], **run)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', done.stdout)
    assert loaded, done.stdout[:500]
    assert int(loaded.group(2)) == n_images > 4
    assert loaded.group(1) == loaded.group(2)  # every image complete with naturalWidth > 0
