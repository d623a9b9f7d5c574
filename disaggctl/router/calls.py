"""Calls to the engines: one instance of a role with retries on another, failure bookkeeping,
and the health poller that brings failed instances back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from disaggctl.router.config import RouterConfig
from disaggctl.router.metrics import RouterMetrics
from disaggctl.router.policies import Instance, Pool
from disaggctl.router.upstream import Client, Response, UpstreamError, UpstreamRefused

log = logging.getLogger("disaggctl.router")


class UpstreamUnavailable(Exception):
    """No instance of a role answered; the message names each one tried and why."""

    def __init__(self, role: str, attempts: list[tuple[Instance, str]]) -> None:
        self.role = role
        self.attempts = attempts
        if attempts:
            tried = "; ".join(f"{i.name} ({i.url}): {err}" for i, err in attempts)
            msg = f"no {role} instance answered: {tried}"
        else:
            msg = f"no {role} instance is configured"
        super().__init__(msg)

    @property
    def status(self) -> int:
        return 502 if self.attempts else 503


@dataclass(slots=True)
class Upcall:
    """An open upstream response; `close()` releases the connection and the in-flight slot."""

    inst: Instance
    resp: Response

    def close(self) -> None:
        self.resp.release()
        self.inst.in_flight -= 1


class Upstreams:
    """The prefill and decode pools, the HTTP client to them, and their health."""

    def __init__(self, cfg: RouterConfig, metrics: RouterMetrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.prefill = Pool("prefill", cfg.prefill, cfg.prefill_policy)
        self.decode = Pool("decode", cfg.decode, cfg.decode_policy)
        for inst in self.all():
            inst.healthy = False  # until the first health poll answers
        self.client = Client(cfg.connect_timeout_s, cfg.request_timeout_s)
        self._health_task: asyncio.Task[None] | None = None

    def all(self) -> list[Instance]:
        return [*self.prefill.instances, *self.decode.instances]

    def fail(self, inst: Instance, err: str) -> None:
        """A real call failed: unhealthy until the next good health poll."""
        inst.healthy = False
        inst.last_error = err
        inst.failed_at = time.monotonic()
        inst.failures += 1
        self.metrics.upstream_failure(inst.name, inst.role)
        log.warning("%s %s failed: %s", inst.role, inst.name, err)

    def revive(self, inst: Instance) -> None:
        """An instance whose failed call was not its own fault is in rotation again (the failure
        stays counted)."""
        inst.healthy = True
        inst.failed_at = -1e9

    async def call(
        self, pool: Pool, path: str, data: bytes, headers: dict[str, str], only: Instance | None = None
    ) -> Upcall:
        """POST to one instance of the pool; on connect errors, timeouts and 5xx try another
        (config.retries more). 4xx answers are returned: they are the client's fault."""
        tried: list[Instance] = []
        attempts: list[tuple[Instance, str]] = []
        for attempt in range(self.cfg.retries + 1):
            inst = only if only is not None and attempt == 0 else (None if only else pool.pick(tried))
            if inst is None:
                break
            tried.append(inst)
            if attempt:
                self.metrics.retry(pool.role)
            err = await self._attempt(inst, path, data, headers)
            if isinstance(err, str):
                self.fail(inst, err)
                attempts.append((inst, err))
                continue
            return Upcall(inst, err)
        raise UpstreamUnavailable(pool.role, attempts)

    async def _attempt(self, inst: Instance, path: str, data: bytes, headers: dict[str, str]) -> Response | str:
        """One POST: the open response (status < 500), or why the instance failed."""
        inst.in_flight += 1
        try:
            resp = await self.client.request("POST", inst.url, path, data, headers)
        except UpstreamError as e:
            inst.in_flight -= 1
            if isinstance(e, UpstreamRefused):
                inst.gone()
            return str(e) or type(e).__name__
        except BaseException:  # cancelled: the client went away
            inst.in_flight -= 1
            raise
        if resp.status < 500:
            return resp
        try:
            text = (await resp.read())[:300].decode(errors="replace")
        except UpstreamError:
            text = ""
        finally:
            resp.release()
            inst.in_flight -= 1
        return f"HTTP {resp.status} {text}".strip()

    # ------------------------------------------------------------------ health

    def start_health(self) -> None:
        self._health_task = asyncio.create_task(self._health_loop())

    async def close(self) -> None:
        if self._health_task:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await self.client.close()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_interval_s)
            try:
                await self.poll_health()
            except Exception:  # never let the poller die
                log.exception("health poll failed")

    async def poll_health(self) -> None:
        await asyncio.gather(*(self.check(i) for i in self.all()))

    async def check(self, inst: Instance) -> None:
        """One /health call of `inst`; its answer sets `healthy` (the poller, and undrain)."""
        t = max(1.0, min(5.0, self.cfg.health_interval_s * 2))
        try:
            async with asyncio.timeout(t):
                r = await self.client.request("GET", inst.url, "/health", timeout=t)
                await r.read()
            ok = r.status == 200
            err = None if ok else f"/health answered HTTP {r.status}"
        except (TimeoutError, OSError) as e:
            ok, err = False, f"/health: {e}"
            if isinstance(e, UpstreamRefused):
                inst.gone()
        if ok != inst.healthy:
            log.info(
                "%s %s is now %s%s", inst.role, inst.name, "healthy" if ok else "unhealthy", "" if ok else f" ({err})"
            )
        inst.healthy = ok
        if err:
            inst.last_error = err
