"""API keys for both front doors: where they come from, and how a presented key is checked.

Keys come from a file (one per line, `#` comments and blank lines ignored)
and/or an environment variable (comma-separated), as the server config names
them; none configured means authentication is off. A client presents a key as
`Authorization: Bearer <key>` (HTTP) or in the gRPC metadata `authorization`
(`Bearer <key>`, or the bare key). Every configured key is compared in constant
time, so timing tells nothing about how much of a key matched. Keys are never
logged.
"""

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config imports torch; the thin client imports this module for AUTHORIZATION
    from cluster.config import ServerConfig

AUTHORIZATION = "authorization"  # the HTTP header and the gRPC metadata key (gRPC keys are lower case)
BEARER = "bearer "
UNAUTHENTICATED_MESSAGE = "missing or invalid API key"


class ApiKeys:
    def __init__(self, keys: Iterable[str]):
        self._keys = [key.encode() for key in keys if key]
        if not self._keys:
            raise ValueError("no API key given")

    @classmethod
    def from_config(cls, server: "ServerConfig") -> "ApiKeys | None":
        """The configured keys, or None when the config names no source (authentication off)."""
        if server.api_keys_file is None and server.api_keys_env is None:
            return None
        keys = []
        if server.api_keys_file is not None:
            lines = Path(server.api_keys_file).read_text().splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if server.api_keys_env is not None:
            keys += [key.strip() for key in os.environ.get(server.api_keys_env, "").split(",")]
        try:
            return cls(keys)
        except ValueError:
            raise ValueError("API keys are configured but none was found in the key file or environment variable") from None

    def allows(self, authorization: str | None) -> bool:
        """Whether an `authorization` value carries one of the keys."""
        return self.fingerprint(authorization) is not None

    def fingerprint(self, authorization: str | None) -> str | None:
        """The fingerprint of the key an `authorization` value carries, or None if it carries none of them.
        Every key is compared, in constant time."""
        if not authorization:
            return None
        presented = authorization.strip()
        if presented.lower().startswith(BEARER):
            presented = presented[len(BEARER):].strip()
        matched = None
        for key in self._keys:
            if hmac.compare_digest(key, presented.encode()):
                matched = key
        return key_fingerprint(matched) if matched is not None else None


def key_fingerprint(key: bytes) -> str:
    """A key's name in counters and reports: a short hash, so that no key's text leaves the front door."""
    return hashlib.sha256(key).hexdigest()[:16]


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a port on this machine ("localhost" and 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_keys: "ApiKeys | None", insecure: bool) -> None:
    """Refuse to listen beyond loopback without API keys, unless the operator said `insecure` explicitly."""
    if api_keys is None and not insecure and not is_loopback(host):
        raise ValueError(f"refusing to serve on {host} without API keys: set server.api_keys_file or "
                         "server.api_keys_env, or pass --insecure to serve it unauthenticated")
