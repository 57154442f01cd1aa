"""ctypes bindings for the few libbpf calls echod uses: loading the library, its prototypes (and
libc's mmap, munmap, vsnprintf), errno → OSError, fd ownership, and the single calls (attach,
link, map elements, run-time stats, CPUs). Built on it: objects.py (a BPF object's lifecycle),
info.py (what the kernel says about programs, maps and links) and ring.py (a ring buffer's raw
memory); only modules under echod/kernel import ctypes or mmap.

Conventions (libbpf 1.x): a negative return is -errno and becomes OSError(errno, strerror,
call name); a NULL pointer reads errno. Errnos that mean "this kernel cannot do it" become
NotSupported so callers can branch on the type. libbpf's own codes (4000 and up) are described
with libbpf's words, not "Unknown error 4001".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import importlib.util
import os
import struct
from pathlib import Path
from typing import Any

import structlog

from echod.kernel.errors import NotSupported

log = structlog.get_logger("echod.libbpf")

# enum bpf_attach_type (uapi/linux/bpf.h)
BPF_CGROUP_SOCK_OPS = 3
BPF_SK_SKB_STREAM_VERDICT = 5
BPF_SK_MSG_VERDICT = 7
# enum bpf_stats_type
BPF_STATS_RUN_TIME = 0
# map update flags
BPF_ANY = 0
BPF_NOEXIST = 1

# Errnos with which the kernel says "not here" rather than "you did it wrong".
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EPERM, errno.EACCES, errno.ENOTSUP}

# enum libbpf_errno (bpf/libbpf.h): libbpf's own error codes, above the kernel's errnos.
LIBBPF_ERRNO_START = 4000
LIBBPF_ERRNO_END = 4100
# libbpf_strerror()'s table (libbpf.c), for a build that does not export the function (the
# pylibbpf wheel's). LIBBPF_ERRNO__LOAD (4006) has no entry there; its words are the header's.
_LIBBPF_ERRORS = (
    "Something wrong in libelf",
    "BPF object format invalid",
    "'version' section incorrect or lost",
    "Endian mismatch",
    "Internal error in libbpf",
    "Relocation failed",
    "Load program failure for unknown reason",
    "Kernel verifier blocks program loading",
    "Program too big",
    "Incorrect kernel version",
    "Kernel doesn't support this program type",
    "Wrong pid in netlink message",
    "Invalid netlink sequence",
    "Incorrect netlink message parsing",
)


def candidates() -> list[str]:
    """Library search order: $ECHOD_LIBBPF, the pylibbpf wheel's extension, libbpf.so.1."""
    found: list[str] = []
    env = os.environ.get("ECHOD_LIBBPF")
    if env:
        found.append(env)
    # find_spec on the top-level name does not import the package (which pulls in llvmlite).
    spec = importlib.util.find_spec("pylibbpf")
    for location in (spec.submodule_search_locations or []) if spec else []:
        found.extend(str(p) for p in sorted(Path(location).glob("pylibbpf*.so")))
    found.append(ctypes.util.find_library("bpf") or "libbpf.so.1")
    return found


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_LEVELS = ("warning", "info", "debug")


