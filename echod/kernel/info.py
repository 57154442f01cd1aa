"""What the kernel says about a loaded program, map or link (bpf_obj_get_info_by_fd): ids,
names, sizes and run-time figures, for `status`, `stats` and the logs, and a map's id and size
where the daemon needs them. Owns the ctypes mirrors of struct bpf_prog_info, bpf_map_info and
bpf_link_info.
"""

from __future__ import annotations

import ctypes
from typing import Any

from echod.kernel import libbpf


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


def _info(fd: int, struct: type[ctypes.Structure], what: str) -> Any:
    info = struct()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    get_info = libbpf.library().cdll.bpf_obj_get_info_by_fd
    libbpf.check(get_info(fd, ctypes.byref(info), ctypes.byref(size)), what)
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
