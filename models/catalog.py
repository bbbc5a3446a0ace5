"""Finding model plugins: drop-in folders and installed entry points.

A model is a folder with ``__init__.py`` and ``model.py`` defining ``class Model(BaseModel)``, as in
nuke-ML-server. Folders are searched in the built-in folder, then each folder on
``MLFARM_MODELS_PATH`` (a later folder's model replaces an earlier one of the same name); packages
may also register models in the entry-point group ``mlfarm.models``. The model's id is its folder
(or entry-point) name.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .base import BaseModel

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
ENTRY_POINT_GROUP = "mlfarm.models"
#: Sources of models that appear while the farm runs (training's runs under <storage>/trained/):
#: each entry point is ``source(settings) -> {name: ModelEntry}``, asked again for a name not yet
#: known. Declared by whoever makes such models, so the catalog needs to know none of them.
SOURCE_GROUP = "mlfarm.model_sources"
_PLUGIN_PACKAGE = "mlfarm_plugins"


class UnknownModel(KeyError):
    def __init__(self, name: str, known: Iterable[str]):
        super().__init__(name)
        self.known = sorted(known)

    def __str__(self) -> str:
        return f"unknown model {self.args[0]!r} (available: {', '.join(self.known) or 'none'})"


@dataclass
class ModelEntry:
    """A model found on disk or in an entry point; imported only when first asked for."""

    name: str
    origin: str
    _factory: Callable[[], type[BaseModel]]
    _cls: type[BaseModel] | None = field(default=None, repr=False)
    live: bool = False  # its description changes on disk (a trained run's checkpoints): never cached

    @property
    def cls(self) -> type[BaseModel]:
        if self._cls is None:
            cls = self._factory()
            if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
                raise TypeError(f"model {self.name} ({self.origin}): Model must subclass mlfarm.models.BaseModel")
            self._cls = cls
        return self._cls

    def create(self) -> BaseModel:
        return self.cls()

    def describe(self) -> dict[str, Any]:
        desc = self.create().describe(self.name)
        desc["origin"] = self.origin
        return desc


def _folder_factory(name: str, folder: Path) -> Callable[[], type[BaseModel]]:
    def load() -> type[BaseModel]:
        if _PLUGIN_PACKAGE not in sys.modules:
            root = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(_PLUGIN_PACKAGE, None))
            root.__path__ = []
            sys.modules[_PLUGIN_PACKAGE] = root
        # One module name per folder, so two folders holding a model of the same name never collide.
        digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:10]
        pkg_name = f"{_PLUGIN_PACKAGE}.{name}_{digest}"
        if f"{pkg_name}.model" in sys.modules:
            return sys.modules[f"{pkg_name}.model"].Model
        spec = importlib.util.spec_from_file_location(
            pkg_name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import model folder {folder}")
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[pkg_name] = pkg
        spec.loader.exec_module(pkg)
        module = importlib.import_module(f"{pkg_name}.model")
        try:
            return module.Model
        except AttributeError:
            raise ImportError(f"{folder / 'model.py'} defines no class Model") from None

    return load


def _scan_folder(root: Path) -> Iterable[ModelEntry]:
    if not root.is_dir():
        log.warning("models folder %s does not exist", root)
        return
    for folder in sorted(root.iterdir()):
        if (folder / "__init__.py").is_file() and (folder / "model.py").is_file():
            yield ModelEntry(folder.name, str(folder), _folder_factory(folder.name, folder))


def discover(extra_dirs: Iterable[Path] = (), include_entry_points: bool = True) -> dict[str, ModelEntry]:
    found: dict[str, ModelEntry] = {}
    for root in [BUILTIN_DIR, *extra_dirs]:
        for entry in _scan_folder(Path(root)):
            if entry.name in found:
                log.info("model %s from %s replaces %s", entry.name, entry.origin, found[entry.name].origin)
            found[entry.name] = entry
    if include_entry_points:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            found[ep.name] = ModelEntry(ep.name, f"entry point {ep.value}", ep.load)
    return found


class Catalog:
    """The models one process can run, with cached descriptions."""

    def __init__(self, entries: dict[str, ModelEntry], rescan: Callable[[], dict[str, ModelEntry]] | None = None):
        self.entries = entries
        self._descriptions: dict[str, dict[str, Any]] = {}
        self._rescan = rescan  # finds models that appear while the process runs (trained runs)

    @classmethod
    def from_settings(cls, settings: Any) -> Catalog:
        sources = [ep.load() for ep in entry_points(group=SOURCE_GROUP)]

        def dynamic() -> dict[str, ModelEntry]:
            found: dict[str, ModelEntry] = {}
            for source in sources:
                found.update(source(settings))
            return found

        plugins = discover(settings.model_dirs)
        return cls({**dynamic(), **plugins}, rescan=lambda: {**dynamic(), **plugins})

    def names(self) -> list[str]:
        return sorted(self.entries)

    def entry(self, name: str) -> ModelEntry:
        if name not in self.entries and self._rescan is not None:
            self.entries = {**self._rescan(), **self.entries}
        try:
            return self.entries[name]
        except KeyError:
            raise UnknownModel(name, self.entries) from None

    def describe(self, name: str) -> dict[str, Any]:
        if self.entry(name).live:
            return self.entry(name).describe()
        if name not in self._descriptions:
            self._descriptions[name] = self.entry(name).describe()
        return self._descriptions[name]

    def describe_all(self) -> dict[str, dict[str, Any]]:
        """Descriptions of every model; a model that fails to import is reported, not fatal."""
        out = {}
        for name in self.names():
            try:
                out[name] = self.describe(name)
            except Exception as exc:  # a broken plugin must not hide the others
                log.error("model %s (%s) cannot be described: %s", name, self.entries[name].origin, exc)
        return out
