"""Control protocol wire format: golden frames, parameter and request validation."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from echod.control import protocol
from echod.control.protocol import (
    FrameError,
    FrameReader,
    RequestError,
    encode_request,
    validate_params,
)


def test_request_golden_bytes() -> None:
    assert protocol.encode_request(1, "status") == bytes.fromhex(
        "940001a6737461747573 80".replace(" ", "")
    )
    assert protocol.encode_request(2, "start", {"mode": "user"}) == (
        b"\x94\x00\x02\xa5start\x81\xa4mode\xa4user"
    )


def test_response_golden_bytes() -> None:
    assert protocol.encode_response(1, None, {"state": "serving"}) == (
        b"\x94\x01\x01\xc0\x81\xa5state\xa7serving"
    )
    err = protocol.error_body("bad_state", "already serving")
    assert protocol.encode_response(7, err, None) == (
        b"\x94\x01\x07\x82\xa4code\xa9bad_state\xa7message\xafalready serving\xc0"
    )
    assert protocol.encode_response(None, protocol.error_body("x", "y"), None) == (
        b"\x94\x01\xc0\x82\xa4code\xa1x\xa7message\xa1y\xc0"
    )


def test_notification_golden_bytes() -> None:
    assert (
        protocol.encode_notification("stats", {"time": 1}) == b"\x93\x02\xa5stats\x81\xa4time\x01"
    )


@pytest.mark.parametrize(
    ("method", "params", "expected"),
    [
        ("status", {}, {}),
        ("status", [], {}),
        ("status", None, {}),
        ("start", {}, {"mode": None, "port": None, "bypass": None}),
        (
            "start",
            {"mode": "kernel", "port": 8888, "bypass": True},
            {"mode": "kernel", "port": 8888, "bypass": True},
        ),
        ("restart", {"mode": "auto"}, {"mode": "auto", "bypass": None}),
        ("restart", {"bypass": False}, {"mode": None, "bypass": False}),
        ("watch", {}, {"interval": 1.0}),
        ("watch", {"interval": 2}, {"interval": 2.0}),
        ("watch", {"interval": 0.1}, {"interval": 0.1}),
        ("watch", {"interval": 60.0}, {"interval": 60.0}),
    ],
)
def test_valid_params(method: str, params: Any, expected: dict[str, Any]) -> None:
    assert validate_params(method, params) == expected


@pytest.mark.parametrize(
    ("method", "params", "code"),
    [
        ("nope", {}, "unknown_method"),
        ("status", [1], "invalid_params"),
        ("status", "x", "invalid_params"),
        ("status", {"verbose": True}, "invalid_params"),
        ("start", {"mode": "turbo"}, "invalid_params"),
        ("start", {"mode": 1}, "invalid_params"),
        ("start", {"port": 0}, "invalid_params"),
        ("start", {"port": 65536}, "invalid_params"),
        ("start", {"port": "80"}, "invalid_params"),
        ("start", {"port": True}, "invalid_params"),
        ("start", {"port": 80.0}, "invalid_params"),
        ("restart", {"port": 80}, "invalid_params"),
        ("restart", {"bypass": "yes"}, "invalid_params"),
        ("start", {"bypass": 1}, "invalid_params"),
        ("watch", {"interval": 0.05}, "invalid_params"),
        ("watch", {"interval": 61}, "invalid_params"),
        ("watch", {"interval": "1"}, "invalid_params"),
        ("watch", {"interval": float("nan")}, "invalid_params"),
        ("watch", {"interval": False}, "invalid_params"),
        ("stop", {"now": 1}, "invalid_params"),
    ],
)
def test_invalid_params(method: str, params: Any, code: str) -> None:
    with pytest.raises(RequestError) as info:
        validate_params(method, params)
    assert info.value.code == code
    assert info.value.code in protocol.ERROR_CODES


@pytest.mark.parametrize(
    "frame",
    [
        5,
        "x",
        [],
        [0, 1, "status"],
        [1, 1, "status", {}],
        [0, -1, "status", {}],
        [0, 1, 7, {}],
        [0, "1", "status", {}],
        [0, True, "status", {}],
    ],
)
def test_parse_request_rejects(frame: Any) -> None:
    with pytest.raises(RequestError) as info:
        protocol.parse_request(frame)
    assert info.value.code == "invalid_request"


@pytest.mark.parametrize(
    ("frame", "msgid"),
    [
        ([0, 5, 7, {}], 5),
        ([0, 5, "status"], 5),
        ([0, 6], 6),
        ([0, 2**32 - 1, "status", {}, "extra"], 2**32 - 1),
        ((0, 8, "status", {}), 8),
        ([0, -1, "status", {}], None),
        ([0, 2**32, "status", {}], None),
        ([0, True, "status", {}], None),
        ([0, "5", "status", {}], None),
        ([1, 5, None, None], None),
        ([9, 9, 9], None),
        ([0], None),
        ({"0": 5}, None),
        (7, None),
    ],
)
def test_request_msgid(frame: Any, msgid: int | None) -> None:
    assert protocol.request_msgid(frame) == msgid


def test_describe_exception_names_the_class() -> None:
    unpacker = msgpack.Unpacker()
    unpacker.feed(b"\xc1")
    with pytest.raises(msgpack.FormatError) as info:
        unpacker.unpack()
    assert protocol.describe_exception(info.value) == "FormatError"
    assert protocol.describe_exception(ValueError("bad")) == "ValueError: bad"


def test_frame_reader_splits_a_stream_into_frames_with_their_sizes() -> None:
    one, two = encode_request(1, "status"), encode_request(2, "stats", {"x": "y" * 300})
    reader = FrameReader(len(two) + 10)
    stream = one + two
    got = []
    for i in range(0, len(stream), 7):  # any split of the stream gives the same frames
        reader.feed(stream[i : i + 7])
        while (frame := reader.next_frame()) is not None:
            got.append(frame)
        assert reader.partial == (reader.fed > sum(size for _, size in got))
    assert got == [([0, 1, "status", {}], len(one)), ([0, 2, "stats", {"x": "y" * 300}], len(two))]
    assert not reader.partial


def test_frame_reader_refuses_more_than_its_buffer_and_undecodable_bytes() -> None:
    reader = FrameReader(100)
    with pytest.raises(FrameError) as too_large:
        reader.feed(encode_request(1, "status", {"x": "y" * 200}))
    assert too_large.value.code == "frame_too_large"
    reader = FrameReader(100)
    reader.feed(b"\xc1")  # never valid in msgpack
    with pytest.raises(FrameError) as undecodable:
        reader.next_frame()
    assert undecodable.value.code == "invalid_request"
    assert undecodable.value.message.startswith("undecodable frame: ")
