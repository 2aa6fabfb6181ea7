"""``mmcv._ext`` served by aphq, so that mmcv-full needs no compiled ops (issue #20).

mmcv-full's ops are a compiled extension, built against the installed torch
and, on a GPU machine, a matching CUDA toolkit. aphq installs mmcv-full
without them (pure Python, no compiler) and answers the import of the
extension in its own process with this stand-in (a finder first on
``sys.meta_path``, set on ``import aphq_cli``; the installed mmcv is never
changed). The few functions aphq's
detectors call come from :mod:`aphq_cli.mmcv_ops` (torchvision's kernels, with
mmcv's semantics); any other compiled op is taken from a compiled mmcv when
one is installed, and otherwise raises one sentence naming it.

This module stays light (it runs on ``import aphq_cli``, also for
``aphq --help``): the torch-level module is loaded when mmcv first asks for a
served function, by which time mmcv has imported torch anyway.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

from aphq_cli.errors import AphqError

SERVED = ("nms", "roi_align_forward", "roi_align_backward")
# Every function of mmcv._ext called in this process (tests read it: which ops a flow uses).
CALLED: set[str] = set()


class ServedExt(types.ModuleType):
    """Stands in for ``mmcv._ext``: the served functions, a compiled mmcv's for the rest, else a sentence."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in SERVED:
            # A lazy load on purpose (see the module docstring): torch and torchvision, on first use.
            target = getattr(importlib.import_module("aphq_cli.mmcv_ops"), name)
        else:
            target = getattr(_compiled(), name, None) or _unavailable(name)

        def call(*args, **kwargs):
            CALLED.add(name)
            return target(*args, **kwargs)
        setattr(self, name, call)  # resolved once
        return call


def _unavailable(name: str):
    def fail(*args, **kwargs):
        raise AphqError(f"mmcv op {name} is not available: this mmcv-full has no compiled ops, and aphq "
                        f"serves only {', '.join(SERVED)} from torchvision")
    return fail


_COMPILED: list = []


def _compiled() -> types.ModuleType | None:
    """mmcv's own compiled extension, if this install has one (loaded beside the stand-in, once)."""
    if not _COMPILED:
        module = None
        mmcv = sys.modules.get("mmcv")
        spec = importlib.machinery.PathFinder.find_spec("_ext", list(getattr(mmcv, "__path__", [])))
        if spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        _COMPILED.append(module)
    return _COMPILED[0]


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers the import of ``mmcv._ext`` with a :class:`ServedExt` (first on ``sys.meta_path``)."""

    def find_spec(self, fullname, path, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname == "mmcv._ext" else None

    def create_module(self, spec):
        return ServedExt(spec.name, __doc__)

    def exec_module(self, module) -> None:
        pass


def serve() -> bool:
    """From now on, an import of ``mmcv._ext`` (mmcv's ops import it) gives the stand-in. Idempotent.

    Returns:
        False when mmcv's compiled ops were imported already (too late to serve them).
    """
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return True
    if "mmcv._ext" in sys.modules:
        return False
    sys.meta_path.insert(0, _Finder())
    return True
