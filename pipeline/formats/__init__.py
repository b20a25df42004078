"""Target formats: one module each, each defining one `pipeline.formats.base.Format` subclass, which registers itself
by being defined. Importing this package imports every module in it; `FORMATS` maps the names used in recipes to
their classes. Adding a format is adding a module (and its tests): nothing else lists the formats."""

from __future__ import annotations

import importlib
import pkgutil

from pipeline.formats.base import Format

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

FORMATS: dict[str, type[Format]] = Format.registry
