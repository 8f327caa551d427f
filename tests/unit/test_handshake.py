"""The link handshake, sans-IO: message round trips, one "malformed" for every payload
of the wrong size, and HMAC proofs that bind the secret, both nonces (through the
HELLO), the epoch and the direction."""

from __future__ import annotations

import functools
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phalanx.comm import handshake as hs
from phalanx.errors import AuthError, HandshakeError, ProtocolError

NONCE = bytes(range(32))


def hello(**overrides: object) -> hs.Hello:
    fields: dict[str, object] = {
        "world": 4,
        "from_rank": 1,
        "to_rank": 2,
        "stream": 0,
        "streams": 2,
        "nonce": NONCE,
    }
    fields.update(overrides)
    return hs.Hello(**fields)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- HELLO


@settings(max_examples=100, deadline=None)
@given(
    world=st.integers(1, 2**32 - 1),
    from_rank=st.integers(0, 2**32 - 1),
    to_rank=st.integers(0, 2**32 - 1),
    streams=st.integers(1, 0xFFFF),
    data=st.data(),
    nonce=st.binary(min_size=32, max_size=32),
)
def test_hello_round_trips(
    world: int, from_rank: int, to_rank: int, streams: int, data: st.DataObject, nonce: bytes
) -> None:
    stream = data.draw(st.integers(0, streams - 1))
    msg = hs.Hello(world, from_rank, to_rank, stream, streams, nonce)
    payload = hs.encode_hello(msg)
    assert len(payload) == 48
    assert payload.endswith(nonce)
    assert hs.decode_hello(payload) == msg
    assert len(payload) <= hs.MAX_HANDSHAKE_PAYLOAD


def test_hello_wire_layout() -> None:
    payload = hs.encode_hello(hello(world=7, from_rank=3, to_rank=5, stream=1, streams=4))
    assert struct.unpack("<IIIHH", payload[:16]) == (7, 3, 5, 1, 4)
    assert payload[16:] == NONCE


