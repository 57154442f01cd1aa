"""What `echoctl compare` shows: the path table, the size sweep table and the `--plot` figure;
for TCP's paths or, with --udp, UDP's (the same rows, in datagrams, and the datagram counts)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from echoctl.bench.report import plural
from echoctl.bench.sizes import size_label
from echoctl.comparefigures import ROWS


def _fmt(value: float | None, key: str) -> str:
    if value is None:
        return "-"
    if key == "qps":
        return f"{value:,.0f}"
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:,.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def _udp(result: dict[str, Any]) -> bool:
    return result.get("protocol") == "udp"


def _words(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Return the words of the row labels to change: what one request is here."""
    pattern = result["load"]["pattern"]
    if _udp(result):
        words = [("req/s", "datagrams/s"), ("per request", "per datagram")]
        # A flood's latency is mostly the wait behind the window: call it what it is.
        return words + [("latency", "round trip")] if pattern == "flood" else words
    if pattern == "crr":  # one request per connection
        return [("req/s", "conn/s"), ("per request", "per connection")]
    return []


def _counts(result: dict[str, Any]) -> list[tuple[str, Callable[[dict[str, Any]], str]]]:
    """Return the rows of counts summed over the runs: (label, cell of one summary)."""
    if not _udp(result):
        return [("errors / mismatches", lambda s: f"{s['errors']} / {s['mismatches']}")]
    return [
        ("lost / late", lambda s: f"{s['lost']:,} / {s['late']:,}"),
        (
            "errors / mismatches / duplicates",
            lambda s: f"{s['errors']} / {s['mismatches']} / {s['duplicates']}",
        ),
        ("echoed (bench)", lambda s: f"{s['datagrams_echoed']:,}"),
        ("echoed by user path (daemon)", lambda s: _total(s["daemon_echoed_user"])),
        ("echoed by kernel path (daemon)", lambda s: _total(s["daemon_echoed_kernel"])),
    ]


def _total(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _title(result: dict[str, Any]) -> str:
    load = result["load"]
    length = f"{load['duration_s']:g} s" if load["duration_s"] else f"{load['rounds']} rounds"
    shape = f"{plural(load['connections'], 'connection')} x {load['size']} B {load['pattern']}"
    if _udp(result):
        shape = f"UDP, {plural(load['connections'], 'flow')} x {load['size']} B "
        shape += {
            "flood": f"flood ({load['window']} in flight per flow)",
            "rate": f"rate {load['qps']:,.0f} datagrams/s",
        }.get(load["pattern"], load["pattern"])
    counts = "; counts: totals" if _udp(result) else ""
    return f"{shape}, {length} per run, median of {result['repeat']} (paths alternated{counts})"


def render_table(result: dict[str, Any]) -> str:
    """Return the path comparison as an aligned text table."""
    modes = result["modes"]
    header = ["", *modes] + [f"{m} vs {modes[0]}" for m in modes[1:]]
    rows = [header]
    words = _words(result)
    for key, label, _ in ROWS:
        for old, new in words:
            label = label.replace(old, new)
        row = [label] + [_fmt(result["summary"][m][key], key) for m in modes]
        row += [_pct(result["change_pct"][m][key]) for m in modes[1:]]
        rows.append(row)
    for label, cell in _counts(result):
        row = [label] + [cell(result["summary"][m]) for m in modes]
        rows.append(row + [""] * (len(modes) - 1))
    title = _title(result)
    if result.get("interrupted"):
        done = {m: sum(1 for r in result["runs"] if r["mode"] == m) for m in modes}
        runs = ", ".join(f"{m} {n}" for m, n in done.items())
        title = (
            f"INTERRUPTED by {result['interrupted']}: runs finished: {runs} of "
            f"{result['repeat']} each; the run under way is not counted\n{title}"
        )
    return title + "\n" + align(rows)


def align(rows: list[list[str]]) -> str:
    """Return rows as text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _median_cell(spread: dict[str, float] | None) -> str:
    return "-" if spread is None else f"{spread['median']:,.1f}"


def render_sweep(result: dict[str, Any]) -> str:
    """Return the size sweep (1 connection or flow) as an aligned text table."""
    sweep = result["sweep"]
    modes = result["modes"]
    proto, bulk = result.get("protocol", "tcp"), sweep.get("bulk", "stream")
    header = ["size"]
    header += [f"{proto}_lat µs {m}" for m in modes] + [f"{proto}_bw MB/s {m}" for m in modes]
    rows = [header]
    for size in sweep["sizes"]:
        cells = [sweep["modes"][m][str(size)] for m in modes]
        row = [size_label(size)]
        row += [_median_cell(c["p50_us"]) for c in cells]
        row += [_median_cell(c["mb_per_s"]) for c in cells]
        rows.append(row)
    title = (
        f"size sweep, 1 {'flow' if proto == 'udp' else 'connection'}, {sweep['duration_s']:g} s "
        f"per point: {proto}_lat is the ping-pong p50 latency, {proto}_bw the {bulk} bandwidth "
        f"received, median of {result['repeat']}"
    )
    return title + "\n" + align(rows)


def draw(result: dict[str, Any]) -> Any:
    """Return the figure: p50 latency and stream bandwidth per mode, with min-max bars.

    Sizes and bandwidth span several powers of two, so both use log scales (on a linear scale
    1-256 B sit flat at zero); latency starts at 0 so that the gap between modes is honest.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede the pyplot import
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    sweep = result["sweep"]
    sizes = sweep["sizes"]
    bulk = sweep.get("bulk", "stream")
    one = "1 flow" if _udp(result) else "1 connection"
    fig, (ax_lat, ax_bw) = plt.subplots(1, 2, figsize=(11, 4.4))
    for mode in result["modes"]:
        cells = [sweep["modes"][mode][str(s)] for s in sizes]
        for ax, key in ((ax_lat, "p50_us"), (ax_bw, "mb_per_s")):
            med = [c[key]["median"] for c in cells]
            low = [c[key]["median"] - c[key]["min"] for c in cells]
            high = [c[key]["max"] - c[key]["median"] for c in cells]
            ax.errorbar(sizes, med, yerr=[low, high], marker="o", capsize=3, label=mode)
    for ax in (ax_lat, ax_bw):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: size_label(int(round(x)))))
        ax.tick_params(axis="x", labelrotation=45)
        ax.set_xlabel("message size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax_lat.set_ylim(bottom=0)
    ax_lat.set_ylabel("ping-pong p50 latency (µs)")
    ax_lat.set_title(f"latency, {one} (lower is better)")
    ax_bw.set_yscale("log")
    ax_bw.set_ylabel(f"{bulk} bandwidth received (MB/s, log scale)")
    ax_bw.set_title(f"bandwidth, {one} (higher is better)")
    machine = result["machine"]
    what = "echod UDP paths" if _udp(result) else "echod paths"
    fig.suptitle(
        f"{what}, Linux {machine['kernel']}, {machine['cpus']} CPUs; "
        f"bars: min-max of {result['repeat']}"
    )
    fig.tight_layout()
    return fig


def plot(result: dict[str, Any], path: str) -> None:
    """Draw the sweep to the PNG file `path`."""
    import matplotlib.pyplot as plt

    fig = draw(result)
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
