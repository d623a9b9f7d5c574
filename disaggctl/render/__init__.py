"""Render a compiled deployment into the files its target needs (pure).

One renderer per target kind; each returns a `Rendered` (files per host plus start order).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from disaggctl.deployment import DesiredState, Rendered
from disaggctl.gcpause import no_cyclic_gc
from disaggctl.spec import ClusterSpec

_RENDERERS = {
    "systemd": ("disaggctl.render.systemd", "render_systemd"),
    "slurm": ("disaggctl.render.slurm", "render_slurm"),
    "local": ("disaggctl.render.local", "render"),
}


def render(desired: DesiredState, spec: ClusterSpec, secrets: Mapping[str, str] | None = None) -> Rendered:
    """Without the cyclic GC, as load and compile: 128 NVL72 racks make ~6,000 files' worth of new
    objects next to the plan's million, and each full pass would walk them all (disaggctl/gcpause.py)."""
    module_name, func_name = _RENDERERS[spec.target.kind]
    func = getattr(importlib.import_module(module_name), func_name)
    with no_cyclic_gc():
        if spec.target.kind == "systemd":
            result: Rendered = func(desired, spec, secrets)
        elif spec.target.kind == "local":
            result = func(desired, spec.target, secrets)
        else:
            result = func(desired, spec)
    return result