@pytest.mark.parametrize(
    "overrides",
    [
        {"world": 0},
        {"from_rank": -1},
        {"to_rank": 2**32},
        {"stream": 2, "streams": 2},
        {"stream": -1},
        {"stream": 0, "streams": 0},
        {"streams": 0x10000},
        {"nonce": b"short"},
        {"nonce": NONCE + b"x"},
    ],
)
def test_hello_constructor_validates(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        hello(**overrides)


@pytest.mark.parametrize("size", [0, 1, 47, 49, 200, hs.MAX_HANDSHAKE_PAYLOAD])
def test_hello_of_the_wrong_size_is_malformed(size: int) -> None:
    with pytest.raises(HandshakeError) as info:
        hs.decode_hello(os.urandom(size))
    assert info.value.reason == "malformed"
    assert not isinstance(info.value, AuthError)


@pytest.mark.parametrize(
    "fields",
    [
        (0, 1, 2, 0, 1),  # world 0
        (4, 1, 2, 1, 1),  # stream == streams
        (4, 1, 2, 0, 0),  # no streams
        (4, 1, 2, 9, 3),  # stream past streams
    ],
)
def test_hello_with_invalid_fields_is_malformed_not_valueerror(
    fields: tuple[int, int, int, int, int],
) -> None:
    payload = struct.pack("<IIIHH", *fields) + NONCE
    with pytest.raises(HandshakeError) as info:
        hs.decode_hello(payload)
    assert info.value.reason == "malformed"


# --------------------------------------------------------------------------- CHALLENGE


@settings(max_examples=50, deadline=None)
@given(
    rank=st.integers(0, 2**32 - 1),
    nonce=st.binary(min_size=32, max_size=32),
    mac=st.binary(min_size=32, max_size=32),
)
def test_challenge_round_trips(rank: int, nonce: bytes, mac: bytes) -> None:
    msg = hs.Challenge(rank, nonce, mac)
    payload = hs.encode_challenge(msg)
    assert len(payload) == 68
    assert hs.decode_challenge(payload) == msg


@pytest.mark.parametrize("size", [0, 1, 67, 69, 512])
def test_challenge_of_the_wrong_size_is_malformed(size: int) -> None:
    with pytest.raises(HandshakeError) as info:
        hs.decode_challenge(bytes(size))
    assert info.value.reason == "malformed"


# --------------------------------------------------------------------------- PROOF


def test_proof_round_trips() -> None:
    mac = os.urandom(32)
    assert hs.decode_proof(mac) == mac
    assert type(hs.decode_proof(bytearray(mac))) is bytes  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_proof_of_the_wrong_size_is_malformed(size: int) -> None:
    with pytest.raises(HandshakeError) as info:
        hs.decode_proof(bytes(size))
    assert info.value.reason == "malformed"


# --------------------------------------------------------------------------- REJECT


@pytest.mark.parametrize("reason", list(hs.LinkRefusal), ids=lambda r: r.name)
def test_reject_round_trips(reason: hs.LinkRefusal) -> None:
    code, text = hs.decode_reject(hs.encode_reject(reason, f"because {reason.name} ünïcode"))
    assert code is reason
    assert text == f"because {reason.name} ünïcode"


def test_reject_text_is_bounded() -> None:
    payload = hs.encode_reject(hs.LinkRefusal.DUPLICATE, "x" * 10_000)
    assert len(payload) <= hs.MAX_HANDSHAKE_PAYLOAD
    code, text = hs.decode_reject(payload)
    assert code == hs.LinkRefusal.DUPLICATE
    assert 0 < len(text) < 10_000
    # A peer that sends more text than allowed does not get it all through.
    _, text = hs.decode_reject(bytes([hs.LinkRefusal.UNEXPECTED]) + b"y" * 400)
    assert len(text) < 400


@pytest.mark.parametrize("code", [0, 10, 99, 255])
def test_unknown_reject_code_is_returned_as_a_plain_int(code: int) -> None:
    reason, text = hs.decode_reject(bytes([code]) + b"why")
    assert reason == code
    assert not isinstance(reason, hs.LinkRefusal)
    assert text == "why"


def test_empty_reject_is_malformed() -> None:
    reason, text = hs.decode_reject(b"")
    assert reason is hs.LinkRefusal.MALFORMED
    assert text


def test_reject_with_invalid_utf8_decodes() -> None:
    reason, text = hs.decode_reject(bytes([hs.LinkRefusal.BAD_AUTH]) + b"\xff\xfe ok")
    assert reason is hs.LinkRefusal.BAD_AUTH
    assert text.endswith(" ok")


def test_reject_codes_are_one_byte_and_distinct() -> None:
    codes = [int(r) for r in hs.LinkRefusal]
    assert len(set(codes)) == len(codes)
    assert all(0 < c < 256 for c in codes)


# --------------------------------------------------------------------------- MACs

SECRET = b"s" * 32
HELLO_PAYLOAD = hs.encode_hello(hello())
NONCE_S = b"n" * 32


def test_macs_are_sha256_sized_and_deterministic() -> None:
    a = hs.accept_mac(SECRET, HELLO_PAYLOAD, NONCE_S, 5, 2)
    assert len(a) == 32
    assert a == hs.accept_mac(SECRET, HELLO_PAYLOAD, NONCE_S, 5, 2)
    hs.check_mac(a, hs.accept_mac(SECRET, HELLO_PAYLOAD, NONCE_S, 5, 2), who="test")


def test_accept_and_connect_macs_differ() -> None:
    a = hs.accept_mac(SECRET, HELLO_PAYLOAD, NONCE_S, 5, 2)
    c = hs.connect_mac(SECRET, HELLO_PAYLOAD, NONCE_S, 5)
    assert a != c
    # A proof from one direction is useless in the other.
    with pytest.raises(AuthError):
        hs.check_mac(c, a, who="reflector")


_OTHER_HELLO = hs.encode_hello(hello(nonce=b"\x01" * 32))


@pytest.mark.parametrize(
    ("secret", "hello_payload", "nonce_s", "epoch"),
    [
        (b"t" * 32, HELLO_PAYLOAD, NONCE_S, 5),  # another secret
        (SECRET[:-1], HELLO_PAYLOAD, NONCE_S, 5),  # a prefix of the secret
        (SECRET, _OTHER_HELLO, NONCE_S, 5),  # another connector nonce
        (SECRET, hs.encode_hello(hello(from_rank=3)), NONCE_S, 5),  # another claimed rank
        (SECRET, HELLO_PAYLOAD, b"m" * 32, 5),  # another acceptor nonce
        (SECRET, HELLO_PAYLOAD, NONCE_S, 6),  # another epoch
        (SECRET, HELLO_PAYLOAD, NONCE_S, 5 + 2**32),  # epoch differing in high bits
    ],
    ids=[
        "secret",
        "secret-prefix",
        "nonce-c",
        "from-rank",
        "nonce-s",
        "epoch",
        "epoch-high-bits",
    ],
)
def test_a_mac_over_anything_else_fails(
    secret: bytes, hello_payload: bytes, nonce_s: bytes, epoch: int
) -> None:
    makers = (
        functools.partial(hs.accept_mac, rank=2),
        hs.connect_mac,
    )
    for make in makers:
        expected = make(SECRET, HELLO_PAYLOAD, NONCE_S, 5)
        forged = make(secret, hello_payload, nonce_s, epoch)
        assert forged != expected
        with pytest.raises(AuthError) as info:
            hs.check_mac(expected, forged, who="connector claiming rank 1", peer=1)
        err = info.value
        assert err.reason == "bad-auth"
        assert err.peer == 1
        assert "connector claiming rank 1" in str(err)
        assert isinstance(err, HandshakeError)
        assert isinstance(err, ProtocolError)


@pytest.mark.parametrize("got", [b"", b"\0" * 32, b"\0" * 31, b"\0" * 64])
def test_check_mac_refuses_wrong_lengths_and_zero_macs(got: bytes) -> None:
    with pytest.raises(AuthError):
        hs.check_mac(hs.accept_mac(SECRET, HELLO_PAYLOAD, NONCE_S, 0, 2), got, who="x")


def test_nonces_are_fresh() -> None:
    nonces = {hs.new_nonce() for _ in range(64)}
    assert len(nonces) == 64
    assert all(len(n) == hs.NONCE_SIZE == 32 for n in nonces)


def test_the_acceptors_proof_names_the_rank_it_answers_as() -> None:
    """Without the rank, a listener's proof for one rank passed for another: the
    reflection in test_transport's test_a_reflected_hello_cannot_impersonate_a_peer."""
    assert hs.accept_mac(SECRET, HELLO_PAYLOAD, NONCE_S, 5, 1) != hs.accept_mac(
        SECRET, HELLO_PAYLOAD, NONCE_S, 5, 0
    )
