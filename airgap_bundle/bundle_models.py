"""The models a bundle carries: where each lies in the bundle and how the manifest lists them.

The first ``--model`` is the release's default model and lies under ``model/``, exactly where a
single-model bundle has always put it, so one-model bundles keep the layout every installer and
tool reads, and a delta that adds a model does not move (and re-ship) the first one. Every further
model lies under ``models/<name>/``. The manifest keeps its ``model`` section (the default model)
and lists every model, default first, in ``models`` (name, licence, source, path, files).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BuildError
from .model_meta import read_model_info

DEFAULT_MODEL_PREFIX = "model"
EXTRA_MODELS_DIR = "models"
# A model name is also a directory name in the bundle and a name tenants send as `model`.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ModelInput:
    """One model directory going into a bundle."""

    name: str
    source: Path
    prefix: str  # target path prefix: "model" (the default model) or "models/<name>"
    info: dict[str, Any]

    @property
    def license(self) -> str:
        return str(self.info.get("license", "NOASSERTION"))


def plan_models(model_dirs: Sequence[Path]) -> list[ModelInput]:
    """Name (from the importer's airgap_model.json, else the directory name) and place of each
    model; names must be valid and unique."""
    planned: list[ModelInput] = []
    seen: dict[str, Path] = {}
    for index, model_dir in enumerate(Path(d) for d in model_dirs):
        info = read_model_info(model_dir)
        name = str(info.get("name") or model_dir.name)
        if not MODEL_NAME.match(name):
            raise BuildError(f"{model_dir}: expected a model name of letters, digits, '.', '_' or '-' (at most 128, "
                             f"from airgap_model.json or the directory name), found {name!r}")
        if name in seen:
            raise BuildError(f"{model_dir}: expected a unique model name per bundle, found {name!r} also for "
                             f"{seen[name]} (give one of them another name in its airgap_model.json)")
        seen[name] = model_dir
        prefix = DEFAULT_MODEL_PREFIX if index == 0 else f"{EXTRA_MODELS_DIR}/{name}"
        planned.append(ModelInput(name, model_dir, prefix, info))
    return planned


def files_under(prefix: str, paths: Sequence[str] | set[str] | dict[str, Any]) -> list[str]:
    """Paths under ``prefix/``, relative to it, sorted."""
    return sorted(p[len(prefix) + 1:] for p in paths if p.startswith(prefix + "/"))


def manifest_entry(model: ModelInput, contents: dict[str, Any]) -> dict[str, Any]:
    return {"name": model.name, "license": model.license, "source": model.info.get("source"),
            "path": model.prefix, "files": files_under(model.prefix, contents)}


@dataclass(frozen=True)
class BundleModel:
    """A model as a bundle's manifest lists it: ``files`` are bundle paths (``<path>/...``)."""

    name: str
    path: str
    files: tuple[str, ...]


def models_in_manifest(manifest: Any) -> list[BundleModel]:
    """Every model of a manifest, default first: the ``models`` list, or for a bundle built before
    bundles carried several models, its ``model`` section (files under ``model/``). Raises
    ValueError saying what is malformed."""
    if not isinstance(manifest, dict):
        raise ValueError(f"expected a manifest mapping, found {type(manifest).__name__}")
    entries = manifest.get("models")
    if entries is None:
        single = manifest.get("model")
        if single is None:
            return []
        if not isinstance(single, dict):
            raise ValueError(f"expected model to be a mapping, found {single!r:.200}")
        entries = [{**single, "path": DEFAULT_MODEL_PREFIX}]
    if not isinstance(entries, list):
        raise ValueError(f"expected models to be a list, found {entries!r:.200}")
    models: list[BundleModel] = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                or not isinstance(entry.get("path"), str) or not isinstance(entry.get("files"), list):
            raise ValueError(f"expected each model entry to have name, path and files, found {entry!r:.200}")
        name, path = entry["name"], entry["path"]
        if not all(isinstance(f, str) and f for f in entry["files"]):
            raise ValueError(f"expected model {name!r} files as non-empty strings, found {entry['files']!r:.200}")
        if not MODEL_NAME.match(name) or path not in (DEFAULT_MODEL_PREFIX, f"{EXTRA_MODELS_DIR}/{name}"):
            raise ValueError(f"expected model name and path like 'X' at model or models/X, found {name!r} at {path!r}")
        if any(m.name == name for m in models):
            raise ValueError(f"expected unique model names, found {name!r} twice")
        models.append(BundleModel(name, path, tuple(f"{path}/{f}" for f in entry["files"])))
    return models
