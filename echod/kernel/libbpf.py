"""ctypes bindings for the few libbpf calls echod uses, and the raw memory access a BPF ring
buffer needs (shared mappings, acquire loads, release stores); the only module that imports
ctypes or mmap.

Conventions (libbpf 1.x): a negative return is -errno and becomes OSError(errno, strerror,
call name); a NULL pointer reads errno. Errnos that mean "this kernel cannot do it" become
NotSupported so callers can branch on the type. libbpf's own codes (4000 and up) are described
with libbpf's words, not "Unknown error 4001".
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import importlib.util
import mmap
import os
import platform
import struct
from pathlib import Path
from typing import Any, Self

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

# GCC's __atomic memory orders (the C11 ones).
_ACQUIRE = 2
_RELEASE = 3

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


def _candidates() -> list[str]:
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


class _ProgInfo(ctypes.Structure):
    """Mirrors struct bpf_prog_info (uapi/linux/bpf.h) up to attach_btf_id."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64),
        ("verified_insns", ctypes.c_uint32),
        ("attach_btf_obj_id", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
    ]


class _LinkInfo(ctypes.Structure):
    """Mirrors the head of struct bpf_link_info: type, id, prog_id."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("_union", ctypes.c_uint64 * 8),  # the per-type part, which the kernel fills
    ]


class _MapInfo(ctypes.Structure):
    """Mirrors the head of struct bpf_map_info (the kernel accepts a shorter info_len)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_LEVELS = ("warning", "info", "debug")


class Library:
    """The loaded libbpf shared object with typed prototypes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.cdll = ctypes.CDLL(path, use_errno=True)
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
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
        # Optional: Debian's libbpf exports it, the wheel's static build does not.
        self._strerror = getattr(c, "libbpf_strerror", None)
        if self._strerror is not None:
            self._strerror.restype = i
            self._strerror.argtypes = [i, ctypes.c_char_p, ctypes.c_size_t]
        self._libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, cp, vp]
        self._libc.vsnprintf.restype = i
        self._libc.mmap.argtypes = [vp, ctypes.c_size_t, i, i, i, ctypes.c_long]
        self._libc.mmap.restype = vp
        self._libc.munmap.argtypes = [vp, ctypes.c_size_t]
        self._libc.munmap.restype = i

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
        self._libc.vsnprintf(buf, len(buf), fmt, args)
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
        for path in _candidates():
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


def _error(rc: int, what: str) -> OSError:
    code = -rc if rc < 0 else ctypes.get_errno()
    cls = NotSupported if code in _UNSUPPORTED else OSError
    return cls(code, strerror(code), what)


def check(rc: int, what: str) -> int:
    """Return rc, or raise the OSError (or NotSupported) that a negative rc encodes."""
    if rc < 0:
        raise _error(rc, what)
    return rc


def check_ptr(ptr: int | None, what: str) -> int:
    """Return a non-NULL pointer, or raise from errno."""
    if not ptr:
        raise _error(0, what)
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


class BpfObject:
    """An opened (and later loaded) BPF ELF object; close() frees its programs and maps."""

    def __init__(self, path: str) -> None:
        self.lib = library()
        self.path = path
        self._ptr: int | None = check_ptr(
            self.lib.cdll.bpf_object__open_file(path.encode(), None),
            f"bpf_object__open_file({path})",
        )

    @property
    def ptr(self) -> int:
        if self._ptr is None:
            raise ValueError("BPF object is closed")
        return self._ptr

    def load(self) -> None:
        """Load every program and create every map (runs the verifier)."""
        check(self.lib.cdll.bpf_object__load(self.ptr), f"bpf_object__load({self.path})")

    def program_fd(self, name: str) -> int:
        """The fd of a loaded program (owned by this object)."""
        prog = check_ptr(
            self.lib.cdll.bpf_object__find_program_by_name(self.ptr, name.encode()),
            f"bpf_object__find_program_by_name({name})",
        )
        return check(self.lib.cdll.bpf_program__fd(prog), f"bpf_program__fd({name})")

    def map_fd(self, name: str) -> int:
        """The fd of a created map (owned by this object)."""
        return check(
            self.lib.cdll.bpf_object__find_map_fd_by_name(self.ptr, name.encode()),
            f"bpf_object__find_map_fd_by_name({name})",
        )

    def close(self) -> None:
        """Free the object, closing its program and map fds; idempotent."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            self.lib.cdll.bpf_object__close(ptr)


