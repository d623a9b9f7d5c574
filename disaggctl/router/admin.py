"""The router's admin API on its own listener (`admin.host:admin.port`, loopback by default):
take an instance out of rotation (drain), see when it is drained, put it back (undrain).

Every call needs `Authorization: Bearer <token>`, the token being the content of
`admin.token_file` (a file only its owner can read; re-read on each call, so apply can create
or rotate it while the router runs). Without a token file every call is refused.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any

from disaggctl.router import front
from disaggctl.router.bodies import JSON_CT, JSONError, dumps, error_body, loads
from disaggctl.router.config import AdminConfig
from disaggctl.router.policies import Instance

log = logging.getLogger("disaggctl.router.admin")


def _reply(body: Any, status: int = 200) -> front.Response:
    return front.Response(status=status, body=dumps(body), headers={"Content-Type": JSON_CT})


def _error(status: int, message: str, kind: str) -> front.Response:
    return _reply(error_body(status, message, kind), status)


def read_token(path: str) -> str:
    """The token in `path`; OSError when unreadable, PermissionError when group/others may read it."""
    with open(path, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PermissionError(f"{path} is readable by others (mode {stat.S_IMODE(mode):04o}); it must be 0600")
        token = f.read().decode("utf-8", errors="replace").strip()
    if not token:
        raise PermissionError(f"{path} is empty")
    return token


def instance_entry(i: Instance) -> dict[str, Any]:
    return {
        "name": i.name,
        "role": i.role,
        "url": i.url,
        "state": i.state,
        "in_flight": i.in_flight,
        "kv_held": i.kv_held,
    }


class Admin:
    """The admin handlers and their listener."""

    def __init__(
        self, cfg: AdminConfig, instances: list[Instance], check: Callable[[Instance], Awaitable[None]] | None = None
    ) -> None:
        self.cfg = cfg
        self.instances = {i.name: i for i in instances}
        self.health_check = check  # one health check of an instance (Upstreams.check)
        self.server: front.Server | None = None

    def routes(self) -> dict[str, dict[str, front.Handler]]:
        return {
            "/admin/instances": {"GET": self.guarded(self.list_instances)},
            "/admin/drain": {"POST": self.guarded(self.drain)},
            "/admin/undrain": {"POST": self.guarded(self.undrain)},
        }

    async def start(self) -> None:
        self.server = front.Server(self.routes())
        try:
            await self.server.listen(self.cfg.host, self.cfg.port)
        except OSError as e:
            raise RuntimeError(f"admin API cannot listen on {self.cfg.host}:{self.cfg.port}: {e.strerror or e}") from e
        log.info("admin API on %s:%d", self.cfg.host, self.cfg.port)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.shutdown(1.0)

    # ------------------------------------------------------------------ auth

    def check(self, request: front.Request) -> front.Response | None:
        """None when the bearer token matches, else the refusal (403 without a usable token file, 401)."""
        if not self.cfg.token_file:
            return _error(403, "admin API disabled: the router config has no admin.token_file", "AdminDisabled")
        try:
            token = read_token(self.cfg.token_file)
        except OSError as e:
            log.warning("admin token: %s", e)
            return _error(403, f"admin API disabled: token file unusable: {e}", "AdminDisabled")
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            return _error(401, "missing or wrong bearer token", "Unauthorized")
        return None

    def guarded(self, handler: front.Handler) -> front.Handler:
        async def run(request: front.Request) -> front.Reply:
            refused = self.check(request)
            return refused if refused is not None else await handler(request)

        return run

    # ------------------------------------------------------------------ handlers

    async def list_instances(self, request: front.Request) -> front.Reply:
        return _reply({"instances": [instance_entry(i) for i in self.instances.values()]})

    async def _target(self, request: front.Request) -> Instance | front.Response:
        try:
            body = loads(await request.read())
        except JSONError:
            body = None
        name = body.get("instance") if isinstance(body, dict) else None
        if not isinstance(name, str):
            return _error(400, 'body must be {"instance": "<name>"}', "BadRequestError")
        inst = self.instances.get(name)
        if inst is None:
            known = ", ".join(self.instances)
            return _error(404, f"no instance {name!r} (known: {known})", "NotFound")
        return inst

    async def drain(self, request: front.Request) -> front.Reply:
        inst = await self._target(request)
        if isinstance(inst, front.Response):
            return inst
        if not inst.draining:
            log.info("draining %s %s (%d in flight, %d KV held)", inst.role, inst.name, inst.in_flight, inst.kv_held)
        inst.draining = True
        return _reply(instance_entry(inst), 202)

    async def undrain(self, request: front.Request) -> front.Reply:
        inst = await self._target(request)
        if isinstance(inst, front.Response):
            return inst
        if inst.draining:
            log.info("%s %s back in rotation", inst.role, inst.name)
        inst.draining = False
        if not inst.healthy and self.health_check is not None:
            # restarted while drained, its last health poll failed: check it now rather than a poll
            # interval later, so it takes requests (and counts as healthy) from this answer on
            await self.health_check(inst)
        return _reply(instance_entry(inst))
