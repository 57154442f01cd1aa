"""What `echoctl compare` shows: the mode table, the size sweep table and the `--plot` figure."""

from __future__ import annotations

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


def render_table(result: dict[str, Any]) -> str:
    """Return the mode comparison as an aligned text table."""
    modes = result["modes"]
    header = ["", *modes] + [f"{m} vs {modes[0]}" for m in modes[1:]]
    rows = [header]
    churn = result["load"]["pattern"] == "crr"
    for key, label, _ in ROWS:
        if churn:  # one request per connection
            label = label.replace("req/s", "conn/s").replace("per request", "per connection")
        row = [label] + [_fmt(result["summary"][m][key], key) for m in modes]
        row += [_pct(result["change_pct"][m][key]) for m in modes[1:]]
        rows.append(row)
    rows.append(
        ["errors / mismatches"]
        + [
            f"{result['summary'][m]['errors']} / {result['summary'][m]['mismatches']}"
            for m in modes
        ]
        + [""] * (len(modes) - 1)
    )
    load = result["load"]
    length = f"{load['duration_s']:g} s" if load["duration_s"] else f"{load['rounds']} rounds"
    title = (
        f"{plural(load['connections'], 'connection')} x {load['size']} B {load['pattern']}, "
        f"{length} per "
        f"run, median of {result['repeat']} (paths alternated)"
    )
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
    """Return the size sweep (1 connection) as an aligned text table."""
    sweep = result["sweep"]
    modes = result["modes"]
    header = ["size"]
    header += [f"tcp_lat µs {m}" for m in modes] + [f"tcp_bw MB/s {m}" for m in modes]
    rows = [header]
    for size in sweep["sizes"]:
        cells = [sweep["modes"][m][str(size)] for m in modes]
        row = [size_label(size)]
        row += [_median_cell(c["p50_us"]) for c in cells]
        row += [_median_cell(c["mb_per_s"]) for c in cells]
        rows.append(row)
    title = (
        f"size sweep, 1 connection, {sweep['duration_s']:g} s per point: tcp_lat is the "
        f"ping-pong p50 latency, tcp_bw the stream bandwidth received, median of "
        f"{result['repeat']}"
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
    ax_lat.set_title("latency, 1 connection (lower is better)")
    ax_bw.set_yscale("log")
    ax_bw.set_ylabel("stream bandwidth received (MB/s, log scale)")
    ax_bw.set_title("bandwidth, 1 connection (higher is better)")
    machine = result["machine"]
    fig.suptitle(
        f"echod paths, Linux {machine['kernel']}, {machine['cpus']} CPUs; "
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