class LoadedObject:
    """Open → load → attach as a context manager: a failure undoes exactly the steps done.

    A subclass's `_open` calls `_load`, then pushes the undo of each further step onto
    `self._stack`; its `close` unwinds the stack once.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stack = contextlib.ExitStack()
        self._obj: BpfObject | None = None

    def __enter__(self) -> Self:
        try:
            self._open()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _load(self) -> BpfObject:
        """Open and load the object file (the verifier runs here); closed when the stack is."""
        if not Path(self.path).is_file():
            raise FileNotFoundError(errno.ENOENT, "BPF object not found", self.path)
        obj = BpfObject(self.path)
        self._obj = obj
        self._stack.callback(obj.close)
        obj.load()
        return obj


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


def _info(fd: int, struct: type[ctypes.Structure], what: str) -> Any:
    info = struct()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check(library().cdll.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), what)
    return info


def prog_info(prog_fd: int) -> dict[str, Any]:
    """id, name, run_cnt and run_time_ns of a loaded program."""
    info = _info(prog_fd, _ProgInfo, "bpf_obj_get_info_by_fd(prog)")
    return {
        "id": int(info.id),
        "name": info.name.decode(errors="replace"),
        "run_cnt": int(info.run_cnt),
        "run_time_ns": int(info.run_time_ns),
    }


def program_figures(prog_fd: int, kind: str) -> dict[str, Any]:
    """prog_info with the program's type (`stats`' name for it) and ns_per_run added."""
    info = prog_info(prog_fd)
    info["type"] = kind
    info["ns_per_run"] = info["run_time_ns"] / info["run_cnt"] if info["run_cnt"] else None
    return info


def map_info(map_fd: int) -> dict[str, Any]:
    """id, name and max_entries of a map."""
    info = _info(map_fd, _MapInfo, "bpf_obj_get_info_by_fd(map)")
    return {
        "id": int(info.id),
        "name": info.name.decode(errors="replace"),
        "max_entries": int(info.max_entries),
    }


def link_info(link_fd: int) -> dict[str, int]:
    """id and prog_id of a BPF link (what `bpftool link show` lists)."""
    info = _info(link_fd, _LinkInfo, "bpf_obj_get_info_by_fd(link)")
    return {"id": int(info.id), "prog_id": int(info.prog_id), "type": int(info.type)}


class Atomics:
    """Acquire loads and release stores of aligned words at raw addresses (a ring's positions).

    With libatomic (GCC's runtime library), each is __atomic_load_N or __atomic_store_N with
    that memory order: what libbpf's C compiles to (LDAR/STLR on arm64, plain MOVs on x86-64).
    Without it (`plain`), ordinary accesses: right on x86-64 alone, where (TSO) every aligned
    load is an acquire and every store a release, and each access is a separate step of the
    interpreter, which no compiler moves past another. atomics() picks.
    """

    def __init__(self, lib: ctypes.CDLL | None) -> None:
        self.name = "plain" if lib is None else "libatomic"
        self._load4: Any = None
        self._load8: Any = None
        self._store8: Any = None
        if lib is not None:  # getattr: inside a class, "__atomic..." would be name-mangled
            u32, u64, vp, i = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int
            self._load4 = _declare(getattr(lib, "__atomic_load_4"), u32, [vp, i])
            self._load8 = _declare(getattr(lib, "__atomic_load_8"), u64, [vp, i])
            self._store8 = _declare(getattr(lib, "__atomic_store_8"), None, [vp, u64, i])

    def load_acquire_u32(self, addr: int) -> int:
        if self._load4 is None:
            return int(ctypes.c_uint32.from_address(addr).value)
        return int(self._load4(addr, _ACQUIRE))

    def load_acquire_u64(self, addr: int) -> int:
        if self._load8 is None:
            return int(ctypes.c_uint64.from_address(addr).value)
        return int(self._load8(addr, _ACQUIRE))

    def store_release_u64(self, addr: int, value: int) -> None:
        if self._store8 is None:
            ctypes.c_uint64.from_address(addr).value = value
        else:
            self._store8(addr, value, _RELEASE)


def _declare(fn: Any, restype: Any, argtypes: list[Any]) -> Any:
    fn.restype, fn.argtypes = restype, argtypes
    return fn


_atomics: Atomics | None = None


def atomics() -> Atomics:
    """libatomic's when it loads; else plain accesses, on x86-64 only (NotSupported elsewhere)."""
    global _atomics
    if _atomics is None:
        try:
            _atomics = Atomics(ctypes.CDLL(ctypes.util.find_library("atomic") or "libatomic.so.1"))
        except (OSError, AttributeError) as exc:
            if platform.machine() != "x86_64":
                raise NotSupported(errno.ENOENT, f"no libatomic for acquire loads: {exc}") from exc
            _atomics = Atomics(None)
    return _atomics


def read_memory(addr: int, length: int) -> bytes:
    """A copy of length bytes at addr (plain loads: order them with Atomics around the call)."""
    return ctypes.string_at(addr, length)


class Mapping:
    """Pages of an fd mapped shared (MAP_SHARED); close() unmaps them once, idempotently.

    `addr` is the raw address, for Atomics and read_memory: a BPF ring buffer's producer and
    data pages may only be mapped read-only, which Python's mmap cannot give an address of.
    """

    def __init__(self, fd: int, length: int, offset: int = 0, *, writable: bool = False) -> None:
        """Maps length bytes of fd from offset; fd may be closed afterwards."""
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        libc = library()._libc
        addr = libc.mmap(None, length, prot, mmap.MAP_SHARED, fd, offset)
        if not addr or addr == ctypes.c_void_p(-1).value:  # MAP_FAILED
            raise _error(0, "mmap")
        self.addr: int = addr
        self.length = length

    def close(self) -> None:
        """Unmap the pages once."""
        addr, self.addr = self.addr, 0
        if addr and library()._libc.munmap(addr, self.length) != 0:
            raise _error(0, "munmap")
