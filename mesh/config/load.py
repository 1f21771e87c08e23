"""Kubernetes-style YAML text and files to the model, through the one converter (convert.py).

This edge adds what only a file has: line numbers in errors, duplicate-key detection, `kind: List`
documents, and the local runtime's Pod source directory (the file's directory).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..model import Pod, Resource
from .convert import SUPPORTED_KINDS, Loaded, convert_located, guess_key
from .errors import ConfigError, ConfigErrors, Origin
from .source import Ctx, Document, Path, describe, format_path, read_documents
from .validate import last_wins

__all__ = ["SUPPORTED_KINDS", "Loaded", "load_text", "load_paths", "parse_text", "parse_paths"]

_YAML_SUFFIXES = (".yaml", ".yml", ".json")


def _objects(doc: Document, source: str,
             errors: list[ConfigError]) -> Iterator[tuple[Any, Path, Origin]]:
    """The objects of a document: itself, or the items of a `kind: List`."""
    data = doc.data
    origin = Origin(source, doc.index)
    if isinstance(data, Mapping) and data.get("kind") == "List":
        items = data.get("items")
        if not isinstance(items, list):
            ctx = Ctx(origin, doc.lines, ())
            ctx.kind = "List"
            ctx.error(("items",), f"must be a list of objects, got {describe(items)}",
                      "missing_field" if items is None else "bad_value")
            errors.extend(ctx.errors)
            return
        for i, item in enumerate(items):
            line = doc.lines.get(("items", i))
            yield item, ("items", i), Origin(source, doc.index, i + 1, line)
    else:
        yield data, (), origin.at(doc.lines.get(()))


def _dup_key_errors(doc: Document, source: str) -> list[ConfigError]:
    errors = []
    for path, line, first in doc.dups:
        obj, rel, item = doc.data, path, None
        if (isinstance(obj, Mapping) and obj.get("kind") == "List" and len(path) > 2
                and path[0] == "items" and isinstance(path[1], int)):
            items = obj.get("items")
            obj = items[path[1]] if isinstance(items, list) and path[1] < len(items) else None
            rel, item = path[2:], path[1] + 1
        errors.append(ConfigError(
            f"key {json.dumps(path[-1])} is defined twice (first at line {first}); "
            "YAML keeps only the last one", reason="duplicate", source=source,
            key=guess_key(obj), field=format_path(rel), document=doc.index, item=item, line=line))
    return errors


def _default_base_dir(source: str) -> str:
    if source.startswith("<"):  # "<stdin>" and friends: relative to where we run
        return os.getcwd()
    return os.path.dirname(os.path.abspath(source))


def parse_text(text: str, source: str, *, base_dir: str | None = None) -> list[Loaded]:
    """Like load_text, but keeps each object's origin (file, document, item, line) and warnings."""
    base = os.path.abspath(base_dir) if base_dir is not None else _default_base_dir(source)
    errors: list[ConfigError] = []
    out: list[Loaded] = []
    for doc in read_documents(text, source, errors):
        errors.extend(_dup_key_errors(doc, source))
        if doc.data is None:
            continue  # empty document (e.g. a trailing ---)
        for obj, prefix, origin in _objects(doc, source, errors):
            loaded, errs = convert_located(obj, origin, doc.lines, prefix)
            errors.extend(errs)
            if loaded is not None:
                out.append(_local(loaded, base))
    if errors:
        raise ConfigErrors(errors)
    return last_wins(out)


def _local(loaded: Loaded, base_dir: str) -> Loaded:
    # Local mode only: a Pod runs its containers in the directory of the file it came from.
    r = loaded.resource
    return dataclasses.replace(loaded, resource=dataclasses.replace(r, source_dir=base_dir)) \
        if isinstance(r, Pod) else loaded


def load_text(text: str, source: str, *, base_dir: str | None = None) -> list[Resource]:
    """Convert multi-document Kubernetes YAML to model objects, or raise ConfigErrors (all of
    them). `base_dir` (default: the source file's directory) becomes each Pod's source_dir."""
    return [loaded.resource for loaded in parse_text(text, source, base_dir=base_dir)]


def _expand(paths: Sequence[str], errors: list[ConfigError]) -> Iterator[str]:
    for path in paths:
        if path != "-" and os.path.isdir(path):
            # Like `kubectl apply -f dir/`: the directory's YAML/JSON files, not recursive.
            files = sorted(f for f in os.listdir(path) if f.endswith(_YAML_SUFFIXES))
            if not files:
                errors.append(ConfigError("directory has no .yaml, .yml or .json files",
                                          reason="unreadable", source=path))
            yield from (os.path.join(path, f) for f in files)
        else:
            yield path


def parse_paths(paths: Sequence[str]) -> list[Loaded]:
    """Like load_paths, but keeps each object's origin and warnings. An object defined in several
    files or documents is taken from the last one (as kubectl apply), with a warning."""
    if isinstance(paths, str):
        raise TypeError("parse_paths takes a sequence of paths, not a single string")
    errors: list[ConfigError] = []
    out: list[Loaded] = []
    for path in _expand(paths, errors):
        source = "<stdin>" if path == "-" else path
        try:
            if path == "-":
                text = sys.stdin.read()
            else:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
        except OSError as e:
            errors.append(ConfigError(f"cannot read file: {e.strerror or e}", reason="unreadable",
                                      source=source))
            continue
        except UnicodeDecodeError as e:
            errors.append(ConfigError(f"not UTF-8 text (byte {e.start})", reason="unreadable",
                                      source=source))
            continue
        try:
            out.extend(parse_text(text, source))
        except ConfigErrors as e:
            errors.extend(e.errors)
    if errors:
        raise ConfigErrors(errors)
    return last_wins(out)


def load_paths(paths: Sequence[str]) -> list[Resource]:
    """Load files (a directory means its *.yaml/*.yml/*.json; "-" means stdin), collecting the
    errors of all files into one ConfigErrors."""
    return [loaded.resource for loaded in parse_paths(paths)]