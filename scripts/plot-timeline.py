#!/usr/bin/env python3
"""Draws a loadgen report's timeline (`loadgen --timeline-s N --report R.json`) as an SVG:
acknowledged rate, end-to-end latency (p50 and p99, telemetry and delivery events) and the
resident memory of the server and of loadgen over the run, one panel each.

    python3 scripts/plot-timeline.py soak.json soak.svg

Standard library only, so it runs wherever loadgen does.
"""

import json
import math
import sys

W, PANEL_H, LEFT, RIGHT, TOP, GAP = 960, 210, 80, 150, 40, 50


def panel(out, y0, title, xs, series, x_max, log=False, unit=""):
    """One panel at height y0: series is [(label, colour, [y or None])]."""
    values = [v for _, _, ys in series for v in ys if v is not None and v > 0]
    if not values:
        return
    lo, hi = (min(values), max(values))
    if log:
        lo, hi = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
    else:
        lo, hi = 0.0, hi * 1.1
    plot_w, plot_h = W - LEFT - RIGHT, PANEL_H - 40

    def sx(x):
        return LEFT + plot_w * x / x_max

    def sy(y):
        if log:
            f = (math.log10(y) - math.log10(lo)) / max(1e-9, math.log10(hi) - math.log10(lo))
        else:
            f = (y - lo) / max(1e-9, hi - lo)
        return y0 + plot_h - plot_h * f

    out.append(f'<text x="{LEFT}" y="{y0 - 8}" font-size="13" font-weight="bold">{title}</text>')
    out.append(f'<rect x="{LEFT}" y="{y0}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    ticks = []
    if log:
        t = lo
        while t <= hi * 1.0001:
            ticks.append(t)
            t *= 10
    else:
        step = 10 ** math.floor(math.log10(hi / 4)) if hi > 0 else 1
        for m in (1, 2, 5, 10):
            if hi / (step * m) <= 6:
                step *= m
                break
        t = 0.0
        while t <= hi:
            ticks.append(t)
            t += step
    for t in ticks:
        y = sy(t) if (t > 0 or not log) else None
        if y is None:
            continue
        label = (f"{t:,.0f}" if t >= 1 and t == int(t) else f"{t:g}") + unit
        out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{label}</text>')
    for i, (label, colour, ys) in enumerate(series):
        points = [(sx(x), sy(y)) for x, y in zip(xs, ys) if y is not None and y > 0]
        if points:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        ly = y0 + 14 + 16 * i
        out.append(f'<line x1="{W - RIGHT + 10}" x2="{W - RIGHT + 30}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{W - RIGHT + 34}" y="{ly}" font-size="11">{label}</text>')
    for m in range(0, int(x_max) + 1, max(1, int(x_max / 12) // 60 * 60 or 60)):
        out.append(f'<text x="{sx(m):.1f}" y="{y0 + plot_h + 14}" font-size="11" text-anchor="middle">{m / 60:g}</text>')


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: plot-timeline.py REPORT.json OUT.svg")
    with open(sys.argv[1]) as f:
        report = json.load(f)
    slices = report.get("timeline") or []
    # Stretches after sending ended (only the drain; older loadgen builds kept them) are left out.
    while slices and slices[-1]["acked_eps"] == 0:
        slices.pop()
    if not slices:
        sys.exit(f"{sys.argv[1]} has no timeline: run loadgen with --timeline-s")
    xs = [s["end_s"] for s in slices]
    x_max = max(xs)
    ms = lambda key, q: [s[key][q] / 1000 if s[key]["count"] else None for s in slices]
    mib = lambda key: [s[key] / 1048576 if s.get(key) else None for s in slices]
    out = []
    title = (
        f"fleetstream over {x_max / 60:.0f} min: {report['drones']} drones, {report['connections']} connections, "
        f"{report['target_eps']:,.0f} events/s offered (x axis: minutes)"
    )
    out.append(f'<text x="{W / 2}" y="20" font-size="14" text-anchor="middle">{title}</text>')
    y = TOP + 10
    panel(out, y, "acknowledged events/s", xs, [("acked", "#1f77b4", [s["acked_eps"] for s in slices])], x_max)
    y += PANEL_H + GAP
    panel(
        out,
        y,
        "end-to-end latency (log scale)",
        xs,
        [
            ("telemetry p50", "#2ca02c", ms("telemetry_us", "p50")),
            ("telemetry p99", "#98df8a", ms("telemetry_us", "p99")),
            ("telemetry max", "#dddddd", ms("telemetry_us", "max")),
            ("delivery p50", "#d62728", ms("delivery_us", "p50")),
            ("delivery p99", "#ff9896", ms("delivery_us", "p99")),
        ],
        x_max,
        log=True,
        unit=" ms",
    )
    y += PANEL_H + GAP
    panel(
        out,
        y,
        "resident memory",
        xs,
        [("server", "#9467bd", mib("server_rss_bytes")), ("loadgen", "#8c564b", mib("loadgen_rss_bytes"))],
        x_max,
        unit=" MiB",
    )
    height = y + PANEL_H + 10
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif">'
        f'<rect width="100%" height="100%" fill="white"/>' + "".join(out) + "</svg>\n"
    )
    with open(sys.argv[2], "w") as f:
        f.write(svg)
    print(f"{sys.argv[2]}: {len(slices)} stretches over {x_max:.0f} s")


if __name__ == "__main__":
    main()
