"""A BPF ELF object from file to kernel: BpfObject opens and loads it and finds its programs and
maps; LoadedObject, the base of KernelEcho and Bypass, runs open → load → attach as a context
manager whose failure or close undoes exactly the steps done.
"""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path
from typing import Self

from echod.kernel import libbpf


class BpfObject:
    """An opened (and later loaded) BPF ELF object; close() frees its programs and maps."""

    def __init__(self, path: str) -> None:
        self.lib = libbpf.library()
        self.path = path
        self._ptr: int | None = libbpf.check_ptr(
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
        libbpf.check(self.lib.cdll.bpf_object__load(self.ptr), f"bpf_object__load({self.path})")

    def program_fd(self, name: str) -> int:
        """The fd of a loaded program (owned by this object)."""
        prog = libbpf.check_ptr(
            self.lib.cdll.bpf_object__find_program_by_name(self.ptr, name.encode()),
            f"bpf_object__find_program_by_name({name})",
        )
        return libbpf.check(self.lib.cdll.bpf_program__fd(prog), f"bpf_program__fd({name})")

    def map_fd(self, name: str) -> int:
        """The fd of a created map (owned by this object)."""
        return libbpf.check(
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
