"""The self-check: before a path serves its first client, prove it on the running kernel.

Sockmap behaviour differs between kernel builds: a redirect into a socket not yet accepted,
data queued before the insert, FIN handling, FIONREAD. A path is trusted only once a private
listener (127.0.0.1, an ephemeral port, reachable through no map of the serving port) has
echoed each case (echod.service.probe) exactly, on the path's own machinery: a private Service
in the path's mode, on the BPF maps and the bypass the daemon would serve with.

UDP's kernel path is checked by echod.kernel.udpcheck's cases, on a private copy of its
program attached to lo for the time of the check (`check_udp`): a copy that serves is not
touched, and nothing of the check's copy outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import time

import structlog

from echod.config.schema import Config
from echod.kernel import udpcheck
from echod.kernel.bypass import Bypass, in_cgroup
from echod.kernel.echo import KernelEcho, SocketMaps
from echod.kernel.errors import NotSupported
from echod.service.paths import Outcome, UdpOutcome, path_name
from echod.service.probe import CASE_TIMEOUT, HOST, CaseFailed, Probe, cases_for
from echod.service.service import Service
from echod.service.udp import kernel_module, numeric_hosts

log = structlog.get_logger("echod.selfcheck")


class CheckService(Service):
    """A private Service on 127.0.0.1:0 that borrows the daemon's maps and bypass storage."""

    def __init__(self, config: Config, maps: SocketMaps | None, paths_fd: int | None) -> None:
        super().__init__(config)
        self.log = log.bind(private=True)
        self.log.info = self.log.debug  # its start and stop are the check's, logged once there
        self._borrowed = maps
        if paths_fd is not None:
            self.bypass_readers.add(os.dup(paths_fd))

    def _load_kernel(self) -> None:
        if self.maps is None:
            if self._borrowed is None:
                raise OSError(errno.ENOENT, "no BPF maps to check the kernel path with")
            self.maps = self._borrowed  # borrowed: not entered in self._bpf, never closed here

    @property
    def port(self) -> int:
        """The ephemeral port the private listener got."""
        return int(self.acceptor.listeners[0].getsockname()[1])


# -- running a path ---------------------------------------------------------------------------


def _private_config(config: Config, mode: str) -> Config:
    return config.replace(
        hosts=[HOST],
        port=0,
        mode=mode,
        bypass=False,
        udp=False,
        workers=1,
        max_connections=64,
        max_connections_per_ip=0,
        allow=[],
        shutdown_grace=0.2,
    )


async def check_path(
    config: Config, mode: str, bypass: Bypass | None, kernel: KernelEcho | None
) -> Outcome:
    """Run the path's cases on a private listener; the first case that fails ends the check.

    `kernel` (kernel paths) and `bypass` (bypass paths) are the loaded objects to check: the
    ones the daemon serves with. Nothing is left behind: the private listener is closed, its
    address unwatched, its connections gone.
    """
    name = path_name(mode, bypass is not None)
    started = time.perf_counter()
    outcome = Outcome(name, "passed")
    cases = cases_for(mode, bypass is not None)
    if bypass is not None and not in_cgroup(bypass.cgroup or ""):
        # The cgroup's programs never see echod's own sockets: nothing here can prove the path.
        outcome.result = "not_run"
        outcome.detail = f"echod runs outside the bypass cgroup {bypass.cgroup}"
        outcome.cases = {n: "not_run" for n, _ in cases}
        return outcome
    maps = kernel.maps if kernel is not None else None
    service = CheckService(
        _private_config(config, mode), maps, bypass.paths_fd if bypass is not None else None
    )
    endpoint: list[tuple[str, int]] = []
    early: socket.socket | None = None
    try:
        await service.start()
        probe = Probe(service, bypass, mode)
        if bypass is not None:
            early = await probe.connect()  # before the private listener is watched
            await probe.roundtrip(early, os.urandom(100))
            endpoint = [(HOST, service.port)]
            bypass.watch(endpoint, mode)
        for case, run in cases:
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(CASE_TIMEOUT):
                    await run(probe)
                log.debug(
                    "selfcheck.case",
                    path=name,
                    case=case,
                    ms=round((time.perf_counter() - t0) * 1000, 1),
                )
            except (CaseFailed, TimeoutError) as exc:
                detail = str(exc) if isinstance(exc, CaseFailed) else "no echo within 2 s"
                outcome.result, outcome.case, outcome.detail = "failed", case, detail
                outcome.cases[case] = "failed"
                break
            outcome.cases[case] = "passed"
        if early is not None and outcome.result == "passed":
            outcome.cases["pre_attach"] = "failed"
            try:
                async with asyncio.timeout(CASE_TIMEOUT):
                    await probe.roundtrip(early, os.urandom(100))
                if probe.in_bypass_map(early):
                    raise CaseFailed("it entered the bypass map")
                outcome.cases["pre_attach"] = "passed"
            except (CaseFailed, TimeoutError) as exc:
                detail = str(exc) if isinstance(exc, CaseFailed) else "no echo within 2 s"
                outcome.result, outcome.case, outcome.detail = "failed", "pre_attach", detail
    except OSError as exc:  # the private listener could not be had
        outcome.result, outcome.detail = "failed", f"self-check listener: {exc}"
    finally:
        if early is not None:
            early.close()
        if bypass is not None and endpoint:
            bypass.unfollow(endpoint)
        with contextlib.suppress(Exception):
            if service.state != "stopped":
                await service.stop(grace=0.2)
        service.close()
    for case, _ in cases:
        outcome.cases.setdefault(case, "not_run")
    if bypass is not None:
        outcome.cases.setdefault("pre_attach", "not_run")
    outcome.ms = (time.perf_counter() - started) * 1000
    log.info(
        "selfcheck.done",
        path=name,
        result=outcome.result,
        case=outcome.case,
        detail=outcome.detail,
        ms=round(outcome.ms, 1),
    )
    return outcome


