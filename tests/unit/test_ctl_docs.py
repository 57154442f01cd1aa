"""Docs that make claims about the code: the claims hold."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from echod.config.schema import SCHEMA, Config

ROOT = Path(__file__).resolve().parents[2]


def _section(doc: str, title: str) -> str:
    text = (ROOT / doc).read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{doc} has no section {title!r}"
    return match.group(1)


def test_readme_says_what_echod_does_not_do() -> None:
    """TLS is named as missing and UDP as off unless asked; the daemon has no TLS, and UDP
    echo is off by default with its only datagram listener in admission.bind_datagram."""
    section = _section("README.md", "What echod does not do")
    assert "**No UDP unless asked.**" in section
    assert "**No TLS.**" in section
    keys = {s.key for s in SCHEMA}
    assert not {k for k in keys if "tls" in k or "ssl" in k or "cert" in k}
    assert Config().udp is False
    for path in sorted((ROOT / "echod").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert "ssl" not in names, f"{path} imports ssl"
        # Datagram sockets are for netlink and sd_notify, UDP echo's one listener, and the
        # client side of the UDP kernel path's self-check (on loopback only).
        for line in path.read_text().splitlines():
            if "SOCK_DGRAM" in line:
                udp_echo = path.name == "admission.py" and "IPPROTO_UDP" in line
                udp_check = path.name == "udpcheck.py"
                assert "AF_NETLINK" in line or "AF_UNIX" in line or udp_echo or udp_check, (
                    f"{path}: {line}"
                )
    for word in ("allow", "max_connections_per_ip"):
        assert f"`{word}`" in section
        assert word in keys


def test_readme_documents_shell_completion_as_click_does_it() -> None:
    """The README's command makes a bash completion function that completes commands."""
    readme = (ROOT / "README.md").read_text()
    assert 'eval "$(_ECHOCTL_COMPLETE=bash_source echoctl)"' in readme
    echoctl = str(Path(sys.executable).parent / "echoctl")
    env = {**os.environ, "_ECHOCTL_COMPLETE": "bash_source"}
    source = subprocess.run([echoctl], capture_output=True, text=True, env=env, timeout=30)
    assert "complete -o nosort -F _echoctl_completion echoctl" in source.stdout
    env = {**os.environ, "_ECHOCTL_COMPLETE": "bash_complete"}
    env |= {"COMP_WORDS": "echoctl restart --mo", "COMP_CWORD": "2"}
    words = subprocess.run([echoctl], capture_output=True, text=True, env=env, timeout=30)
    assert words.stdout.split() == ["plain,--mode"]
