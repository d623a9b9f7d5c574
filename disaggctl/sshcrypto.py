"""What every SSH connection of one disaggctl process shares: the loaded private key, the ciphers.

Private key: paramiko's `key_filename` reads and parses the key file on every connection, trying
each key class in turn (RSA, then ECDSA, then Ed25519: an Ed25519 key is parsed three times); a
32-host apply parsed it 96 times. `PrivateKeys.load` parses it once per process (again when the
file changes) with paramiko's own `PKey.from_path` (its certificate `<key>-cert.pub` included, as
`key_filename` loads it). When that cannot load the key (a passphrase, a format from_path does
not read) it answers None and the caller passes the path as before: paramiko then reports or
recovers exactly as it always did.

Ciphers: paramiko prefers aes128-ctr with hmac-sha2-256 (encrypt-and-MAC) and checks each
packet's MAC in a Python loop over its bytes (`util.constant_time_bytes_eq`). `transport()` asks
for the AEAD ciphers first (aes128-gcm@openssh.com, aes256-gcm@openssh.com: one call into
`cryptography` per packet, no separate MAC); a server without them gets paramiko's order.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import paramiko

_AEAD = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def cipher_order(available: tuple[str, ...]) -> tuple[str, ...]:
    """paramiko's cipher preference with the AEAD ciphers it has moved to the front."""
    first = tuple(c for c in _AEAD if c in available)
    return first + tuple(c for c in available if c not in first)


_CIPHERS = cipher_order(tuple(paramiko.Transport._preferred_ciphers))  # type: ignore[attr-defined]


def transport(sock: Any, **kw: Any) -> paramiko.Transport:
    """SSHClient.connect's transport_factory: paramiko's Transport, AEAD ciphers first."""
    t = paramiko.Transport(sock, **kw)
    t.get_security_options().ciphers = _CIPHERS
    return t


def _stamp(path: str) -> tuple[int, int, int, int] | None:
    """(size, mtime) of the key and of its certificate (0, 0 when none); None: no key file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    try:
        cert = os.stat(path + "-cert.pub")
        cs = (cert.st_size, cert.st_mtime_ns)
    except OSError:
        cs = (0, 0)
    return (st.st_size, st.st_mtime_ns, *cs)


class PrivateKeys:
    """Private keys parsed once per process, per file (re-read when the key or its certificate changes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, tuple[tuple[int, int, int, int], paramiko.PKey | None]] = {}

    def load(self, path: str) -> paramiko.PKey | None:
        """The key at path, or None when paramiko's from_path cannot load it without a passphrase
        (the caller then hands paramiko the path: the same errors and fallbacks as always)."""
        full = os.path.expanduser(path)
        if full.endswith("-cert.pub"):
            return None  # a certificate named instead of its key: paramiko's own lookup
        stamp = _stamp(full)
        if stamp is None:
            return None
        with self._lock:  # the hosts' threads connect at once: one parse, the others wait
            held = self._keys.get(full)
            if held is not None and held[0] == stamp:
                return held[1]
            try:
                key: paramiko.PKey | None = paramiko.PKey.from_path(full)
            except Exception:  # a passphrase, an unknown type, unreadable: paramiko's path decides
                key = None
            self._keys[full] = (stamp, key)
            return key


KEYS = PrivateKeys()