def _error_text(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return f"{exc.filename}: {text}" if exc.filename else text


def _unavailable(name: str, what: str, exc: OSError) -> Outcome:
    return Outcome(name, "failed", detail=f"{what} unavailable: {_error_text(exc)}")


def check_udp(config: Config) -> UdpOutcome:
    """The UDP kernel path's cases on a private copy of its program, attached to lo and
    detached and freed after (blocking: up to a TIMEOUT when a datagram goes unanswered).

    Failed, with the reason, when the program cannot be loaded or attached (no TCX, say); not
    run when this build has no UDP kernel path.
    """
    started = time.perf_counter()
    hosts = udpcheck.check_targets(numeric_hosts(config))
    outcome = UdpOutcome("passed", cases=udpcheck.planned(hosts))
    try:
        module = kernel_module()
    except NotSupported as exc:
        outcome.result, outcome.reason = "not_run", f"UDP kernel path: {_error_text(exc)}"
        return _udp_done(outcome, started)
    try:
        with module.UdpKernelEcho(config.udp_object, private=True) as echo:
            for ifindex in module.devices_for(hosts):
                echo.attach(ifindex)  # not configured yet: it passes every datagram on
            result = udpcheck.check(echo, hosts)
    except OSError as exc:
        outcome.result = "failed"
        outcome.reason = f"UDP kernel path unavailable: {_error_text(exc)}"
        return _udp_done(outcome, started)
    outcome.cases = result.cases
    if result.failed is not None:
        outcome.result, outcome.reason = "failed", result.failed
    return _udp_done(outcome, started)


def _udp_done(outcome: UdpOutcome, started: float) -> UdpOutcome:
    outcome.ms = (time.perf_counter() - started) * 1000
    log.info(
        "selfcheck.done",
        path="udp",
        result=outcome.result,
        detail=outcome.reason,
        ms=round(outcome.ms, 1),
    )
    return outcome


class SelfCheck:
    """What the daemon's service runs before a path serves (paths.Checker)."""

    async def path(
        self, config: Config, mode: str, bypass: Bypass | None, kernel: KernelEcho | None
    ) -> Outcome:
        """Check one path on the objects the daemon would serve it with."""
        return await check_path(config, mode, bypass, kernel)

    async def every_path(
        self, config: Config, kernel: KernelEcho | None, bypass: Bypass | None
    ) -> dict[str, Outcome]:
        """All four paths: what is not loaded is loaded for the time of the check."""
        out: dict[str, Outcome] = {"user": await check_path(config, "user", None, None)}
        with contextlib.ExitStack() as stack:
            bypass_error = kernel_error = None
            if bypass is None:
                try:
                    bypass = stack.enter_context(Bypass(config.bypass_cgroup, config.bypass_object))
                except OSError as exc:
                    bypass_error = exc
            if kernel is None:
                try:
                    kernel = stack.enter_context(KernelEcho(config.bpf_object))
                except OSError as exc:
                    kernel_error = exc
            for mode, with_bypass in (("user", True), ("kernel", False), ("kernel", True)):
                name = path_name(mode, with_bypass)
                if with_bypass and bypass_error is not None:
                    out[name] = _unavailable(name, "the bypass", bypass_error)
                elif mode == "kernel" and kernel_error is not None:
                    out[name] = _unavailable(name, "kernel mode", kernel_error)
                else:
                    out[name] = await check_path(
                        config, mode, bypass if with_bypass else None, kernel
                    )
        return out

    async def udp(self, config: Config) -> UdpOutcome:
        """The UDP kernel path, on a private copy on lo; off the loop, which serves on."""
        return await asyncio.to_thread(check_udp, config)
