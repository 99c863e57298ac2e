"""Summaries of a run: medians with min-max, ratios to native per repetition, targets; written
as JSON, as a Markdown table inside docs/PERFORMANCE.md, and as a PNG chart."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from .workloads import BY_ID, METRICS, Metric

ORDER = ["native", "artifactfs", "bindfs", "rclone"]


def _stats(xs: list[float]) -> dict:
    return {"values": xs, "median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def summarise(values: dict[str, dict[str, list[float]]]) -> dict:
    out: dict[str, dict] = {}
    for m in METRICS:
        per_fs = values.get(m.id)
        if not per_fs:
            continue
        native = per_fs.get("native")
        entry = {}
        for fs, xs in per_fs.items():
            s = _stats(xs)
            if m.kind == "ratio" and native and fs != "native":
                # Paired: repetition i of fs over repetition i of native.
                ratios = [a / b for a, b in zip(xs, native, strict=False) if b]
                if ratios:
                    s["ratio"] = _stats(ratios)
            entry[fs] = s
        out[m.id] = entry
    for m in METRICS:
        if m.id in out and m.target:
            out[m.id]["_target"] = {"target": m.target, "met": _met(m, out[m.id])}
    return out


def _met(m: Metric, entry: dict) -> bool | None:
    a = entry.get("artifactfs")
    if a is None:
        return None
    target = m.target or ""
    if m.kind == "ratio" and target.startswith(">= ") and target[3:].replace(".", "").isdigit():
        return "ratio" in a and a["ratio"]["median"] >= float(target[3:])
    if target == ">= bindfs":
        b = entry.get("bindfs")
        return None if b is None else a["median"] >= b["median"]
    if m.kind == "self" and target.startswith(">= "):
        return a["median"] >= float(target[3:].split()[0])
    if m.kind == "abs" and target.startswith("< "):
        return a["max"] < float(target[2:])
    return None


def _fmt(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _load1(load: str) -> str:
    """The one-minute figure of a "1m 5m 15m" load average."""
    return load.split()[0] if load else "?"


def _cell(m: Metric, s: dict | None, fs: str) -> str:
    """artifactfs and native with min–max; a peer by its median (the JSON has the rest)."""
    if s is None:
        return "—"
    spread = fs in ("native", "artifactfs")
    if m.kind == "ratio" and fs != "native":
        if "ratio" not in s:
            return f"{_fmt(s['median'])} {m.unit}"
        r = s["ratio"]
        return f"{r['median']:.2f}x" + (f" ({r['min']:.2f}–{r['max']:.2f})" if spread else "")
    if m.kind == "self":
        return f"{s['median']:.2f}x" + (f" ({s['min']:.2f}–{s['max']:.2f})" if spread else "")
    return f"{_fmt(s['median'])} ({_fmt(s['min'])}–{_fmt(s['max'])}) {m.unit}"


def markdown(result: dict) -> str:
    summary = result["summary"]
    fses = [f for f in ORDER if f in result["filesystems"]]
    lines = []
    meta = result["meta"]
    lines.append(f"{meta['profile'].capitalize()} run of {meta['finished'][:10]},"
                 f" git {meta['git']}: {meta['sizes_text']}; {meta['reps']} repetitions;"
                 f" load average {_load1(meta['load_before'])} before,"
                 f" {_load1(meta['load_after'])} after."
                 " Cells: median ratio to native (min–max for artifactfs); native: median"
                 " (min–max).")
    lines.append("")
    head = ["workload", *fses, "target (artifactfs)", "met"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for m in METRICS:
        entry = summary.get(m.id)
        if entry is None:
            continue
        cells = [m.title]
        for fs in fses:
            err = result["errors"].get(m.id, {}).get(fs)
            cells.append("failed" if err and fs not in entry else _cell(m, entry.get(fs), fs))
        t = entry.get("_target")
        cells.append(t["target"] if t else "")
        cells.append({True: "yes", False: "**no**", None: ""}[t["met"]] if t else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("File systems: " + "; ".join(
        f"**{k}**: {v}" for k, v in result["filesystems"].items()) + ".")
    if result["skipped"]:
        lines.append("")
        lines.append("Skipped: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items())
                     + ".")
    notes = list(result["notes"])
    for metric, per_fs in result["errors"].items():
        for fs, msg in per_fs.items():
            notes.append(f"{fs} failed {metric}: `{msg}`")
    if notes:
        lines.append("")
        lines.extend(f"- {n}" for n in notes)
    lines.append("")
    lines.append(f"Raw numbers: `{result['json_rel']}`; chart: `{result['png_rel']}`.")
    if result["png_rel"].startswith("docs/"):
        lines.append("")
        lines.append(f"![{meta['profile']} run]({result['png_rel'][len('docs/'):]})")
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")


SECTION_TITLES = {"full": "Results: full run", "quick": "Results: quick run (`--quick`)"}


def update_performance_md(doc: Path, profile: str, body: str) -> None:
    """Replace only this profile's generated block; everything else in the file is kept.

    A document without the block gets it as a section of its own, ahead of the first section
    that is not a result (results come first, the full run before the quick one).
    """
    begin, end = f"<!-- bench:{profile}:begin -->", f"<!-- bench:{profile}:end -->"
    block = (f"{begin}\n<!-- written by scripts/bench{' --quick' if profile == 'quick' else ''};"
             f" edits inside this block are overwritten -->\n{body}\n{end}")
    text = doc.read_text() if doc.exists() else "# Performance\n"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text,
                      flags=re.S)
    else:
        section = f"## {SECTION_TITLES[profile]}\n\n{block}\n\n"
        # The full run goes ahead of any other section (the quick run's included), the quick
        # run ahead of any section that is not a result.
        ahead = r"^## " if profile == "full" else r"^## (?!Results)"
        first = re.search(ahead + r"(?!" + re.escape(SECTION_TITLES["full"]) + ")", text,
                          flags=re.M)
        at = first.start() if first else len(text)
        text = text[:at].rstrip("\n") + "\n\n" + section + text[at:]
    doc.write_text(text.rstrip("\n") + "\n")


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    peers = [f for f in ORDER if f != "native" and f in result["filesystems"]]
    colors = {"artifactfs": "#1f77b4", "bindfs": "#ff7f0e", "rclone": "#2ca02c"}
    rows = [m for m in METRICS if m.kind in ("ratio", "self") and m.id in summary]
    mem = [m for m in METRICS if m.id in ("mem_mounted", "mem_tenth", "mem_all")
           and m.id in summary]
    fig, axes = plt.subplots(
        2 if mem else 1, 1, figsize=(10, 0.42 * len(rows) * max(1, len(peers)) / 2 + 3.5
                                     + (2 if mem else 0)),
        gridspec_kw={"height_ratios": [max(1, len(rows)), 3] if mem else [1]}, squeeze=False)
    ax = axes[0][0]
    h = 0.8 / max(1, len(peers))
    for i, m in enumerate(rows):
        for j, fs in enumerate(peers):
            s = summary[m.id].get(fs)
            if s is None:
                continue
            r = s["ratio"] if m.kind == "ratio" and "ratio" in s else s
            y = i + (j - (len(peers) - 1) / 2) * h
            ax.barh(y, r["median"], height=h, color=colors.get(fs, "grey"),
                    label=fs if i == 0 or fs not in ax.get_legend_handles_labels()[1] else None,
                    xerr=[[r["median"] - r["min"]], [r["max"] - r["median"]]],
                    error_kw={"elinewidth": 0.8, "capsize": 2})
        t = BY_ID[m.id].target or ""
        if t.startswith(">= ") and t[3:].split()[0].replace(".", "").isdigit():
            x = float(t[3:].split()[0])
            ax.plot([x, x], [i - 0.45, i + 0.45], color="red", linewidth=1.5)
    ax.set_xscale("log")
    ax.set_xlim(0.005, 4)
    ax.axvline(1.0, color="black", linewidth=0.6)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([m.id + (" (self)" if m.kind == "self" else "") for m in rows],
                       fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio to native in the same run (log scale; red: artifactfs target;"
                  " bars: median, whiskers: min-max)")
    ax.legend(loc="lower right", fontsize=8)
    meta = result["meta"]
    ax.set_title(f"artifactfs benchmark, {meta['profile']} run of {meta['finished']}\n"
                 f"{meta['sizes_text']}", fontsize=9)
    if mem:
        ax2 = axes[1][0]
        s = [summary[m.id]["artifactfs"] for m in mem]
        ax2.barh(range(len(mem)), [x["max"] for x in s], color=colors["artifactfs"])
        ax2.axvline(200, color="red", linewidth=1.5)
        ax2.set_yticks(range(len(mem)))
        ax2.set_yticklabels([m.id for m in mem], fontsize=8)
        ax2.invert_yaxis()
        ax2.set_xlabel(f"artifactfs daemon VmHWM, MiB (max over passes; red: 200 MiB target;"
                       f" {meta['mem_artifacts']:,} artifacts)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