class Library:
    """The loaded libbpf shared object with typed prototypes, and libc (`libc`) with its few."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.cdll = ctypes.CDLL(path, use_errno=True)
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._declare()
        # Keep a reference: the callback must live as long as libbpf may call it.
        self._print_cb = _PRINT_FN(self._on_print)
        self.cdll.libbpf_set_print(self._print_cb)

    def _declare(self) -> None:
        c = self.cdll
        vp, cp, i, u32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32
        protos: dict[str, tuple[Any, list[Any]]] = {
            "bpf_object__open_file": (vp, [cp, vp]),
            "bpf_object__load": (i, [vp]),
            "bpf_object__close": (None, [vp]),
            "bpf_object__find_program_by_name": (vp, [vp, cp]),
            "bpf_object__find_map_fd_by_name": (i, [vp, cp]),
            "bpf_program__fd": (i, [vp]),
            "bpf_prog_attach": (i, [i, i, i, u32]),
            "bpf_prog_detach2": (i, [i, i, i]),
            "bpf_link_create": (i, [i, i, i, vp]),
            "bpf_link__fd": (i, [vp]),
            "bpf_link__destroy": (i, [vp]),
            "bpf_map_update_elem": (i, [i, vp, vp, ctypes.c_uint64]),
            "bpf_map_lookup_elem": (i, [i, vp, vp]),
            "bpf_map_delete_elem": (i, [i, vp]),
            "bpf_map_get_next_key": (i, [i, vp, vp]),
            "bpf_enable_stats": (i, [i]),
            "bpf_obj_get_info_by_fd": (i, [i, vp, ctypes.POINTER(u32)]),
            "libbpf_num_possible_cpus": (i, []),
            "libbpf_set_print": (vp, [_PRINT_FN]),
        }
        for name, (restype, argtypes) in protos.items():
            fn = getattr(c, name)
            fn.restype = restype
            fn.argtypes = argtypes
        # Optional: libbpf 1.3+ (the wheel's; not Debian 12's 1.1).
        self.attach_tcx = getattr(c, "bpf_program__attach_tcx", None)
        if self.attach_tcx is not None:
            self.attach_tcx.restype = vp
            self.attach_tcx.argtypes = [vp, i, vp]
        # Optional: Debian's libbpf exports it, the wheel's static build does not.
        self._strerror = getattr(c, "libbpf_strerror", None)
        if self._strerror is not None:
            self._strerror.restype = i
            self._strerror.argtypes = [i, ctypes.c_char_p, ctypes.c_size_t]
        self.libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, cp, vp]
        self.libc.vsnprintf.restype = i
        self.libc.mmap.argtypes = [vp, ctypes.c_size_t, i, i, i, ctypes.c_long]
        self.libc.mmap.restype = vp
        self.libc.munmap.argtypes = [vp, ctypes.c_size_t]
        self.libc.munmap.restype = i

    def strerror(self, code: int) -> str | None:
        """libbpf_strerror(code) when this build exports it and knows the code, else None."""
        if self._strerror is None:
            return None
        buf = ctypes.create_string_buffer(256)
        if self._strerror(code, buf, len(buf)) != 0:
            return None
        text = buf.value.decode(errors="replace")
        # libbpf 1.1 prints a NULL table entry (LIBBPF_ERRNO__LOAD) as "(null)".
        return None if text in ("", "(null)") else text

    def _on_print(self, level: int, fmt: bytes, args: int) -> int:
        buf = ctypes.create_string_buffer(1 << 16)
        self.libc.vsnprintf(buf, len(buf), fmt, args)
        text = buf.value.decode(errors="replace").rstrip()
        # The verifier's explanation of a refused program arrives here, into the daemon's log.
        getattr(log, "debug" if level >= 2 else _LEVELS[level])("libbpf", message=text)
        return 0


_lib: Library | None = None


def library() -> Library:
    """Load libbpf once, trying each candidate in the documented order."""
    global _lib
    if _lib is None:
        errors = []
        for path in candidates():
            try:
                _lib = Library(path)
                break
            except (OSError, AttributeError) as exc:
                errors.append(f"{path}: {exc}")
        else:
            raise NotSupported(errno.ENOENT, "no usable libbpf: " + "; ".join(errors))
        log.debug("libbpf.loaded", path=_lib.path)
    return _lib


def strerror(code: int) -> str:
    """The words for an errno, or for one of libbpf's own codes (LIBBPF_ERRNO__*)."""
    if not LIBBPF_ERRNO_START <= code < LIBBPF_ERRNO_END:
        return os.strerror(code)
    text = _lib.strerror(code) if _lib is not None else None
    if text is None and code - LIBBPF_ERRNO_START < len(_LIBBPF_ERRORS):
        text = _LIBBPF_ERRORS[code - LIBBPF_ERRNO_START]
    return text or f"libbpf error {code}"


def error(rc: int, what: str) -> OSError:
    """The OSError (or NotSupported) for -rc, or for errno when rc is not negative."""
    code = -rc if rc < 0 else ctypes.get_errno()
    cls = NotSupported if code in _UNSUPPORTED else OSError
    return cls(code, strerror(code), what)


def check(rc: int, what: str) -> int:
    """Return rc, or raise the OSError (or NotSupported) that a negative rc encodes."""
    if rc < 0:
        raise error(rc, what)
    return rc


def check_ptr(ptr: int | None, what: str) -> int:
    """Return a non-NULL pointer, or raise from errno."""
    if not ptr:
        raise error(0, what)
    return ptr


