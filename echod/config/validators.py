"""Validators for the configuration: a raw value (TOML, or parsed from text) -> normalised.

Each raises Invalid with the reason; config.SCHEMA names the validator of every setting, and
config.ConfigError adds where the value came from.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable

METRICS_DEFAULT_HOST = "127.0.0.1"

# sockaddr_un.sun_path is 108 bytes, the last one the NUL.
SUN_PATH_MAX = 107
# The kernel's ceiling for pid_max (PID_MAX_LIMIT): the longest pid a temporary name can hold.
PID_MAX_LIMIT = 4 * 1024 * 1024

# Upper bounds: every number a setting holds has one, so that no value can overflow a float, a
# C type or a timer further on, and an absurd value is refused with the others at start.
MAX_PORT = 65535
MAX_CONNECTIONS = 10_000_000
MAX_GRACE = 600.0  # seconds; systemd's TimeoutStopSec is the outer limit under the unit
MAX_BACKLOG = 1 << 40  # bytes (1 TiB)
MAX_GID = 2**32 - 2  # gid_t is 32 bits, and (gid_t)-1 means "unchanged" to chown()
MAX_HOSTS = 64
MAX_ALLOW = 1024
MAX_UDP_RATE = 1_000_000  # datagrams per second from one source address
MAX_DROP_PORTS = 256
# A value is echoed in a message at most this long, so that every message stays one short line.
SHOWN_MAX = 60


def control_temp_path(path: str, pid: int | str) -> str:
    """The private name the control socket is bound and chmod-ed under before its rename."""
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name}.{pid}.tmp")


class Invalid(ValueError):
    """Raised by a validator; `needle` is text that locates the bad list element."""

    def __init__(self, reason: str, needle: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.needle = needle


# --- validators: a raw value (TOML, or parsed from text) -> the normalised value, or Invalid ----


def shown(value: object) -> str:
    """A value as a message quotes it: repr, but short, and a huge integer by its size."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        # str() of an integer over 4300 digits raises ValueError: name its size instead.
        if value.bit_length() > 14_000:
            return f"an integer of {value.bit_length()} bits"
        digits = str(abs(value))
        return f"{'-' if value < 0 else ''}{digits[:8]}... ({len(digits)} digits)"
    text = repr(value)
    if len(text) > SHOWN_MAX:
        size = f"{len(value)} characters" if isinstance(value, str) else "truncated"
        text = f"{text[: SHOWN_MAX - 10]}... ({size})"
    return text


def type_name(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}.get(
        type(value), "a " + type(value).__name__
    )


def integer(lo: int, hi: int, *, ceiling: bool = False) -> Callable[[object], int]:
    """An integer from lo to hi; with `ceiling`, hi is a sanity bound, not the natural range."""
    bound = f">= {lo} and <= {hi}" if ceiling else f"from {lo} to {hi}"

    def check(value: object) -> int:
        # bool is an int subclass, and `port = true` is always a mistake.
        if not isinstance(value, int) or isinstance(value, bool):
            raise Invalid(f"must be an integer, got {type_name(value)}")
        if not lo <= value <= hi:
            raise Invalid(f"must be an integer {bound}, got {shown(value)}")
        return value

    return check


def choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str):
            raise Invalid(f"must be a string, got {type_name(value)}")
        if value.lower() not in choices:
            raise Invalid(f"must be one of {', '.join(choices)}; got {shown(value)}")
        return value.lower()

    return check


def _str_list(value: object) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise Invalid(f"must be a string or a list of strings, got {type_name(value)}")
    for item in items:
        if not isinstance(item, str):
            raise Invalid(f"must be a list of strings, found {type_name(item)}", shown(item))
    return list(items)


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")
_GROUP = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]+")


