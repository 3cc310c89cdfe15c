"""Writing results: JSON, the A/B Markdown table and the A/B plot."""

from __future__ import annotations

import json
import math
import os


def write_json(result: dict, path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
        f.write("\n")
    return path


def _num(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.1f}"


def ab_markdown(r: dict) -> str:
    a, b = r["labels"]
    ag = r["agreement"]
    lines = [f"# A/B: {a} vs {b}", "",
             f"Workload: {r['workload']['source']}, {r['workload']['num_requests']} requests; "
             f"{r['repeats']} runs each, order {' '.join(r['order'])}; {r['date']}.", "",
             f"| figure | {a} median (min-max) | {b} median (min-max) | {b}/{a} | better |",
             "|---|---:|---:|---:|---|"]
    for fig in r["figures"].values():
        sa, sb = fig[a], fig[b]
        lines.append(f"| {fig['label']} | {_num(sa['median'])} ({_num(sa['min'])}-{_num(sa['max'])}) | "
                     f"{_num(sb['median'])} ({_num(sb['min'])}-{_num(sb['max'])}) | "
                     f"{_num(fig['ratio_b_over_a'])} | {fig['better'] or '~ (ranges overlap)'} |")
    kind = "greedy" if r["greedy"] else f"sampled (temperature {r['temperature']}, seeded)"
    lines += ["", f"Output agreement ({kind}): {ag['num_identical']}/{ag['num_requests']} requests identical "
              f"({100 * ag['identical_share']:.1f}%)"
              + (f"; first divergence at token {ag['first_divergence_min']} (median "
                 f"{_num(ag['first_divergence_median'])})" if ag["first_divergence_min"] is not None else "")
              + ".",
              "Run-to-run agreement: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["repeat_agreement"].items())
              + "."]
    return "\n".join(lines) + "\n"


def ab_plot(r: dict, path: str) -> str:
    """One panel per figure: a bar per side at the median, a line from min to max, each run as a dot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = r["labels"]
    figs = list(r["figures"].values())
    cols = 4
    rows = max(1, math.ceil(len(figs) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    colors = ("#4C72B0", "#DD8452")
    for ax, f in zip(axes.flat, figs):
        for x, (lab, color) in enumerate(zip((a, b), colors)):
            s = f[lab]
            ax.bar(x, s["median"], color=color, width=0.6)
            ax.vlines(x, s["min"], s["max"], color="black", linewidth=1.5)
            ax.scatter([x] * len(s["values"]), s["values"], color="black", s=10, zorder=3)
        ratio = f["ratio_b_over_a"]
        ax.set_title(f"{f['label']}\n{b}/{a} = {_num(ratio)}", fontsize=9)
        ax.set_xticks([0, 1], [a, b], fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[len(figs):]:
        ax.axis("off")
    ag = r["agreement"]
    fig.suptitle(f"{a} vs {b}: {r['workload']['num_requests']} requests, {r['repeats']} runs each; "
                 f"identical outputs {100 * ag['identical_share']:.1f}%", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_ab_outputs(r: dict, out_dir: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "ab.json"), "markdown": os.path.join(out_dir, "ab.md"),
             "png": os.path.join(out_dir, "ab.png")}
    write_json(r, paths["json"])
    with open(paths["markdown"], "w") as f:
        f.write(ab_markdown(r))
    ab_plot(r, paths["png"])
    return paths
