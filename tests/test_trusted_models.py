"""`FrozenData.trusted` (compile's loops) builds the same models as validation does."""

from __future__ import annotations

from pathlib import Path

import pytest

from disaggctl.compile import compile_spec
from disaggctl.deployment import Instance, NodeSlot, Process
from disaggctl.loader import load_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("example", ["gb200-nvl72.yaml", "b200-xpyd-lmcache.yaml", "mixed-b200-h200.yaml"])
def test_compiled_models_equal_validated_ones(example: str) -> None:
    desired = compile_spec(load_spec(EXAMPLES / example))
    models: list[Process | Instance | NodeSlot] = [*desired.processes, *desired.placement.instances]
    models += [n for i in desired.placement.instances for n in i.nodes]
    fingerprints = desired.compat.fingerprints if desired.compat else []
    assert fingerprints
    for m in [*models, *fingerprints]:
        validated = type(m)(**{k: getattr(m, k) for k in m.model_fields_set})  # what the loops gave
        assert validated == m
        assert validated.model_fields_set == m.model_fields_set
        assert validated.model_dump_json() == m.model_dump_json()


def test_trusted_needs_every_field_and_no_other() -> None:
    slot = dict(host="h", address="10.0.0.1", node_rank=0, gpus=[0], numa_node=None, cpus=None, nics=[])
    with pytest.raises(TypeError, match="gpu"):
        NodeSlot.trusted(**slot)
    full = {**slot, "gpu": None, "arch": None, "nvlink_domain": None}
    assert NodeSlot.trusted(**full) == NodeSlot(**full)
    with pytest.raises(TypeError, match="bogus"):
        NodeSlot.trusted(**full, bogus=1)