def _host(value: str) -> str:
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(text) or text.replace(".", "").isdigit():
        raise Invalid(f"{shown(value)} is not an IP address or host name", value)
    # Resolve now: a name that does not resolve would otherwise fail after BPF is attached.
    try:
        socket.getaddrinfo(text, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise Invalid(
            f"{shown(value)} is not an IP address and does not resolve: {reason}", value
        ) from None
    return text


def hosts(value: object) -> list[str]:
    items = _str_list(value)
    if len(items) > MAX_HOSTS:
        raise Invalid(f"names {len(items)} listen addresses; at most {MAX_HOSTS}")
    hosts = [_host(item) for item in items]
    if not hosts:
        raise Invalid("must name at least one listen address")
    return list(dict.fromkeys(hosts))


def allow(value: object) -> list[str]:
    if isinstance(value, str):
        raise Invalid('must be a list of CIDR strings, e.g. ["127.0.0.0/8", "::1/128"]')
    items = _str_list(value)
    if len(items) > MAX_ALLOW:
        raise Invalid(f"lists {len(items)} networks; at most {MAX_ALLOW}")
    nets = []
    for item in items:
        try:
            nets.append(str(ipaddress.ip_network(item.strip(), strict=True)))
        except ValueError as exc:
            # ipaddress quotes the whole value: only a short one is worth repeating.
            why = f": {exc}" if len(item) <= SHOWN_MAX else ""
            raise Invalid(f"{shown(item)} is not a valid CIDR{why}", item) from None
    return list(dict.fromkeys(nets))


def ports(value: object) -> list[int]:
    """A list of port numbers (0-65535), duplicates dropped."""
    if not isinstance(value, list | tuple):
        raise Invalid(f"must be a list of port numbers, e.g. [7, 19], got {type_name(value)}")
    if len(value) > MAX_DROP_PORTS:
        raise Invalid(f"lists {len(value)} ports; at most {MAX_DROP_PORTS}")
    port = integer(0, MAX_PORT)
    out = []
    for item in value:
        try:
            out.append(port(item))
        except Invalid as exc:
            raise Invalid(f"{shown(item)}: {exc.reason}", shown(item)) from None
    return list(dict.fromkeys(out))


def control_path(value: object) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be a string, got {type_name(value)}")
    if not value.startswith("/"):
        raise Invalid(f"must be an absolute path, got {shown(value)}")
    if not os.path.basename(value):
        raise Invalid(f"must name a socket file, not a directory: {shown(value)}")
    # The daemon binds a longer private name first, then renames it: that name must fit too.
    size = len(value.encode())
    overhead = len(control_temp_path(value, PID_MAX_LIMIT).encode()) - size
    if size + overhead > SUN_PATH_MAX:
        temp = control_temp_path(os.path.basename(value), "<pid>")
        raise Invalid(
            f"is too long ({size} bytes): the daemon binds it first as {temp!r} in the same "
            f"directory, and a Unix socket path holds at most {SUN_PATH_MAX} bytes; use at most "
            f"{SUN_PATH_MAX - overhead}"
        )
    return value


def group(value: object) -> str | None:
    if not isinstance(value, str):
        raise Invalid(f"must be a group name, got {type_name(value)}")
    if value == "":
        return None
    if not _GROUP.fullmatch(value):
        raise Invalid(f"{shown(value)} is not a valid group name")
    if value.isdigit() and (len(value) > 10 or int(value) > MAX_GID):
        raise Invalid(f"gid {shown(value)} is out of range (at most {MAX_GID})")
    return value


def parse_address(
    value: str, default_host: str = METRICS_DEFAULT_HOST, min_port: int = 1
) -> tuple[str, int]:
    """Split "HOST:PORT", "[V6]:PORT" or a bare "PORT" into (host, port); ValueError if bad."""
    text = value.strip()
    if _is_digits(text):
        host, port_text = default_host, text
    elif text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise Invalid(f"{shown(value)} is not HOST:PORT")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise Invalid(f"{shown(value)} is not HOST:PORT (write IPv6 as [::1]:9108)")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise Invalid(f"{shown(host)} in {shown(value)} is not an IP address") from None
    # Six digits at most: int() of a long string is slow, and of a huge one an error.
    if not (_is_digits(port_text) and len(port_text) <= 6) or not (
        min_port <= int(port_text) <= MAX_PORT
    ):
        raise Invalid(f"port in {shown(value)} must be from {min_port} to {MAX_PORT}")
    return host, int(port_text)


def _is_digits(text: str) -> bool:
    """Only ASCII digits: str.isdigit() is true of "²" too, which int() refuses."""
    return text.isascii() and text.isdigit()


def metrics_address(value: object) -> str | None:
    if not isinstance(value, str):
        raise Invalid(f'must be a string like "127.0.0.1:9108", got {type_name(value)}')
    if value.strip() == "":
        return None
    host, port = parse_address(value)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def seconds(hi: float) -> Callable[[object], float]:
    def check(value: object) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise Invalid(f"must be a number of seconds, got {type_name(value)}")
        # Compared before any float(): a huge integer cannot become a float.
        if not (0 < value <= hi) or (isinstance(value, float) and not math.isfinite(value)):
            raise Invalid(f"must be a number of seconds > 0 and <= {hi:g}, got {shown(value)}")
        return float(value)

    return check


MAX_WORKERS = 256


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask, so a cpuset is respected)."""
    return len(os.sched_getaffinity(0))


def workers(value: object) -> int:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return min(cpu_count(), MAX_WORKERS)
    if isinstance(value, str):
        raise Invalid(f"must be auto or a number of workers, got {shown(value)}")
    return integer(1, MAX_WORKERS)(value)


def text_workers(text: str) -> int | str:
    text = text.strip()
    return text_int(text) if _is_digits(text) else text


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, got {type_name(value)}")
    return value


def cgroup_dir(value: object) -> str | None:
    if value is None or value == "":
        return None  # the root of the cgroup v2 hierarchy, found at run time
    if not isinstance(value, str) or not value.startswith("/"):
        raise Invalid(f"must be an absolute path to a cgroup v2 directory, got {shown(value)}")
    return os.path.normpath(value)


def file_path(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise Invalid(f"must be a path, got {type_name(value)}")
    return value or None


# --- text (environment variables, flags) -> what the validator takes ----------------------------


def text(value: str) -> str:
    """Environment or flag text as it is, trimmed."""
    return value.strip()


def text_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def text_ports(text: str) -> list[int]:
    """Comma-separated port numbers; empty text is no port."""
    return [text_int(part) for part in text_list(text)]


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def text_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise Invalid(f"must be one of {', '.join(_TRUE + _FALSE)}, got {shown(text)}")


# Longer text is no integer any setting takes, and int() of it costs time quadratic in its length.
_TEXT_NUMBER_MAX = 40


def text_int(text: str) -> int:
    word = text.strip()
    if len(word) > _TEXT_NUMBER_MAX:
        if _is_digits(word.removeprefix("-").removeprefix("+")):
            raise Invalid(f"is out of range, got {len(word)} digits")
        raise Invalid(f"must be an integer, got {shown(text)}")
    try:
        return int(word)
    except ValueError:
        raise Invalid(f"must be an integer, got {shown(text)}") from None


def text_float(text: str) -> float:
    word = text.strip()
    try:
        number = float(word)
    except ValueError:
        raise Invalid(f"must be a number of seconds, got {shown(text)}") from None
    if math.isinf(number) and "inf" not in word.lower():
        raise Invalid(f"is out of range, got {shown(text)}")  # 1e999: not "inf" as written
    return number
