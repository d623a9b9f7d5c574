"""disaggctl's P/D rules against the installed vLLM's own code (the oracle).

For a grid of prefill/decode shapes this runs, in the order a decode worker does at handshake
time, vLLM's real `TransferTopology.handshake_target_ranks` (tp_ratio), `compute_tp_mapping`,
`TransferTopology.block_size_ratio` and `NixlBaseConnectorWorker._validate_remote_agent_handshake`
(on the smallest stand-in for the worker's own state: the attributes that method reads, with
block lengths from the KV-cache shape each side would register). disaggctl must refuse exactly
the pairs where vLLM raises, for the same reason, and accept the rest. When vLLM is upgraded,
the failures here say which rules moved.
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass
from types import MethodType, SimpleNamespace
from typing import Any

import pytest

from disaggctl.compat import nixl
from disaggctl.compat.nixl import KvModel, Side

pytestmark = pytest.mark.vllm

TPS = [1, 2, 3, 4, 6, 8, 16]
KV_HEADS = [1, 2, 4, 8, 16]
BLOCKS = [(16, 16), (16, 32), (32, 16), (16, 64), (32, 48)]
HEAD_DIM, ELT, LAYERS, LATENT = 64, 2, 4, 576


@pytest.fixture(scope="module")
def v() -> SimpleNamespace:
    from vllm.distributed.kv_transfer.kv_connector import utils
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker, metadata, tp_mapping
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return SimpleNamespace(
        utils=utils, base_worker=base_worker, metadata=metadata, tp_mapping=tp_mapping, full=FullAttentionSpec
    )


@dataclass(frozen=True)
class Case:
    p_tp: int
    d_tp: int
    kv_heads: int
    mla: bool
    p_block: int
    d_block: int
    host_buffer: bool
    p_pp: int = 1  # prefill pipeline stages: each registers LAYERS / p_pp layers


def _block_lens(block: int, tp: int, c: Case, pp: int = 1) -> list[int]:
    """Bytes per block of each registered region: K and V per layer (MLA: one latent per layer).

    A pipeline stage registers the caches of its own layers only.
    """
    layers = LAYERS // pp
    if c.mla:
        return [block * LATENT * ELT] * layers
    return [block * max(1, c.kv_heads // tp) * HEAD_DIM * ELT] * (2 * layers)


def _topology(v: SimpleNamespace, c: Case, rank: int) -> Any:
    return v.utils.TransferTopology(
        tp_rank=rank,
        tp_size=c.d_tp,
        block_size=c.d_block,
        engine_id="decode",
        is_mla=c.mla,
        is_mamba=False,
        total_num_kv_heads=1 if c.mla else c.kv_heads,
        attn_backends=[],
    )


def _worker(v: SimpleNamespace, c: Case, topo: Any) -> SimpleNamespace:
    """The state `_validate_remote_agent_handshake` reads from the decode worker."""
    lens = _block_lens(c.d_block, c.d_tp, c)
    w = SimpleNamespace(
        transfer_topo=topo,
        dcp_size=1,
        _has_mamba=False,
        use_mla=c.mla,
        region_group_ids=[],
        dst_region_group_ids={},
        _physical_blocks_per_logical_kv_block=1,
        use_host_buffer=c.host_buffer,
        kv_cache_layout="LBHNC",
        host_buffer_kv_cache_layout="LBHNC",
        kv_transfer_config=SimpleNamespace(enable_permute_local_kv=False),
        enable_permute_local_kv=False,
        backend_name="FLASH_ATTN",
        _is_hma_required=False,
        _transfer_layer_region_indices=(),
        _transfer_layer_names=(),
        region_names=[],
        block_len_per_layer=lens,
        _region_is_mla=[c.mla] * len(lens),
        dst_num_blocks={"prefill": 100},
        vllm_config=SimpleNamespace(cache_config=SimpleNamespace(enable_prefix_caching=False)),
    )
    w._is_region_replicated = MethodType(v.base_worker.NixlBaseConnectorWorker._is_region_replicated, w)
    return w


def vllm_verdict(v: SimpleNamespace, c: Case) -> str | None:
    """None when vLLM accepts the pair on every decode rank, else the text of what it raised."""
    for rank in range(c.d_tp):
        topo = _topology(v, c, rank)
        lens = _block_lens(c.p_block, c.p_tp, c, c.p_pp)  # what prefill PP rank 0 advertises
        meta = v.metadata.NixlAgentMetadata(
            engine_id="prefill",
            agent_metadata=b"",
            kv_caches_base_addr=[0] * len(lens),
            device_id=0,
            num_blocks=100,
            block_lens=lens,
            block_strides=list(lens),
            kv_cache_layout="LBHNC",
            block_size=c.p_block,
            ssm_sizes=(0, 0),
            attn_backend_name="FLASH_ATTN",
            physical_blocks_per_logical_kv_block=1,
        )
        try:
            topo.handshake_target_ranks(c.p_tp)
            topo.register_remote_engine(
                "prefill",
                v.utils.EngineTransferInfo(
                    remote_tp_size=c.p_tp,
                    remote_block_len=lens[0],
                    remote_block_size=c.p_block,
                    remote_physical_blocks_per_logical=1,
                ),
            )
            v.tp_mapping.compute_tp_mapping(topo, c.p_tp, (v.full,))
            topo.block_size_ratio(c.p_block)
            v.base_worker.NixlBaseConnectorWorker._validate_remote_agent_handshake(_worker(v, c, topo), meta, c.p_tp)
        except (AssertionError, RuntimeError, NotImplementedError) as e:
            return str(e) or "replicated"  # the replicated-KV assert carries no message
    return None


# which of disaggctl's rule codes each vLLM failure corresponds to
REASONS = {
    "tensor parallel size": "tp_divisibility",
    "replicated": "replicated_kv",
    "not divisible by remote block size": "block_divisibility",
    "host buffer": "block_host_buffer",
    "when P TP > D TP": "block_prefill_tp_larger",
    "Number of KV layers must match": "prefill_pp",
}


def reason_code(text: str) -> str:
    for needle, code in REASONS.items():
        if needle in text:
            return code
    return f"unrecognised vLLM failure: {text}"


def cases() -> list[Case]:
    out = []
    for p, d, kv, (pb, db), hb in itertools.product(TPS, TPS, KV_HEADS, BLOCKS, (False, True)):
        out.append(Case(p, d, kv, False, pb, db, hb))
    for p, d, (pb, db) in itertools.product(TPS, TPS, BLOCKS):
        out.append(Case(p, d, 1, True, pb, db, False))
    for p, d, kv, mla, pp in itertools.product(TPS, TPS, KV_HEADS, (False, True), (2, 4)):
        out.append(Case(p, d, kv, mla, 16, 16, False, pp))
    return out


def test_rules_accept_and_refuse_exactly_what_vllm_does(v: SimpleNamespace) -> None:
    mismatches = []
    refused = accepted = 0
    for c in cases():
        text = vllm_verdict(v, c)
        ours = nixl.check_pair(
            Side(c.p_tp, c.p_pp, block_size=c.p_block),
            Side(c.d_tp, block_size=c.d_block),
            KvModel(kv_heads=c.kv_heads, mla=c.mla),
            host_buffer=c.host_buffer,
        )
        codes = [r.code for r in ours]
        if text is None:
            accepted += 1
            if codes:
                mismatches.append(f"{c}: vLLM accepts, disaggctl refuses {codes}")
        else:
            refused += 1
            if reason_code(text) not in codes:
                mismatches.append(f"{c}: vLLM refuses ({reason_code(text)}), disaggctl says {codes or 'OK'}")
    assert not mismatches, f"{len(mismatches)} disagreements, e.g.\n" + "\n".join(mismatches[:15])
    # the grid exercises both outcomes and every vLLM refusal disaggctl knows
    assert accepted > 100 and refused > 100


def test_grid_reaches_every_refusal(v: SimpleNamespace) -> None:
    seen = {reason_code(t) for c in cases() if (t := vllm_verdict(v, c)) is not None}
    assert seen == set(REASONS.values())


@pytest.mark.parametrize("p_tp,d_tp,kv", [(8, 2, 8), (4, 1, 8), (2, 8, 8), (16, 4, 8), (8, 4, 16), (4, 2, 1)])
def test_read_map_is_vllms(v: SimpleNamespace, p_tp: int, d_tp: int, kv: int) -> None:
    for mla in (False, True):
        model = KvModel(kv_heads=kv, mla=mla)
        c = Case(p_tp, d_tp, kv, mla, 16, 16, False)
        for rank in range(d_tp):
            mapping = v.tp_mapping.compute_tp_mapping(_topology(v, c, rank), p_tp, (v.full,))
            assert list(mapping.source_ranks_per_group[0]) == nixl.read_sources(rank, p_tp, d_tp, model)


def test_tp_ratio_is_vllms(v: SimpleNamespace) -> None:
    for p, d in itertools.product(TPS, TPS):
        topo = _topology(v, Case(p, d, 8, False, 16, 16, False), 0)
        try:
            expected: int | None = topo.tp_ratio(p)
        except AssertionError:
            expected = None
        assert nixl.tp_ratio(d, p) == expected, (p, d)


def test_default_block_size_is_vllms() -> None:
    from vllm.config.cache import CacheConfig

    assert nixl.DEFAULT_BLOCK_SIZE == CacheConfig.DEFAULT_BLOCK_SIZE


def test_rules_outside_the_handshake_are_still_in_vllm(v: SimpleNamespace) -> None:
    """The PP refusals live in the worker's constructor (it needs a whole engine): a tripwire on its source."""
    init = inspect.getsource(v.base_worker.NixlBaseConnectorWorker.__init__)
    decode_pp = 'if vllm_config.kv_transfer_config.kv_role == "kv_consumer"'
    assert "if self.pp_size > 1:" in init and decode_pp in init, "decode PP refusal moved: update decode_pp"
    assert "self._is_hma_required and not self._supports_pp_hma" in init, "hybrid PP refusal moved"
    assert v.base_worker.NixlBaseConnectorWorker._supports_pp_hma is False
    # NixlConnector (what disaggctl compiles) is the pull connector
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlConnector, NixlPullConnector

    assert NixlConnector is NixlPullConnector
    assert nixl.check_pair(Side(2), Side(2, pp=2), KvModel(8))[0].code == "decode_pp"
