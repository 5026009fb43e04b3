"""The loopback channel between a target and its drafter (no Ray): order, errors, failure, admission."""

import socket
import threading
import time

import pytest

from actors.draft_channel import TOKEN_BYTES, ChannelAddress, ChannelClient, ChannelServer
from actors.errors import CapacityExhausted, DrafterUnavailable


class RecordingService:
    """Stands in for a DraftService: records the calls it serves, in the order it serves them."""

    def __init__(self, propose_delay_s: float = 0.0):
        self.calls: list[tuple] = []
        self.propose_delay_s = propose_delay_s
        self.fail_next: Exception | None = None

    def start(self, seq_id, prompt, params, owner=""):
        self._raise_if_asked()
        self.calls.append(("start", seq_id))

    def propose(self, commits, requests):
        self._raise_if_asked()
        time.sleep(self.propose_delay_s)
        self.calls.append(("propose", tuple(requests)))
        return [f"draft of {r}" for r in requests]

    def finish(self, seq_ids):
        self.calls.append(("finish", tuple(seq_ids)))

    def _raise_if_asked(self):
        if self.fail_next is not None:
            err, self.fail_next = self.fail_next, None
            raise err


@pytest.fixture
def service():
    return RecordingService()


@pytest.fixture
def client(service):
    channel = ChannelClient(ChannelServer(service).address, timeout_s=5)
    yield channel
    channel.close()


def test_calls_are_answered_and_served_in_the_order_sent():
    """A finish sent while a slow proposal is in flight runs after it (the order a target relies on)."""
    service = RecordingService(propose_delay_s=0.2)
    client = ChannelClient(ChannelServer(service).address, timeout_s=5)
    proposal = client.call("propose", [], ["a", "b"])
    finish = client.call("finish", ["a"])
    assert not proposal.done()  # the call returned while the drafter works
    assert proposal.result(5) == ["draft of a", "draft of b"]
    finish.wait(5)
    assert finish.done()
    assert service.calls == [("propose", ("a", "b")), ("finish", ("a",))]


def test_capacity_errors_pass_through_and_others_name_only_their_type(service, client):
    service.fail_next = CapacityExhausted("all 4 sequence slots are in use")
    with pytest.raises(CapacityExhausted, match="slots are in use"):
        client.call("start", "s", [1], None).result(5)
    service.fail_next = RuntimeError("secret detail /home/user pid=1234")
    with pytest.raises(DrafterUnavailable) as raised:
        client.call("propose", [], ["s"]).result(5)
    assert str(raised.value) == "drafter call failed: RuntimeError"
    assert client.call("propose", [], ["s"]).result(5) == ["draft of s"]  # the channel stays up


def test_only_the_drafter_calls_are_reachable(service, client):
    with pytest.raises(DrafterUnavailable, match="no channel call '__init__'"):
        client.call("__init__").result(5)
    assert service.calls == []


def test_a_connection_without_the_token_is_closed_before_anything_is_read(service):
    address = ChannelServer(service).address
    wrong = ChannelAddress(address.loopback, address.port, bytes(TOKEN_BYTES))
    client = ChannelClient(wrong, timeout_s=5)
    with pytest.raises(DrafterUnavailable, match="drafter channel failed"):
        client.call("start", "s", [1], None).result(5)
    assert service.calls == []


def test_a_dead_drafter_fails_the_call_in_flight_and_every_later_one():
    """The drafter's end closes mid-call, as when its process dies."""
    accepted = []
    listener = socket.create_server(("127.0.0.1", 0))

    def accept_then_die():
        connection, _ = listener.accept()
        accepted.append(connection.recv(TOKEN_BYTES))
        time.sleep(0.1)
        connection.close()

    threading.Thread(target=accept_then_die, daemon=True).start()
    client = ChannelClient(ChannelAddress("here", listener.getsockname()[1], b"t" * TOKEN_BYTES), timeout_s=5)
    in_flight = client.call("propose", [], ["s"])
    with pytest.raises(DrafterUnavailable, match="drafter channel failed"):
        in_flight.result(5)
    with pytest.raises(DrafterUnavailable, match="drafter channel failed"):
        client.call("finish", ["s"]).result(5)
    assert accepted == [b"t" * TOKEN_BYTES]


def test_a_stalled_drafter_times_out_and_the_channel_is_then_done():
    service = RecordingService(propose_delay_s=2.0)
    client = ChannelClient(ChannelServer(service).address, timeout_s=5)
    started = time.monotonic()
    with pytest.raises(DrafterUnavailable, match="TimeoutError"):
        client.call("propose", [], ["s"]).result(0.2)
    assert time.monotonic() - started < 1.5
    with pytest.raises(DrafterUnavailable):
        client.call("finish", ["s"]).result(5)


def test_waiting_past_a_deadline_does_not_fail_the_channel():
    """`wait` (used before a start or a new proposal) gives up quietly; the answer is read later."""
    service = RecordingService(propose_delay_s=0.3)
    client = ChannelClient(ChannelServer(service).address, timeout_s=5)
    proposal = client.call("propose", [], ["s"])
    proposal.wait(0.01)
    assert not proposal.done()
    assert proposal.result(5) == ["draft of s"]


def test_the_token_never_shows_in_the_address_text(service):
    address = ChannelServer(service).address
    assert address.token.hex() not in repr(address) and str(address.token) not in repr(address)


def test_the_channel_is_offered_only_where_the_loopback_interface_is_shared(service):
    address = ChannelServer(service).address
    assert address.reachable()
    assert not ChannelAddress("another-machine", address.port, address.token).reachable()
