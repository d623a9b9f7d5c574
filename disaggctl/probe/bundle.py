"""Build the single self-contained program that `disaggctl probe` feeds to `python3 -` on a host.

The agent is split into small standard-library modules for testing; the bundle embeds their
sources and loads them as a throw-away package `_dctl_probe` (so their relative imports work),
then runs agent.main(). Nothing is written on the host.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

# Load order: each module after the ones it imports.
MODULES = ("fields", "sysfs", "smi_xml", "smi_topo", "smi_text", "nvml", "agent")

_LOADER = '''
import sys, types
_pkg = types.ModuleType("_dctl_probe")
_pkg.__path__ = []
sys.modules["_dctl_probe"] = _pkg
for _name, _src in _SOURCES:
    _mod = types.ModuleType("_dctl_probe." + _name)
    _mod.__package__ = "_dctl_probe"
    _mod.__file__ = "<disaggctl-probe/" + _name + ".py>"
    sys.modules[_mod.__name__] = _mod
    exec(compile(_src, _mod.__file__, "exec"), _mod.__dict__)
    setattr(_pkg, _name, _mod)
sys.exit(sys.modules["_dctl_probe.agent"].main())
'''


@cache
def agent_source() -> str:
    here = Path(__file__).resolve().parent
    sources = [(name, (here / f"{name}.py").read_text()) for name in MODULES]
    return f"# disaggctl probe agent (generated)\n_SOURCES = {sources!r}\n{_LOADER}"
