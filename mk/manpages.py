"""Write the man pages of echod(8) and echoctl(1) from their click commands, with click-man.

    .venv/bin/python mk/manpages.py man      # what `make man` runs

One page per command: echod.8, echoctl.1 and echoctl-COMMAND.1 for each subcommand (the
pages click-man's COMMANDS sections point to). The pages are committed; a test regenerates
them and fails when they differ, so a changed option or help text shows up as a diff. The
header carries the version, not a date, so the same commands always give the same bytes.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import click
from click_man.core import generate_man_page

from echoctl.cli import cli as echoctl_cli
from echod.__main__ import cli as echod_cli

# (program, section, command): echod is a daemon (8), echoctl a user command (1).
PROGRAMS = (("echod", "8", echod_cli), ("echoctl", "1", echoctl_cli))
COMPLETION = r""".SH SHELL COMPLETION
\fBmake install\fP installs bash completion for echoctl. Elsewhere, add this to ~/.bashrc:
.PP
    eval "$(_ECHOCTL_COMPLETE=bash_source echoctl)"
.PP
(zsh_source and fish_source give the same for zsh and fish).
"""
SEE_ALSO = r""".SH SEE ALSO
\fBechod\fP(8), \fBechoctl\fP(1); docs/operations.md (installed as
/opt/echod/share/doc/echod/operations.md), docs/protocol.md and docs/benchmarks.md in the
source tree.
"""


def pages() -> Iterator[tuple[str, str]]:
    """Yield (file name, page text) for every command and subcommand."""
    release = f"echod {version('echod')}"
    for name, section, command in PROGRAMS:
        yield from _pages(name, section, command, None, release)


def _pages(
    name: str, section: str, command: click.Command, parent: click.Context | None, release: str
) -> Iterator[tuple[str, str]]:
    ctx = click.Context(command, info_name=name, parent=parent)
    with warnings.catch_warnings():
        # click-man 0.6 calls a click helper that click 8.2 deprecates; the NAME line it makes
        # is replaced below anyway.
        warnings.filterwarnings("ignore", "'click.utils.make_default_short_help'")
        text = generate_man_page(ctx, version=release)
    title = ctx.command_path.replace(" ", "-")
    lines = text.splitlines(keepends=True)
    # click-man writes section 1 and today's date; the header here is stable.
    lines[0] = f'.TH "{title.upper()}" "{section}" "" "{release}" "echod Manual"\n'
    # ... and cuts the NAME line at 45 characters: give the whole first sentence.
    short = command.short_help or " ".join((command.help or "").split("\n\n")[0].split())
    lines[2] = f"{title.replace('-', chr(92) + '-')} \\- {short}\n"
    extra = COMPLETION if ctx.command_path == "echoctl" else ""
    yield f"{title}.{section}", "".join(lines) + extra + SEE_ALSO
    for sub_name, sub in sorted(getattr(command, "commands", {}).items()):
        if not sub.hidden:
            yield from _pages(sub_name, section, sub, ctx, release)


def main(argv: list[str]) -> int:
    """Write every page into the directory argv[0]; remove pages of commands that are gone."""
    if len(argv) != 1:
        print("usage: python mk/manpages.py DIR", file=sys.stderr)
        return 2
    target = Path(argv[0])
    target.mkdir(parents=True, exist_ok=True)
    written = set()
    for file_name, text in pages():
        (target / file_name).write_text(text)
        written.add(file_name)
    for old in target.glob("*.[18]"):
        if old.name not in written:
            old.unlink()
    print(f"{len(written)} man pages in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
