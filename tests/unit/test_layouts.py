"""Each binary record we read has a named layout, checked against the C that defines it.

The BPF records against bpf/echo.h and bpf/bypass.h (where they are defined); struct tcp_info
against the kernel's uapi header and against what the kernel reports for a loopback connection.
"""

from __future__ import annotations

import re
import socket
import struct
import time
from pathlib import Path

import pytest

from echod.kernel import bypass, bypass_paths
from echod.kernel import echo as sockmap
from echod.service import connection

ROOT = Path(__file__).resolve().parents[2]
CODES = {"__u8": "B", "__u16": "H", "__u32": "I", "__u64": "Q"}
TCP_H = Path("/usr/include/linux/tcp.h")  # Debian's linux-libc-dev (make deps)
TCP_ESTABLISHED, TCP_CLOSE_WAIT = 1, 8


def c_struct(header: Path, name: str) -> list[tuple[str, str]]:
    """The fields of `struct name` in a C header: (name, struct code), arrays as "4I"."""
    body = re.search(rf"struct {name} \{{(.*?)\n\}};", header.read_text(), re.S)
    assert body is not None, f"no struct {name} in {header}"
    text = re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S)
    fields = []
    for decl in filter(None, (d.strip() for d in text.split(";"))):
        m = re.fullmatch(r"(__u\d+)\s+(\w+)(?:\[(\d+)\])?", decl)
        assert m is not None, f"struct {name}: cannot read {decl!r}"
        fields.append((m.group(2), (m.group(3) or "") + CODES[m.group(1)]))
    return fields


def c_size(fields: list[tuple[str, str]]) -> int:
    """sizeof the struct, with C's natural alignment (struct's "=" adds none)."""
    offset, widest = 0, 1
    for _, code in fields:
        size = struct.calcsize(code[-1])
        offset = -(-offset // size) * size + struct.calcsize(code)
        widest = max(widest, size)
    return -(-offset // widest) * widest


@pytest.mark.parametrize(
    ("header", "name", "fields", "record"),
    [
        ("echo.h", "echo_counters", sockmap.COUNTER_FIELDS, sockmap.EchoCounters),
        ("bypass.h", "bypass_counters", bypass.COUNTER_FIELDS, bypass.BypassCounters),
    ],
)
def test_counters_mirror_their_header(
    header: str, name: str, fields: tuple[str, ...], record: type
) -> None:
    c = c_struct(ROOT / "bpf" / header, name)
    assert tuple(n for n, _ in c) == fields == record._fields
    assert {code for _, code in c} == {"Q"}  # what percpu_totals sums: __u64 only
    assert c_size(c) == 8 * len(fields)


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("bypass_key", bypass.KEY_LAYOUT),
        ("bypass_sock", bypass_paths.SOCK_LAYOUT),
        ("bypass_listener", bypass.LISTENER_LAYOUT),
    ],
)
def test_bypass_records_mirror_their_header(name: str, layout: tuple[tuple[str, str], ...]) -> None:
    c = c_struct(ROOT / "bpf" / "bypass.h", name)
    assert list(layout) == c
    assert struct.calcsize("=" + "".join(code for _, code in layout)) == c_size(c)


def test_bypass_key_decodes_by_name() -> None:
    raw = bypass.socket_key(7, ("127.0.0.1", 5000), ("::1", 40000))
    assert bypass.decode_key(raw) == {
        "netns": 7,
        "local": "::ffff:127.0.0.1",
        "remote": "::1",
        "local_port": 5000,
        "remote_port": 40000,
    }


def tcp_info_offsets(header: Path) -> dict[str, int]:
    """Offsets of struct tcp_info's fields up to tcpi_bytes_received, by C's layout rules.

    Its two lines of bit fields each fill one __u8, which is all this reader handles.
    """
    body = re.search(r"struct tcp_info \{(.*?)\n\};", header.read_text(), re.S)
    assert body is not None
    text = re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S)
    offsets, offset = {}, 0
    for decl in filter(None, (d.strip() for d in text.split(";"))):
        ctype, names = decl.split(None, 1)
        size = struct.calcsize(CODES[ctype])
        offset = -(-offset // size) * size
        if ":" in names:
            bits = sum(int(b) for b in re.findall(r":\s*(\d+)", names))
            assert bits <= 8 * size, decl
        else:
            offsets[names.strip()] = offset
        offset += size
        if "tcpi_bytes_received" in offsets:
            return offsets
    raise AssertionError("no tcpi_bytes_received")


def test_tcp_info_layout_mirrors_the_uapi_header() -> None:
    if not TCP_H.is_file():
        pytest.skip(f"{TCP_H} is not installed (Debian's linux-libc-dev)")
    offsets = tcp_info_offsets(TCP_H)
    marks = connection.TcpInfo(state=0xA5, bytes_acked=2**64 - 3, bytes_received=2**63 + 5)
    raw = connection.TCP_INFO_LAYOUT.pack(*marks)
    assert raw[offsets["tcpi_state"]] == marks.state
    at = offsets["tcpi_bytes_acked"]
    assert struct.unpack_from("=Q", raw, at)[0] == marks.bytes_acked
    at = offsets["tcpi_bytes_received"]
    assert struct.unpack_from("=Q", raw, at)[0] == marks.bytes_received
    assert connection.TCP_INFO_LAYOUT.size == at + 8
    assert not any(raw[1 : offsets["tcpi_bytes_acked"]])  # the rest is padding


def test_tcp_info_reads_what_the_kernel_counts() -> None:
    """Against a real loopback connection: the state, bytes received, bytes acked, the FIN."""
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        client = socket.create_connection(ls.getsockname(), timeout=5)
        server, _ = ls.accept()
        with client, server:
            server.settimeout(5)
            client.sendall(b"x" * 1000)
            got = b""
            while len(got) < 1000:
                got += server.recv(1000)
            server.sendall(b"y" * 300)
            assert len(client.recv(300, socket.MSG_WAITALL)) == 300
            deadline = time.monotonic() + 5
            info = connection.tcp_info(server)
            while info.bytes_acked < 300 and time.monotonic() < deadline:
                time.sleep(0.01)  # the ACK of the echo is on its way
                info = connection.tcp_info(server)
            assert info == connection.TcpInfo(TCP_ESTABLISHED, 300, 1000)
            client.shutdown(socket.SHUT_WR)
            assert server.recv(1) == b""
            info = connection.tcp_info(server)
            assert (info.state, info.bytes_received) == (TCP_CLOSE_WAIT, 1001)  # the FIN's one
