"""Typed job configuration (YAML + ``section.key=value`` overrides)."""
from loft_hpc.config.errors import ConfigError
from loft_hpc.config.load import config_from_dict, config_to_dict, config_to_yaml, load_config
from loft_hpc.config.schema import SECTIONS, JobConfig
from loft_hpc.config.steps import Step

__all__ = ["ConfigError", "JobConfig", "SECTIONS", "Step", "load_config", "config_from_dict", "config_to_dict", "config_to_yaml"]
