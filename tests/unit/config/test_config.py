"""JobConfig: parsing, overrides, path resolution, redaction and path checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sam3ray import config as C
from sam3ray.config import (
    ConfigError,
    JobConfig,
    label_fields,
    label_settings,
    load_config,
    redact,
    validate_paths,
)
from sam3ray.storage.location import Location


def write_cfg(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def minimal(**extra) -> dict:
    data = {
        "input": {"uris": ["s3://bucket/imgs/**/*.jpg"]},
        "prompts": {"concepts": "s3://bucket/concepts.csv"},
        "model": {"checkpoint": "facebook/sam3"},
        "output": {"uri": "s3://bucket/labels/"},
    }
    data.update(extra)
    return data


def test_minimal_config_gets_defaults(tmp_path):
    cfg = load_config(write_cfg(tmp_path / "job.yaml", minimal()))
    assert cfg.inference.conf == 0.4 and cfg.inference.iou == 0.7 and cfg.inference.max_det == 300
    assert cfg.inference.max_imgsz is None and cfg.resources.actors == (1, 8)
    assert cfg.inference.images_per_batch == cfg.inference.queries_per_forward == "auto"
    assert cfg.output.mode == "resume" and cfg.video.overlap_frames == 8
    assert cfg.model.checkpoint == "facebook/sam3"  # a hub id stays as is
    assert cfg.input.max_pixels == 178_956_970 and ".tiff" in cfg.input.extensions
    assert cfg.input.local_allowed() is False  # an object-store job
    assert cfg.output_location == Location("s3://bucket/labels/", {})


def test_every_field_is_described():
    models = [JobConfig, C.InputConfig, C.PromptsConfig, C.ModelConfig, C.InferenceConfig]
    models += [C.ResourcesConfig, C.OutputConfig, C.VideoConfig]
    for model in models:
        assert model.model_config["extra"] == "forbid"
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name}"


SECTION_MODELS = {
    "input": C.InputConfig,
    "prompts": C.PromptsConfig,
    "model": C.ModelConfig,
    "inference": C.InferenceConfig,
    "resources": C.ResourcesConfig,
    "output": C.OutputConfig,
    "video": C.VideoConfig,
}


def marked_paths(model, name: str) -> list[str] | None:
    """The ``affects_labels`` metadata of one field, as declared (None: not marked)."""
    extra = model.model_fields[name].json_schema_extra
    return extra.get("affects_labels") if isinstance(extra, dict) else None


def test_label_fields_are_real_fields_with_known_paths():
    assert set(SECTION_MODELS) == {
        n for n, f in JobConfig.model_fields.items() if f.annotation in SECTION_MODELS.values()
    }
    for path in ("image", "video"):
        fields = label_fields(path)
        assert fields and len(set(fields)) == len(fields)
        for section, name in fields:
            assert name in SECTION_MODELS[section].model_fields, f"{section}.{name}"
            assert path in marked_paths(SECTION_MODELS[section], name)
    # Every mark names a path label_fields knows (a typo such as "images" would be ignored).
    for section, model in SECTION_MODELS.items():
        for name in model.model_fields:
            paths = marked_paths(model, name)
            if paths is not None:
                assert paths and set(paths) <= {"image", "video"}, f"{section}.{name}: {paths}"
                for path in paths:
                    assert (section, name) in label_fields(path)
    shared = {("model", "checkpoint")} | {("inference", f) for f in ("conf", "iou", "nms")}
    shared.add(("inference", "max_det"))
    assert shared <= set(label_fields("image")) and shared <= set(label_fields("video"))
    assert label_fields("audio") == []


def test_speed_only_fields_never_decide_labels():
    speed = [("inference", "images_per_batch"), ("inference", "queries_per_forward")]
    speed += [("model", f) for f in ("device", "dtype", "compile", "cache_dir")]
    speed += [("resources", f) for f in C.ResourcesConfig.model_fields]
    assert ("resources", "gpus_per_actor") in speed and ("resources", "actors") in speed
    for section, name in speed:
        assert marked_paths(SECTION_MODELS[section], name) is None, f"{section}.{name}"
        for path in ("image", "video"):
            assert (section, name) not in label_fields(path)


def test_max_imgsz_decides_image_labels_only(tmp_path):
    assert marked_paths(C.InferenceConfig, "max_imgsz") == ["image"]
    assert ("inference", "max_imgsz") in label_fields("image")
    assert ("inference", "max_imgsz") not in label_fields("video")
    path = write_cfg(tmp_path / "job.yaml", minimal())
    base = load_config(path)
    changed = load_config(path, ["inference.max_imgsz=512", "inference.images_per_batch=2"])
    assert label_settings(base, "video") == label_settings(changed, "video")
    assert label_settings(base, "image") != label_settings(changed, "image")
    assert label_settings(changed, "image")["inference.max_imgsz"] == 512
    assert "inference.images_per_batch" not in label_settings(changed, "image")
    faster = load_config(path, ["model.dtype=bfloat16", "resources.actors=4", "model.compile=true"])
    for p in ("image", "video"):
        assert label_settings(base, p) == label_settings(faster, p)
    stricter = load_config(path, ["inference.conf=0.6"])
    assert label_settings(stricter, "video")["inference.conf"] == 0.6


def test_batch_sizes_are_whole_numbers_or_auto(tmp_path):
    path = write_cfg(tmp_path / "job.yaml", minimal())
    cfg = load_config(path, ["inference.images_per_batch=auto", "inference.queries_per_forward=16"])
    assert (cfg.inference.images_per_batch, cfg.inference.queries_per_forward) == ("auto", 16)
    for bad in ("0", "-3", "many", "2.5"):
        with pytest.raises(ConfigError, match="images_per_batch"):
            load_config(path, [f"inference.images_per_batch={bad}"])
    with pytest.raises(ConfigError, match="max_imgsz"):
        load_config(path, ["inference.max_imgsz=16"])  # below 32: not a mask grid


def test_overrides_parse_yaml_values(tmp_path):
    path = write_cfg(tmp_path / "job.yaml", minimal())
    cfg = load_config(
        path,
        [
            "inference.conf=0.25",
            "resources.actors=[2, 6]",
            "inference.nms=false",
            "output.mode=overwrite",
            "video.shard_frames=32",  # section absent from the file: created
            "input.extensions=[jpg, .PNG]",
            "run_id=nightly-2024.01",
        ],
    )
    assert cfg.inference.conf == 0.25 and cfg.inference.nms is False
    assert cfg.resources.actors == (2, 6) and cfg.output.mode == "overwrite"
    assert cfg.video.shard_frames == 32 and cfg.input.extensions == [".jpg", ".png"]
    assert cfg.run_id == "nightly-2024.01"
    assert load_config(path, ["resources.actors=3"]).resources.actors == (3, 3)
    empty_section = write_cfg(tmp_path / "e.yaml", minimal(video=None))
    assert load_config(empty_section).video.shard_frames == 64
    assert load_config(empty_section, ["video.frame_stride=2"]).video.frame_stride == 2


@pytest.mark.parametrize(
    "override,field,text",
    [
        ("inference.conf=4", "inference.conf", "less than or equal to 1"),
        ("inference.confidence=0.3", "inference.confidence", "Extra inputs are not permitted"),
        ("resources.actors=[5, 2]", "resources", "1 <= min <= max"),
        ("resources.actors=[0, 2]", "resources", "1 <= min <= max"),
        ("resources.gpus_per_actor=1.5", "resources", "whole number"),
        ("video.overlap_frames=64", "video", "smaller than shard_frames"),
        ("run_id=../etc", "run_id", "path part"),
        ("run_id=..", "run_id", "path part"),
        ("input.uris=[]", "input", "at least one of input.uris / input.manifest"),
        ("output.max_error_rate=1.5", "output.max_error_rate", "less than or equal to 1"),
        ("model.dtype=float16", "model.dtype", "'float32' or 'bfloat16'"),
        ("input.uris=s3://x", "input.uris", "valid list"),
    ],
)
def test_invalid_values_name_file_and_field(tmp_path, override, field, text):
    path = write_cfg(tmp_path / "configs" / "x.yaml", minimal())
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    msg = str(err.value)
    assert msg.startswith(f"{path}: {field}: "), msg
    assert text in msg
    if "Extra inputs" in text:
        assert "(allowed: conf, iou, nms, max_det," in msg


def test_message_format_matches_the_house_style(tmp_path):
    path = write_cfg(tmp_path / "x.yaml", minimal(inference={"conf": 2}))
    with pytest.raises(ConfigError, match=r"x\.yaml: inference\.conf: Input should be less than"):
        load_config(path)


def test_missing_sections_and_bad_files(tmp_path):
    data = minimal()
    del data["prompts"]
    with pytest.raises(ConfigError, match="prompts: Field required"):
        load_config(write_cfg(tmp_path / "a.yaml", data))
    (tmp_path / "b.yaml").write_text("input: [unclosed")
    with pytest.raises(ConfigError, match="b.yaml: invalid YAML"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="c.yaml: top level must be a mapping"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(write_cfg(tmp_path / "d.yaml", minimal(inference={"conf": 0.5})), ["x"])
    with pytest.raises(ConfigError, match="inference.conf is not a mapping"):
        load_config(tmp_path / "d.yaml", ["inference.conf.x=1"])


def test_relative_paths_cwd_first_then_config_dir(tmp_path, monkeypatch):
    cfg_dir, work = tmp_path / "cfgs", tmp_path / "work"
    (cfg_dir / "imgs").mkdir(parents=True)
    (cfg_dir / "imgs" / "a.jpg").write_bytes(b"x")
    work.mkdir()
    (cfg_dir / "concepts.csv").write_text("class_id,text\n")
    (cfg_dir / "geo.csv").write_text("")
    (work / "geo.csv").write_text("")  # exists in both: cwd wins
    path = write_cfg(
        cfg_dir / "job.yaml",
        {
            "input": {"uris": ["imgs/*.jpg", "s3://b/x/"], "manifest": "list.txt"},
            "prompts": {"concepts": "concepts.csv", "geometric": "geo.csv"},
            "model": {"checkpoint": "ckpt/sam3.pt", "cache_dir": "cache"},
            "output": {"uri": "out"},
        },
    )
    monkeypatch.chdir(work)
    cfg = load_config(path)
    assert cfg.input.uris == [str(cfg_dir / "imgs" / "*.jpg"), "s3://b/x/"]
    assert cfg.prompts.concepts == str(cfg_dir / "concepts.csv")
    assert cfg.prompts.geometric == str(work / "geo.csv")
    assert cfg.input.manifest == str(work / "list.txt")  # exists nowhere: cwd
    assert cfg.model.checkpoint == str(work / "ckpt" / "sam3.pt")  # not a hub id
    assert cfg.model.cache_dir == str(work / "cache") and cfg.output.uri == str(work / "out")
    assert cfg.input.local_allowed() is False  # one uri is s3://


def test_redact_removes_every_secret(tmp_path):
    secrets = ["AKIAEXAMPLE", "s3cr3t-value", "tok-123", "pw-456", "sess-789", "cred-0"]
    opts = {
        "key": secrets[0],
        "secret": secrets[1],
        "token": secrets[2],
        "client_kwargs": {
            "endpoint_url": f"http://user:{secrets[3]}@minio.local:9000",
            "region_name": "eu-west-1",
            "aws_session_token": secrets[4],
            "AWS_SECRET_ACCESS_KEY": "x" + secrets[1],
        },
        "config_kwargs": {"Credentials": {"nested": secrets[5]}},
    }
    data = minimal()
    data["input"]["storage_options"] = opts
    data["output"]["storage_options"] = {"Password": secrets[3]}
    cfg = load_config(write_cfg(tmp_path / "job.yaml", data))
    dumped = json.dumps(redact(cfg))
    for s in secrets:
        assert s not in dumped
    out = redact(cfg)
    assert out["input"]["storage_options"]["key"] == "***"
    assert out["input"]["storage_options"]["client_kwargs"]["region_name"] == "eu-west-1"
    assert out["inference"]["conf"] == 0.4 and out["resources"]["actors"] == [1, 8]
    # The config object itself keeps its secrets, and output falls back to input options.
    assert cfg.input.storage_options["key"] == secrets[0]
    assert cfg.output_location.options == {"Password": secrets[3]}
    cfg.output.storage_options = {}
    assert cfg.output_location.options["secret"] == secrets[1]
    assert cfg.checkpoint_location.options["secret"] == secrets[1]
    assert cfg.checkpoint_location.uri == "facebook/sam3"


def local_job(tmp_path: Path, **over) -> JobConfig:
    (tmp_path / "imgs").mkdir(exist_ok=True)
    (tmp_path / "concepts.csv").write_text("class_id,text\n")
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    data = {
        "input": {"uris": [str(tmp_path / "imgs")]},
        "prompts": {"concepts": str(tmp_path / "concepts.csv")},
        "model": {"checkpoint": str(tmp_path / "ckpt.pt")},
        "output": {"uri": str(tmp_path / "labels")},
    }
    for dotted, value in over.items():
        section, key = dotted.split("__")
        data[section][key] = value
    return load_config(write_cfg(tmp_path / "job.yaml", data))


def test_validate_paths_local(tmp_path):
    validate_paths(local_job(tmp_path))
    validate_paths(local_job(tmp_path, model__checkpoint="facebook/sam3"))
    cases = {
        "prompts.concepts": {"prompts__concepts": str(tmp_path / "nope.csv")},
        "prompts.geometric": {"prompts__geometric": str(tmp_path / "geo.csv")},
        "input.manifest": {"input__manifest": str(tmp_path / "list.txt")},
        "model.checkpoint": {"model__checkpoint": str(tmp_path / "missing.pt")},
    }
    for field, over in cases.items():
        with pytest.raises(ConfigError) as err:
            validate_paths(local_job(tmp_path, **over))
        assert f"job.yaml: {field}: not found" in str(err.value)
    with pytest.raises(ConfigError, match="output.uri: .* lies inside input"):
        validate_paths(local_job(tmp_path, output__uri=str(tmp_path / "imgs" / "labels")))
    with pytest.raises(ConfigError, match="lies inside input"):
        validate_paths(local_job(tmp_path, output__uri=str(tmp_path / "imgs") + "/"))
    validate_paths(local_job(tmp_path, output__uri=str(tmp_path / "imgs_labels")))


def test_validate_paths_object_store(tmp_path, moto_s3):
    bucket = moto_s3.new_bucket("cfg")
    concepts = moto_s3.put(bucket, "prompts/concepts.csv", "class_id,text\n")
    ckpt = moto_s3.put(bucket, "models/sam3.pt", b"weights")
    data = {
        "input": {
            "uris": [f"s3://{bucket}/imgs/**/*.jpg"],
            "storage_options": moto_s3.storage_options,
        },
        "prompts": {"concepts": concepts},
        "model": {"checkpoint": ckpt},
        "output": {"uri": f"s3://{bucket}/labels"},
    }
    path = write_cfg(tmp_path / "s3.yaml", data)
    validate_paths(load_config(path))
    with pytest.raises(ConfigError, match="model.checkpoint: not found: s3://"):
        validate_paths(load_config(path, [f"model.checkpoint=s3://{bucket}/models/x.pt"]))
    with pytest.raises(ConfigError, match="prompts.concepts: not found"):
        validate_paths(load_config(path, [f"prompts.concepts=s3://{bucket}/none.csv"]))
    with pytest.raises(ConfigError, match=r"s3\.yaml: output\.uri: .*imgs/labels lies inside"):
        validate_paths(load_config(path, [f"output.uri=s3://{bucket}/imgs/labels"]))
    validate_paths(load_config(path, [f"output.uri=s3://{bucket}/imgs_labels"]))
    with pytest.raises(ConfigError, match="lies inside"):  # a glob prefix covers siblings
        validate_paths(
            load_config(
                path, [f"input.uris=[s3://{bucket}/imgs*]", f"output.uri=s3a://{bucket}/imgs_out"]
            )
        )
