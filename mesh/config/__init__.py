"""The config edge: Kubernetes-style YAML to the frozen model, with actionable errors."""
from .errors import REASONS, ConfigError, ConfigErrors, Origin
from .load import SUPPORTED_KINDS, Loaded, load_paths, load_text, parse_paths, parse_text
from .validate import IMPLICIT_NAMESPACES, validate_batch, validate_deletion

__all__ = [
    "REASONS", "ConfigError", "ConfigErrors", "Origin", "SUPPORTED_KINDS", "Loaded",
    "load_paths", "load_text", "parse_paths", "parse_text", "IMPLICIT_NAMESPACES",
    "validate_batch", "validate_deletion",
]
