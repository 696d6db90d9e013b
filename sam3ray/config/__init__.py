"""The job's typed configuration: schema, loading with ``--set``, checks before Ray starts."""

from sam3ray.config.checks import redact, validate_paths
from sam3ray.config.loading import apply_overrides, load_config
from sam3ray.config.schema import (
    InferenceConfig,
    InputConfig,
    JobConfig,
    ModelConfig,
    OutputConfig,
    PlanConfig,
    PromptsConfig,
    ResourcesConfig,
    VideoConfig,
    is_hub_id,
    label_fields,
    label_settings,
)
from sam3ray.core.errors import ConfigError

__all__ = [
    "ConfigError",
    "InferenceConfig",
    "InputConfig",
    "JobConfig",
    "ModelConfig",
    "OutputConfig",
    "PlanConfig",
    "PromptsConfig",
    "ResourcesConfig",
    "VideoConfig",
    "apply_overrides",
    "is_hub_id",
    "label_fields",
    "label_settings",
    "load_config",
    "redact",
    "validate_paths",
]
