"""The run report: every target side by side (report.md, report.html, report.png) under the model's artifact root.

Size against quality is the choice users make, so the chart plots file size against the perplexity ratio to the
source, one labelled point per validated artifact. The HTML embeds the table and the chart and needs no network.
A mixture of experts quantized with calibration (GPTQ) adds its expert-coverage table: per layer, the fewest, median
and most calibration tokens the router sent an expert, and the experts topped up to all tokens.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from pipeline.handoff import md_code, md_text

COLUMNS = {  # column -> (heading, number format)
    "target": ("target", "{}"),
    "status": ("status", "{}"),
    "size_mb": ("size MB", "{:.1f}"),
    "bits_per_weight": ("bits/weight", "{:.2f}"),
    "ppl": ("ppl", "{:.3f}"),
    "ppl_ratio": ("ppl ratio", "{:.4f}"),
    "kl_mean": ("KL mean", "{:.5f}"),
    "kl_p99": ("KL p99", "{:.4f}"),
    "top1": ("top-1", "{:.4f}"),
    "tokens_per_s": ("tok/s", "{:.1f}"),
    "validated_on": ("validated on", "{}"),
    "served": ("served in", "{}"),
    "reason": ("reason", "{}"),
}


def cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    return "-" if value is None else COLUMNS[column][1].format(value)


def write_report(folder: Path, summary: dict[str, Any]) -> dict[str, Path]:
    """Write report.md, report.png and report.html for a run summary (see pipeline.convert.summarize)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"md": folder / "report.md", "png": folder / "report.png", "html": folder / "report.html"}
    rows = summary["targets"]
    chart(rows, paths["png"], summary["model"])
    paths["md"].write_text(markdown(summary), encoding="utf-8")
    paths["html"].write_text(page(summary, paths["png"].name), encoding="utf-8")
    return paths


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# {summary['model']}",
        "",
        f"source: {md_code(summary['source']['spec'])}; ppl of the source model: {_source_ppl(summary['targets'])}",
        "",
        *md_table([COLUMNS[c][0] for c in COLUMNS], [[cell(r, c) for c in COLUMNS] for r in summary["targets"]]),
    ]
    for target, layers in summary.get("expert_coverage", {}).items():
        lines += ["", f"## Expert coverage: {md_text(target)}", ""]
        lines += md_table(COVERAGE, [coverage_cells(layer) for layer in layers])
    return "\n".join([*lines, "", "![size against quality](report.png)", ""])


def md_table(heads, rows: list[list[str]]) -> list[str]:
    """A markdown table's lines, every cell escaped."""
    return ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads),
            *("| " + " | ".join(md_text(v) for v in row) + " |" for row in rows)]  # fmt: skip


COVERAGE = ("layer", "min tokens", "median tokens", "max tokens", "topped up")


def coverage_cells(layer: dict[str, Any]) -> list[str]:
    """One layer's expert-coverage record as table cells (layers counted from 1, as the build log counts them)."""
    topped = ", ".join(map(str, layer["topped_up"])) or "-"
    return [str(layer["layer"] + 1), str(layer["min_tokens"]), f"{layer['median_tokens']:g}", str(layer["max_tokens"]),
            topped]  # fmt: skip


def coverage_html(summary: dict[str, Any]) -> str:
    parts = []
    for target, layers in summary.get("expert_coverage", {}).items():
        head = "".join(f"<th>{html.escape(c)}</th>" for c in COVERAGE)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in coverage_cells(layer)) + "</tr>"
                       for layer in layers)  # fmt: skip
        parts.append(f"<h2>Expert coverage: {html.escape(target)}</h2>\n<table class=\"coverage\"><thead><tr>{head}"
                     f"</tr></thead><tbody>{body}</tbody></table>\n")  # fmt: skip
    return "".join(parts)


def page(summary: dict[str, Any], chart_name: str) -> str:
    head = "".join(f"<th>{html.escape(COLUMNS[c][0])}</th>" for c in COLUMNS)
    body = "".join(
        f'<tr class="{html.escape(str(r["status"]))}">'
        + "".join(f"<td>{html.escape(cell(r, c))}</td>" for c in COLUMNS)
        + "</tr>" for r in summary["targets"]
    )  # fmt: skip
    title = html.escape(summary["model"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}: weightsmith report</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; margin-bottom: 24px; }}
th {{ background: #1f4e79; color: #fff; padding: 6px 10px; text-align: left; }}
td {{ border-bottom: 1px solid #ccc; padding: 4px 10px; }}
tr.failed td {{ background: #fde2e2; }} tr.not_run td {{ background: #fff6d5; }}
</style></head>
<body><h1>{title}</h1>
<p>source: <code>{html.escape(summary["source"]["spec"])}</code>; source model perplexity
{html.escape(_source_ppl(summary["targets"]))}; run {html.escape(summary.get("finished_at") or "")}</p>
<table id="results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{coverage_html(summary)}<img id="chart" src="{html.escape(chart_name)}" alt="file size against perplexity ratio"
 width="800">
</body></html>
"""


def _source_ppl(rows: list[dict[str, Any]]) -> str:
    values = [r["ppl_source"] for r in rows if r.get("ppl_source")]
    return f"{values[0]:.3f}" if values else "-"


def chart(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.get("ppl_ratio") is not None and r.get("size_mb")]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    formats = list(dict.fromkeys(r["target"].split("/", 1)[0] for r in rows))  # one colour per format, in row order
    palette = plt.get_cmap("tab10").colors
    for r in points:
        color = palette[formats.index(r["target"].split("/", 1)[0]) % len(palette)]
        ax.scatter(r["size_mb"], r["ppl_ratio"], color=color, s=40, zorder=3)
        ax.annotate(r["target"], (r["size_mb"], r["ppl_ratio"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(1.0, color="#888", linewidth=0.8, linestyle="--")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("perplexity ratio to the source model")
    ax.set_title(f"{title}: size against quality")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
