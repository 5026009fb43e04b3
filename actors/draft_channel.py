"""A direct loopback channel from a target to its drafter on the same machine: the per-round hop without Ray.

Why: a Ray actor call costs about a millisecond on this project's CPU even when
it does nothing (scheduling through the core worker, an object per result,
a thread hand-off on each side), as much as a target forward, and a remote-drafter
round makes one per round. A loopback socket carrying pickled frames does the
same round trip in a tenth of that (docs/ARCHITECTURE.md, "The request path", step 3).

- **Who may connect**: the server listens on 127.0.0.1 only, and a connection's
  first bytes must be the drafter's random token, which only travels through
  Ray (`DraftService.channel`) to processes of this cluster; nothing is
  unpickled before the token matched (constant-time comparison).
- **Order**: a target holds one connection and the drafter serves it on one
  thread, in order, so a `finish` sent after a proposal runs after it, and a
  `start` after an earlier `finish` of the same id.
- **Failure**: a refused, reset or silent (past the timeout) connection raises
  `DrafterUnavailable` on every later call, as a dead Ray actor does; the
  engine then decodes plainly until the controller pairs a new drafter.

Targets on another machine or pod (or with the channel switched off) keep Ray calls.
"""

import hmac
import os
import pickle
import secrets
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

from actors.errors import CapacityExhausted, DrafterUnavailable

TOKEN_BYTES = 32
_LENGTH = struct.Struct("!I")  # every frame: its byte length, then a pickle
AUTH_TIMEOUT_S = 5.0  # a connection that has not sent its token by then is closed
CALLS = ("start", "propose", "finish")  # the only methods a channel reaches


def loopback_identity() -> str | None:
    """Names the loopback interface this process sees: equal for two processes exactly when 127.0.0.1 is the
    same for both (one kernel boot, one network namespace), as for simulated Ray nodes on one machine and unlike
    two pods. None where it cannot be told (not Linux): no channel then."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            return f"{boot.read().strip()}:{os.stat('/proc/self/ns/net').st_ino}"
    except OSError:
        return None


@dataclass(frozen=True)
class ChannelAddress:
    """Where a drafter's channel listens, and the token a connection must present."""

    loopback: str  # `loopback_identity()` of the drafter's process
    port: int
    token: bytes

    def reachable(self) -> bool:
        """True in a process that shares the drafter's loopback interface."""
        return loopback_identity() == self.loopback

    def __repr__(self) -> str:  # the token never reaches a log line
        return f"ChannelAddress(loopback={self.loopback!r}, port={self.port})"


class ChannelServer:
    """Serves `CALLS` of `service` to authenticated loopback connections, one thread per connection."""

    def __init__(self, service: object):
        self._service = service
        self._token = secrets.token_bytes(TOKEN_BYTES)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = ChannelAddress(loopback_identity() or "", self._listener.getsockname()[1], self._token)
        threading.Thread(target=self._accept, name="draft-channel-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            connection, _ = self._listener.accept()
            threading.Thread(target=self._serve, args=(connection,), name="draft-channel", daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.settimeout(AUTH_TIMEOUT_S)
            try:
                if not hmac.compare_digest(_read_exactly(connection, TOKEN_BYTES), self._token):
                    return
                connection.settimeout(None)
                while True:
                    method, args = pickle.loads(_read_frame(connection))
                    _write_frame(connection, pickle.dumps(self._call(method, args)))
            except (OSError, EOFError):
                return  # the target went away (or never authenticated)

    def _call(self, method: str, args: tuple) -> tuple[bool, object]:
        """(True, result) or (False, the exception), which the client maps as `_Reply.result` says."""
        if method not in CALLS:
            return False, DrafterUnavailable(f"no channel call {method!r}")
        try:
            return True, getattr(self._service, method)(*args)
        except Exception as err:  # the caller sees it; the connection stays up
            return False, err


class _Reply:
    """The answer to one call, once the channel has read it."""

    def __init__(self, channel: "ChannelClient"):
        self._channel = channel
        self._value: tuple[bool, object] | None = None

    def done(self) -> bool:
        self._channel.poll()
        return self._value is not None

    def wait(self, timeout_s: float) -> None:
        """Block until answered or `timeout_s` passed (a failed channel answers every call with its failure)."""
        self._channel.read_until(self, timeout_s, raise_on_timeout=False)

    def result(self, timeout_s: float):
        """The call's result. `CapacityExhausted` as the drafter raised it; any other failure, of the call or
        of the channel, as `DrafterUnavailable` naming only the error's type."""
        self._channel.read_until(self, timeout_s, raise_on_timeout=True)
        ok, value = self._value
        if ok:
            return value
        if isinstance(value, (CapacityExhausted, DrafterUnavailable)):
            raise value
        raise DrafterUnavailable(f"drafter call failed: {type(value).__name__}")


class ChannelClient:
    """A target's end of a channel: calls go out at once and are answered in the order sent.

    Used from one thread (the target's engine loop) at a time; a lock keeps a
    stray caller from interleaving frames all the same.
    """

    def __init__(self, address: ChannelAddress, timeout_s: float):
        """`timeout_s`: for connecting, and for reading an answer once it has begun to arrive."""
        self._timeout_s = timeout_s
        self._socket = socket.create_connection(("127.0.0.1", address.port), timeout=timeout_s)
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socket.sendall(address.token)
        self._lock = threading.RLock()
        self._waiting: list[_Reply] = []  # calls sent, not yet answered, oldest first
        self._failure: DrafterUnavailable | None = None

    def call(self, method: str, *args) -> _Reply:
        reply = _Reply(self)
        with self._lock:
            if self._failure is None:
                try:
                    _write_frame(self._socket, pickle.dumps((method, args)))
                    self._waiting.append(reply)
                    return reply
                except OSError as err:
                    self._fail(err)
            reply._value = (False, self._failure)
        return reply

    def poll(self) -> None:
        """Read every answer that has already arrived, without blocking."""
        with self._lock:
            while self._waiting and self._failure is None and _readable(self._socket):
                self._read_one(None)

    def read_until(self, reply: _Reply, timeout_s: float, raise_on_timeout: bool) -> None:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while reply._value is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    if raise_on_timeout:  # a stalled drafter: the channel is out of step, so it is done
                        self._fail(TimeoutError())
                    return
                self._read_one(left)

    def close(self) -> None:
        self._socket.close()

    def _read_one(self, wait_s: float | None) -> None:
        """Read one answer if one starts arriving within `wait_s` (None: it has). A frame once begun is read
        whole (within the call timeout), so a slow answer never leaves the stream out of step."""
        try:
            if wait_s is not None and not select.select([self._socket], [], [], wait_s)[0]:
                return  # the deadline check in read_until decides
            self._socket.settimeout(self._timeout_s)
            answer = pickle.loads(_read_frame(self._socket))
        except (OSError, EOFError, ValueError) as err:
            self._fail(err)
            return
        self._waiting.pop(0)._value = answer

    def _fail(self, err: BaseException) -> None:
        """The channel is broken: every call in flight and every later one fails as a dead drafter."""
        self._failure = DrafterUnavailable(f"drafter channel failed: {type(err).__name__}")
        for reply in self._waiting:
            reply._value = (False, self._failure)
        self._waiting.clear()
        self._socket.close()


def _readable(sock: socket.socket) -> bool:
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True  # let the read report the broken socket


def _write_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(payload)) + payload)


def _read_frame(sock: socket.socket) -> bytes:
    (length,) = _LENGTH.unpack(_read_exactly(sock, _LENGTH.size))
    return _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    chunks, left = [], count
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError("channel closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)

