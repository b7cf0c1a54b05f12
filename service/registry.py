"""Which models the service serves: names, packages and the default. No torch, no bentoml here.

Sources, first match wins:
- ``MEDCL_MODELS_FILE``: YAML ``{default: NAME, models: [{name: NAME, package: DIR} | {name: NAME, model: REF}]}``;
- ``MEDCL_MODELS``: ``NAME=WHERE,NAME=WHERE`` where WHERE is a package folder or a model-store
  reference (``name`` = its champion, ``name@challenger``, ``name:version``); the first is the default;
- otherwise one model: ``MEDCL_PACKAGE`` / ``MEDCL_MODEL`` / the demo package (``default_package_dir``),
  named by its card.

Requests name a model (``model`` field) or get the default. Every process of the service (API and
model workers) reads the same environment, so all agree on the list.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medcl.card import Card
from service.package import PackageError, default_package_dir

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    package: str | None = None
    model: str | None = None  # a model-store reference instead of a folder

    @model_validator(mode="after")
    def _one_source(self) -> "ModelEntry":
        if (self.package is None) == (self.model is None):
            raise ValueError(f"model {self.name!r}: give exactly one of 'package' (a folder) or 'model' (a store reference)")
        return self

    def package_dir(self) -> Path:
        if self.package is not None:
            return Path(self.package)
        from medcl.model_store import resolve

        return resolve(self.model)


class ModelsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: str | None = None
    models: list[ModelEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_unique_and_default_known(self) -> "ModelsConfig":
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique: {names}")
        if self.default is not None and self.default not in names:
            raise ValueError(f"default model {self.default!r} is not among {names}")
        return self

    @property
    def default_name(self) -> str:
        return self.default or self.models[0].name


def parse_model_list(text: str, source: str = "MEDCL_MODELS") -> list[tuple[str, str]]:
    """``NAME=WHERE,NAME=WHERE`` -> [(name, where)]; WHERE is a package folder or a store reference.
    Shared by MEDCL_MODELS, ``medcl serve --models`` and ``medcl bento build --models``."""
    pairs = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, where = item.partition("=")
        if not sep or not name.strip() or not where.strip():
            raise PackageError(f"{source} entry {item!r} is not NAME=FOLDER or NAME=STORE_REFERENCE")
        pairs.append((name.strip(), where.strip()))
    return pairs


def slug(card_name: str) -> str:
    """A card name made into a model name (lower case, safe in URLs and service names)."""
    return re.sub(r"[^a-z0-9._-]+", "-", card_name.lower()).strip("-.")[:63] or "model"


def configured_models() -> ModelsConfig:
    try:
        path = os.environ.get("MEDCL_MODELS_FILE")
        if path:
            file = Path(path)
            if not file.is_file():
                raise PackageError(f"MEDCL_MODELS_FILE={path}: no such file")
            raw = yaml.safe_load(file.read_text()) or {}
            base = file.parent
            for m in raw.get("models", []) if isinstance(raw, dict) else []:
                if isinstance(m, dict) and m.get("package") and not Path(m["package"]).is_absolute():
                    m["package"] = str(base / m["package"])
            return ModelsConfig.model_validate(raw)
        listed = os.environ.get("MEDCL_MODELS", "").strip()
        if listed:
            entries = [ModelEntry(name=name, **({"package": where} if Path(where).is_dir() or "/" in where
                                                 else {"model": where}))
                       for name, where in parse_model_list(listed)]
            return ModelsConfig(models=entries)
    except (ValidationError, yaml.YAMLError) as e:
        raise PackageError(f"the model list is not valid: {str(e).splitlines()[0]} {_first_error(e)}") from None
    package = default_package_dir()
    if not (package / "card.json").is_file():
        # The usual cause: a fresh clone, where the demo package does not exist until `make serve` builds it.
        raise PackageError(f"no model package at {package} (no card.json): build the demo with `make serve`, "
                           "or name a package with MEDCL_PACKAGE, MEDCL_MODEL or MEDCL_MODELS")
    name = slug(Card.load(package).name)
    return ModelsConfig(models=[ModelEntry(name=name, package=str(package))])


def _first_error(e: Exception) -> str:
    if isinstance(e, ValidationError):
        first = e.errors()[0]
        return f"({'.'.join(str(p) for p in first['loc'])}: {first['msg']})"
    return ""
