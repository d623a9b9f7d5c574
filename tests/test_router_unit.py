"""Router pieces without processes: body splicing, token estimate, msgpack, ZMQ, config errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from disaggctl.router.config import RouterConfig, Upstream
from disaggctl.router.lmcache import MsgpackError, Notifications, unpack
from disaggctl.router.metrics import RouterMetrics
from disaggctl.router.server import Router, with_field
from tests.plugins.standin import REPO, free_port, parse_metrics
from tests.support import standin_engine as se


def test_with_field_appends_without_reencoding() -> None:
    raw = b'{"model": "m", "prompt": "a \\"}\\" b"}  \n'
    out = with_field(raw, "kv_transfer_params", {"x": [1, None]})
    assert json.loads(out) == {"model": "m", "prompt": 'a "}" b', "kv_transfer_params": {"x": [1, None]}}
    assert out.startswith(b'{"model": "m", "prompt": "a \\"}\\" b"')
    assert json.loads(with_field(b"{ }", "k", 1)) == {"k": 1}
    with pytest.raises(ValueError):
        with_field(b"[1]", "k", 1)


def cfg(**kw: object) -> RouterConfig:
    base: dict[str, object] = {
        "model": "m",
        "kv_kind": "nixl",
        "prefill": [Upstream(name="p", url="http://p")],
        "decode": [Upstream(name="d", url="http://d")],
    }
    base.update(kw)
    return RouterConfig(**base)  # type: ignore[arg-type]


def test_token_estimate_uses_chars_per_token() -> None:
    r = Router(cfg(chars_per_token=4.0, local_prefill_threshold=10))
    r.prefill.instances[0].healthy = True
    assert r.count_tokens({"prompt": "x" * 40}, chat=False) == 10
    assert r.count_tokens({"prompt": "x" * 39}, chat=False) == 10  # rounds up
    assert r.count_tokens({"prompt": [1, 2, 3]}, chat=False) == 3  # token ids count exactly
    assert r.count_tokens({"prompt": ["ab", "x" * 80]}, chat=False) == 20
    chat = {
        "messages": [
            {"role": "user", "content": "x" * 20},
            {"role": "user", "content": [{"type": "text", "text": "y" * 19}]},
        ]
    }
    assert r.count_tokens(chat, chat=True) == 10  # 40 chars incl. the joining newline
    assert r.decide({"prompt": "x" * 36}, chat=False) == ("local_prefill", "short_prompt")
    assert r.decide({"prompt": "x" * 40}, chat=False) == ("disaggregated", "long_prompt")


def test_token_count_with_a_configured_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    r = Router(cfg(tokenizer=str(tmp_path / "tokenizer.json")))
    assert r.count_tokens({"prompt": "a b a zzzzzzzzzzzzzzzzzzzzzzz"}, chat=False) == 4


def test_queue_limit_decision() -> None:
    r = Router(cfg(max_prefill_queue=2, local_prefill_threshold=0))
    for i in r.prefill.instances:
        i.healthy = True
    r.prefill.instances[0].in_flight = 1
    assert r.decide({"prompt": "x"}, chat=False)[0] == "disaggregated"
    r.prefill.instances[0].in_flight = 2
    assert r.decide({"prompt": "x"}, chat=False) == ("local_prefill", "prefill_queue")


def test_msgpack_reader_matches_msgspec() -> None:
    import msgspec

    class Base(msgspec.Struct, tag=True):
        pass

    class ProxyNotif(Base):
        req_id: str

    for rid in ("a", "x" * 40, "y" * 300, "z" * 70000):
        data = msgspec.msgpack.encode(ProxyNotif(req_id=rid))
        assert unpack(data) == {"type": "ProxyNotif", "req_id": rid}
        assert se.proxy_notif(rid) == data  # the stand-in sends exactly LMCache's bytes
    value = {"a": [1, -3, 300, 70000, 2**40, None, True, False, -200], "b": {"c": "d"}}
    assert unpack(msgspec.msgpack.encode(value)) == value
    with pytest.raises(MsgpackError):
        unpack(b"\x82\xa4type")


def test_lmcache_own_proxy_notif_encoding_is_understood() -> None:
    # LMCache 0.5.6's real message class (imports torch: run it apart, ~8 s)
    code = (
        "import sys, msgspec\nfrom lmcache.v1.storage_backend.pd_backend import ProxyNotif\n"
        "sys.stdout.buffer.write(msgspec.msgpack.encode(ProxyNotif(req_id='req-42')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, check=True).stdout
    assert unpack(out) == {"type": "ProxyNotif", "req_id": "req-42"}


def test_notifications_from_pyzmq_push_and_from_the_standin() -> None:
    async def run() -> None:
        port = free_port()
        n = Notifications("127.0.0.1", port)
        await n.start()
        try:
            ready = n.expect("r1", 2)
            early = None
            ctx = zmq.Context()
            push = ctx.socket(zmq.PUSH)
            push.connect(f"tcp://127.0.0.1:{port}")
            push.send(se.proxy_notif("r2"))  # before anyone waits for it
            push.send(se.proxy_notif("r1"))
            await asyncio.sleep(0.2)
            assert not ready.done()  # one of two ranks
            # the stand-in's hand-written ZMTP client, as prefill engines use it
            await asyncio.get_running_loop().run_in_executor(
                None, se.zmq_push, "127.0.0.1", port, [se.proxy_notif("r1")]
            )
            await asyncio.wait_for(ready, 5)
            early = n.expect("r2", 1)
            assert early.done()
            push.close(linger=0)
            ctx.term()
            assert n.received == 3
        finally:
            await n.close()

    asyncio.run(run())


def test_metrics_render_is_parseable() -> None:
    m = RouterMetrics()
    m.request("completions", "disaggregated", "long_prompt")
    m.observe_ttft("disaggregated", 0.004)
    m.observe_ttft("disaggregated", 100.0)
    m.upstream_failure('we"ird', "decode")
    text = m.render()
    parsed = parse_metrics(text)
    assert parsed['disaggctl_router_ttft_seconds_bucket{path="disaggregated",le="0.005"}'] == 1
    assert parsed['disaggctl_router_ttft_seconds_bucket{path="disaggregated",le="+Inf"}'] == 2
    assert parsed['disaggctl_router_upstream_failures_total{upstream="we\\"ird",role="decode"}'] == 1


def run_router_main(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "disaggctl.router", *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def test_bad_router_config_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "router.json"
    bad.write_text(json.dumps({"model": "m", "kv_kind": "tcp", "prefill": [], "decode": []}))
    r = run_router_main("--config", str(bad))
    assert r.returncode == 2 and "kv_kind" in r.stderr and "Traceback" not in r.stderr
    r = run_router_main("--config", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "cannot read router config" in r.stderr
    bad.write_text(json.dumps({"model": "m", "kv_kind": "nixl", "prefill": [], "decode": []}))
    r = run_router_main("--config", str(bad))
    assert r.returncode == 2 and "decode" in r.stderr


def test_router_cli_command_is_registered() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "disaggctl.cli", "router", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    if r.returncode != 0:  # cli may not be runnable as a module: use the entry point function
        r = subprocess.run(
            [sys.executable, "-c", "from disaggctl.cli import main; main()", "router", "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
    assert r.returncode == 0, r.stderr
    assert "--config" in r.stdout


def test_unhealthy_prefills_are_skipped_only_while_their_failure_is_recent() -> None:
    import time

    r = Router(cfg(local_prefill_threshold=0, health_interval_s=2.0))
    p = r.prefill.instances[0]
    assert not p.healthy  # not polled yet: still tried
    assert r.decide({"prompt": "x"}, chat=False)[0] == "disaggregated"
    p.failed_at = time.monotonic()
    assert r.decide({"prompt": "x"}, chat=False) == ("local_prefill", "no_healthy_prefill")
    p.failed_at = time.monotonic() - 3.0  # half-open: one is tried again
    assert r.decide({"prompt": "x"}, chat=False)[0] == "disaggregated"


def test_config_round_trips_and_names_every_problem() -> None:
    from disaggctl.router.config import ConfigError, parse_router_config

    c = cfg(request_timeout_s=30, lmcache_notify_timeout_s=5)
    assert c.request_timeout_s == 30.0 and type(c.request_timeout_s) is float  # JSON keeps writing 30.0
    text = c.to_json()
    assert '"request_timeout_s": 30.0' in text and text.index('"name"') < text.index('"model"')
    assert parse_router_config(json.loads(text)) == c
    with pytest.raises(ConfigError) as e:
        parse_router_config({"model": "m", "kv_kind": "nixl", "prefill": [], "decode": [], "retires": 2})
    assert e.value.problems == ["retires: unknown field (did you mean 'retries'?)"]
    with pytest.raises(ConfigError) as e:
        parse_router_config({"model": "m", "kv_kind": "lmcache", "prefill": [], "decode": [], "retries": -1})
    assert e.value.problems == [
        "retries: must not be negative, got -1",
        "decode: needs at least one decode instance",
        "lmcache_proxy_port: kv_kind lmcache needs the port the prefillers notify (pd_proxy_port)",
    ]
    with pytest.raises(ConfigError) as e:
        parse_router_config({"model": "m", "kv_kind": "nixl", "prefill": [{"name": "p"}], "decode": [7]})
    assert e.value.problems == [
        "prefill[0].url: required field missing",
        "decode[0]: expected a JSON object, got an integer (7)",
    ]


def test_sse_opening_judges_only_what_comes_before_generated_text() -> None:
    from disaggctl.router.bodies import sse_opening

    err = b'data: {"error": {"message": "Internal server error", "code": 500}}\n\ndata: [DONE]\n\n'
    role = (
        b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}\n\n'
    )
    assert sse_opening(err) == "error"
    assert sse_opening(role) == "empty"
    assert sse_opening(role + err) == "error"
    assert sse_opening(b'data: {"choices": [{"index": 0, "text": " fox", "finish_reason": null}]}\n\n') == "content"
    assert sse_opening(b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n' + err) == "content"
    assert sse_opening(b'data: {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}\n\n') == "content"
    assert sse_opening(b'data: {"error": {"mess') == "content"  # a split event: not judged
    assert sse_opening(b"data: [DONE]\n\n") == "content"
    assert sse_opening(b": keep-alive\n\n" + err) == "error"
