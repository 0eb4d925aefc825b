"""A module imported on its first use, for the few modules the CLI reads before it may load torch."""
from __future__ import annotations

import importlib


class LazyModule:
    """Stands for module `name` in `namespace` (a module's globals) until an attribute is first read: then the
    module is imported and put in its place, so later lookups reach the module itself."""

    def __init__(self, name: str, namespace: dict, alias: str | None = None):
        self._name, self._namespace, self._alias = name, namespace, alias or name.rsplit(".", 1)[-1]

    def __getattr__(self, attribute: str):
        module = importlib.import_module(self._name)
        self._namespace[self._alias] = module
        return getattr(module, attribute)
