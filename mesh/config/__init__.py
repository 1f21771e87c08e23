"""The config edge: Kubernetes-style objects (dicts or YAML) to the frozen model, with actionable
errors and warnings."""
from .errors import REASONS, WARNING_REASONS, ConfigError, ConfigErrors, ConfigWarning, Origin
from .convert import Loaded, convert, convert_batch
from .load import SUPPORTED_KINDS, load_paths, load_text, parse_paths, parse_text
from .validate import IMPLICIT_NAMESPACES, last_wins, validate_batch, validate_deletion

__all__ = [
    "REASONS", "WARNING_REASONS", "ConfigError", "ConfigErrors", "ConfigWarning", "Origin",
    "SUPPORTED_KINDS", "Loaded", "convert", "convert_batch",
    "load_paths", "load_text", "parse_paths", "parse_text", "IMPLICIT_NAMESPACES",
    "last_wins", "validate_batch", "validate_deletion",
]