class FdHolder:
    """Owns one file descriptor; close() is idempotent and leaves fd at -1."""

    def __init__(self, fd: int) -> None:
        """Takes ownership of fd."""
        self.fd = fd

    def close(self) -> None:
        """Close the fd once."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> FdHolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prog_attach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    """Attach a program to a target (a sockmap for sk_skb programs)."""
    check(library().cdll.bpf_prog_attach(prog_fd, target_fd, attach_type, 0), "bpf_prog_attach")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    """Undo prog_attach."""
    check(library().cdll.bpf_prog_detach2(prog_fd, target_fd, attach_type), "bpf_prog_detach2")


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> FdHolder:
    """Attach a program through a BPF link; the attachment lasts as long as the returned fd.

    Unlike prog_attach, nothing outlives the process: a SIGKILL closes the fd, and the kernel
    detaches. The target is a cgroup directory's fd for sock_ops, a sockmap's for sk_msg and
    sk_skb (a link type since Linux 6.10).
    """
    fd = check(
        library().cdll.bpf_link_create(prog_fd, target_fd, attach_type, None),
        "bpf_link_create",
    )
    return FdHolder(fd)


class Link:
    """A libbpf struct bpf_link (a kernel BPF link and its fd); close() destroys it once, and
    the kernel detaches the program with the link's last fd."""

    def __init__(self, ptr: int) -> None:
        self._ptr: int | None = ptr
        self.fd: int = library().cdll.bpf_link__fd(ptr)

    def close(self) -> None:
        """bpf_link__destroy, once; leaves fd at -1."""
        ptr, self._ptr, self.fd = self._ptr, None, -1
        if ptr is not None:
            library().cdll.bpf_link__destroy(ptr)


def attach_tcx(program: int, ifindex: int) -> Link:
    """Attach a loaded tcx program (a struct bpf_program pointer) to a device through a TCX BPF
    link (Linux 6.6+): ingress or egress as the program's section says ("tcx/ingress"), after
    the device's other TCX programs (no bpf_tcx_opts). NotSupported with a libbpf before 1.3."""
    lib = library()
    if lib.attach_tcx is None:
        raise NotSupported(errno.ENOSYS, f"{lib.path} has no TCX (libbpf 1.3 or later)")
    ptr = lib.attach_tcx(program, ifindex, None)
    return Link(check_ptr(ptr, f"bpf_program__attach_tcx(ifindex {ifindex})"))


def map_update(map_fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """bpf_map_update_elem with raw key and value bytes."""
    rc = library().cdll.bpf_map_update_elem(map_fd, key, value, flags)
    check(rc, "bpf_map_update_elem")


def map_delete(map_fd: int, key: bytes) -> None:
    """bpf_map_delete_elem; a missing key raises KeyError."""
    rc = library().cdll.bpf_map_delete_elem(map_fd, key)
    if rc == -errno.ENOENT:
        raise KeyError(key)
    check(rc, "bpf_map_delete_elem")


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes:
    """bpf_map_lookup_elem into a buffer of value_size bytes; a miss raises KeyError."""
    buf = ctypes.create_string_buffer(value_size)
    rc = library().cdll.bpf_map_lookup_elem(map_fd, key, buf)
    if rc == -errno.ENOENT:
        raise KeyError(key)
    check(rc, "bpf_map_lookup_elem")
    return buf.raw


def map_keys(map_fd: int, key_size: int, limit: int | None = None) -> list[bytes]:
    """The keys of a map (at most limit), by bpf_map_get_next_key; entries may come and go."""
    keys: list[bytes] = []
    prev: Any = None
    nxt = ctypes.create_string_buffer(key_size)
    while limit is None or len(keys) < limit:
        rc = library().cdll.bpf_map_get_next_key(map_fd, prev, nxt)
        if rc == -errno.ENOENT:
            return keys
        check(rc, "bpf_map_get_next_key")
        keys.append(nxt.raw)
        prev = ctypes.create_string_buffer(nxt.raw, key_size)
    return keys


def percpu_totals(map_fd: int, record: struct.Struct, ncpus: int) -> list[int]:
    """Slot 0 of a PERCPU_ARRAY whose value is a record of __u64 counters, each summed over
    every CPU (the map's value is one record per possible CPU)."""
    raw = map_lookup(map_fd, struct.pack("=I", 0), record.size * ncpus)
    return [sum(column) for column in zip(*record.iter_unpack(raw), strict=True)]


def possible_cpus() -> int:
    """Number of possible CPUs: the stride of per-CPU map values."""
    return check(library().cdll.libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


def enable_stats() -> FdHolder:
    """Turn on run_cnt / run_time_ns accounting for as long as the returned fd stays open."""
    fd = check(library().cdll.bpf_enable_stats(BPF_STATS_RUN_TIME), "bpf_enable_stats")
    return FdHolder(fd)
