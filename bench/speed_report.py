"""`medcl bench`'s results on disk: OUT.json (everything), OUT.png (throughput and p99 by concurrency)
and the generated part of OUT.md, between two marker lines, so the hand-written part of the page
(what was changed, predicted and measured) survives every re-run."""

from __future__ import annotations

import json
from pathlib import Path

from bench.report import replace_generated

START, END = "<!-- medcl bench: generated from here -->", "<!-- medcl bench: generated to here -->"


def write_report(result: dict, out: Path, command: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {**result, "command": command}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    figure = plot(result, out.with_suffix(".png"))
    generated = "\n".join([START, *markdown(result, figure), "", "Produced by:", "", "```", command, "```", END])
    replace_generated(out.with_suffix(".md"), START, END, generated, "Benchmarks")


def _fmt(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return "–" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def markdown(result: dict, figure: Path | None) -> list[str]:
    m, g = result["machine"], result["gemm_gflops"]
    lines = ["## Measured", "",
             f"Machine: {m['cpu']}, {m['cores']} cores. float32 GEMM peak measured in the same run: "
             f"**{g['peak']} GFLOP/s** ({', '.join(f'{k} {v}' for k, v in g.items() if k != 'peak')}); "
             f"onnxruntime {result['onnxruntime']}.", ""]
    headline = result.get("headline", {})
    if headline:
        lines += ["Headline ratios (also in the JSON, key `headline`):", ""]
        lines += [f"- `{k}`: **{_fmt(v)}**" for k, v in headline.items()]
        lines.append("")
    if figure:
        lines += [f"![throughput and p99 latency by concurrency]({figure.name})", ""]
    for key, model in result["models"].items():
        lines += [f"### Model `{key}`: {model['input_size']}x{model['input_size']} px, "
                  f"{model['gflop_per_image']} GFLOP per image", "",
                  f"Run `{model['run']}`; images: {model['images']}. Compute limit at the GEMM peak: "
                  f"{model['compute_limit_images_per_s']} images/s. Decoding and preprocessing by the card, in process: "
                  f"{model['decode_and_preprocess_ms_per_image']} ms per image.", "",
                  "| system | request | concurrency | images/s | requests/s | p50 ms | p95 ms | p99 ms | of compute limit | statuses |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in model["rows"]:
            statuses = ", ".join(f"{k}: {v}" for k, v in r.get("statuses", {}).items()) or "–"
            lines.append(f"| {r['system']} | {r['request']} | {r['concurrency']} | {r['images_per_s']} | "
                         f"{r['requests_per_s']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
                         f"{r['fraction_of_compute_limit']:.1%} | {statuses} |")
        lines += ["", "Memory (RSS) at the end: " + "; ".join(f"{k} {v} MB" for k, v in model["memory_rss_mb_at_end"].items())
                  + "."]
        paired = model.get("paired")
        if paired:
            lines += ["", f"Headline, re-measured in {len(paired['rounds'])} alternating rounds ({paired['what']}, "
                      f"{paired['metric'].replace('_', ' ')}): " + "; ".join(
                          " / ".join(f"{v}" for k, v in r.items() if not k.endswith("p99_ms") and k != "ratio")
                          + f" = {r['ratio']}" for r in paired["rounds"])
                      + f". Median ratio **{paired['median_ratio']}**; median p99 "
                      + ", ".join(f"{k} {v} ms" for k, v in paired["p99_ms_median"].items()) + "."]
        if model.get("torchserve_skipped"):
            lines.append(f"TorchServe not measured: {model['torchserve_skipped']}.")
        lines.append("")
    seg = result.get("segmentation")
    if seg:
        lines += ["### Nuclei segmentation per megapixel", ""]
        if "skipped" in seg:
            lines += [f"Not measured: {seg['skipped']}.", ""]
        else:
            # one column per answer rule; results from before the network column have only the first
            runs = [(seg["in_process"], seg["http_one_at_a_time"])]
            if "in_process_network" in seg:
                runs.append((seg["in_process_network"], seg["http_one_at_a_time_network"]))
            first = seg["in_process"]
            lines += [f"{seg['tiles']}; run `{seg['run']}`; inference window {first['window']} px, margin "
                      f"{first['margin']} px. Columns: the answer rule (`method=`), with the answers it gave "
                      "(`produced_by`) and nuclei per tile.", "",
                      "| stage, seconds per megapixel | " + " | ".join(
                          f"{p.get('rule', 'card')} (answers: {_fmt(p.get('produced_by', {}))}; {p['nuclei_per_tile']} nuclei per tile)"
                          for p, _ in runs) + " |",
                      "|---|" + "---|" * len(runs)]
            for stage in first["seconds_per_megapixel"]:
                lines.append(f"| {stage.replace('_', ' ')} (in process) | " + " | ".join(
                    str(p["seconds_per_megapixel"][stage]) for p, _ in runs) + " |")
            lines += ["| /segment over HTTP, one raw-body tile at a time | " + " | ".join(
                          f"{h['seconds_per_megapixel']} (p50 {h['p50_ms']} ms per tile)" for _, h in runs) + " |",
                      f"| network FLOP floor ({seg['gflop_per_megapixel']} GFLOP/MP at the GEMM peak) | "
                      + " | ".join(str(seg["floor_seconds_per_megapixel"]) for _ in runs) + " |", ""]
    search = result.get("search")
    if search:
        lines += ["### Case search", "", f"{search['vectors']}; {search['queries']} real queries; recall@10 "
                  "against exact search.", "",
                  "| system | build s | memory MB | single q/s | batched q/s | recall@10 |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['system']} | {r['build_s']} | {r['memory_mb']} | {r['single_qps']} | {r['batched_qps']} | "
                  f"{r['recall@10']} |" for r in search["rows"]]
        lines.append("")
    return lines


def plot(result: dict, path: Path) -> Path | None:
    if not result["models"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"].items())
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 7), squeeze=False)
    for col, (key, model) in enumerate(models):
        series: dict[str, list[tuple[int, float, float]]] = {}
        for r in model["rows"]:
            label = r["system"] if r["request"].startswith("batch") else f"{r['system']}, {r['request']}"
            series.setdefault(label, []).append((r["concurrency"], r["images_per_s"], r["p99_ms"]))
        for label, points in series.items():
            xs, ips, p99 = zip(*points)
            axes[0][col].plot(xs, ips, marker="o", label=label)
            axes[1][col].plot(xs, p99, marker="o", label=label)
        limit = model["compute_limit_images_per_s"]
        axes[0][col].axhline(limit, color="grey", linestyle="--", label=f"compute limit {limit} img/s")
        axes[0][col].set_title(f"{key}: {model['input_size']} px, {model['gflop_per_image']} GFLOP/image")
        axes[0][col].set_ylabel("images / s")
        axes[1][col].set_ylabel("p99 latency, ms")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xticks(result["options"]["concurrency"], [str(c) for c in result["options"]["concurrency"]])
            ax.set_xlabel("concurrency (in-process engines: batch size)")
            ax.grid(alpha=0.3)
        axes[1][col].set_yscale("log")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
