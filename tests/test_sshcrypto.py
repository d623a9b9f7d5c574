"""What every SSH connection shares (disaggctl.sshcrypto): the cipher order and the parsed key."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from disaggctl.sshcrypto import PrivateKeys, cipher_order, transport


def _write_key(path: Path, kind: str = "ed25519", password: bytes | None = None) -> str:
    key = ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else rsa.generate_private_key(65537, 2048)
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, enc))
    path.chmod(0o600)
    return str(path)


def test_cipher_order_puts_the_aead_ciphers_first_and_keeps_the_rest() -> None:
    have = ("aes128-ctr", "aes256-ctr", "aes256-gcm@openssh.com", "aes128-gcm@openssh.com")
    assert cipher_order(have) == ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
    assert cipher_order(("aes128-ctr", "aes256-ctr")) == ("aes128-ctr", "aes256-ctr")  # a paramiko without GCM


def test_transport_asks_for_gcm_first_and_offers_every_paramiko_cipher() -> None:
    a, b = socket.socketpair()
    try:
        t = transport(a)
        offered = t.get_security_options().ciphers
        assert offered[0] == "aes128-gcm@openssh.com"
        assert sorted(offered) == sorted(paramiko.Transport._preferred_ciphers)
        t.close()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_a_key_is_parsed_once_and_again_when_its_file_changes(tmp_path: Path, kind: str) -> None:
    keys = PrivateKeys()
    path = _write_key(tmp_path / "id", kind)
    first = keys.load(path)
    assert first is not None and first.can_sign()
    assert first.get_fingerprint() == paramiko.PKey.from_path(path).get_fingerprint()
    assert keys.load(path) is first  # the same object: not parsed again
    _write_key(tmp_path / "id", kind)  # another key under the same name
    os.utime(path, ns=(1, 1))  # a different mtime even within the clock's resolution
    second = keys.load(path)
    assert second is not None and second.get_fingerprint() != first.get_fingerprint()


def test_a_certificate_next_to_the_key_is_loaded_and_watched(tmp_path: Path) -> None:
    keys = PrivateKeys()
    path = _write_key(tmp_path / "id")
    plain = keys.load(path)
    assert plain is not None and plain.public_blob is None
    # a certificate appears next to the key (ssh-keygen signs it with a CA): loaded again, with the
    # certificate attached, as paramiko's key_filename loads `<key>-cert.pub`
    ca = _write_key(tmp_path / "ca")
    Path(path + ".pub").write_text(f"{plain.get_name()} {plain.get_base64()}\n")
    subprocess.run(["ssh-keygen", "-q", "-s", ca, "-I", "op", "-n", "root", path + ".pub"], check=True)
    assert Path(path + "-cert.pub").exists()
    certified = keys.load(path)
    assert certified is not None and certified.public_blob is not None
    assert certified.public_blob.key_type == "ssh-ed25519-cert-v01@openssh.com"
    assert keys.load(path) is certified


def test_keys_paramiko_must_read_itself_answer_none(tmp_path: Path) -> None:
    keys = PrivateKeys()
    assert keys.load(_write_key(tmp_path / "enc", password=b"secret")) is None  # a passphrase
    assert keys.load(str(tmp_path / "missing")) is None
    (tmp_path / "junk").write_text("not a key\n")
    assert keys.load(str(tmp_path / "junk")) is None
    ok = _write_key(tmp_path / "id")
    assert keys.load(ok + "-cert.pub") is None  # a certificate named instead of its key
