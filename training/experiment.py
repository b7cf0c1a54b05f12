"""`medcl experiment CONFIG`: a sweep of methods x label fractions x seeds over one training config.

Writes ``<results>/<name>.json`` (every run's metrics), ``<name>.md`` (mean ± std per method and
fraction, with the command) and ``<name>.png`` (metric against label fraction), and merges the
per-seed values into ``<results>/summary.json``: dataset -> method -> label fraction -> metric -> [values].
A run whose metrics already exist for the same config is reused, so an interrupted sweep resumes
where it stopped and a finished one re-renders without training.

A partial call (``--fractions`` / ``--methods``) adds its rows to ``<name>.json`` instead of replacing
it: the rows of earlier calls stay when the config still has their cell (method, fraction, seed) and
would still produce them (their ``fingerprint``, a hash of the cell's YAML settings, still matches).
So the table grows across calls, sessions and machines without the run folders, which are not kept
in the repository; each row carries the command that produced it and the table lists them.

A method entry is a name (``s5cl``) or a mapping: ``{label: srcl_pft, method: srcl_pretrain,
then: cross_entropy, then_set: {...}}`` trains ``method`` first and fine-tunes with ``then`` from its
weights (pretrain-then-fine-tune), reporting the fine-tuned model. ``teacher: LABEL`` hands the run
of entry LABEL (same fraction and seed) to the method as ``method.teacher`` (SWCL's label propagation).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medcl.errors import MedclError


class MethodEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str
    method: str
    set: dict[str, Any] = {}
    then: str | None = None  # fine-tune with this method from the first run's weights
    then_set: dict[str, Any] = {}
    # the label of another entry whose run (same fraction and seed) is this one's method.teacher: SWCL's
    # stage-1 label propagation; trained first when missing, reused otherwise
    teacher: str | None = None


class PublishedResult(BaseModel):
    """A number from a paper or benchmark, shown beside the table and never mixed into our runs."""

    model_config = ConfigDict(extra="forbid")

    source: str  # who published it, with its setting (model, input size, budget)
    method: str
    label_fraction: float
    values: dict[str, float]  # metric -> value, same metric names as the table


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    dataset: str
    base_config: str
    methods: list[str | MethodEntry] = Field(min_length=1)
    label_fractions: list[float] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    metrics: list[str] = ["accuracy", "macro_f1"]
    set: dict[str, Any] = {}  # overrides applied to every run
    output_dir: str = "runs/experiments"
    results_dir: str = "docs/results"
    note: str = ""  # printed beside the table: the budget and how it differs from the paper
    published: list[PublishedResult] = []

    def entries(self) -> list[MethodEntry]:
        return [MethodEntry(label=m, method=m) if isinstance(m, str) else m for m in self.methods]


class ExperimentError(MedclError, ValueError):
    """An experiment config that cannot be run."""


def load_experiment(path: str | Path) -> tuple[ExperimentConfig, Path]:
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"no experiment config at {path}")
    try:
        config = ExperimentConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except ValidationError as e:
        first = e.errors()[0]
        raise ExperimentError(f"{path}: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    except yaml.YAMLError as e:
        raise ExperimentError(f"{path} is not valid YAML: {e}") from None
    for f in config.label_fractions:
        if not 0 < f <= 1:
            raise ExperimentError(f"{path}: label fraction {f} is not in (0, 1]")
    return config, path.parent


def _pct(fraction: float) -> str:
    return f"{fraction * 100:g}pct"


def _train(base: Path, overrides: dict[str, Any], progress: bool) -> Path:
    from training.config import load_config
    from training.engine import StaleRunError, train

    config = load_config(base, overrides)
    fingerprint = config.fingerprint()  # before training: the model factory fills in fields of the config
    done = config.run_dir() / "metrics.json"
    marker = config.run_dir() / "experiment_fingerprint"
    if done.is_file() and marker.is_file() and marker.read_text() == fingerprint:
        return config.run_dir()  # finished before with this exact config
    try:
        run_dir = train(config, resume=True, progress=progress)
    except StaleRunError:
        raise ExperimentError(f"{config.run_dir()} holds a run of other settings than this experiment's now: "
                              f"remove that folder to train it again, or give the experiment another name") from None
    marker.write_text(fingerprint)
    return run_dir


def cell_fingerprint(settings: dict[str, Any]) -> str:
    """Hash of a result cell's settings (YAML mappings, relative paths as written): the same on every
    machine and checkout, and different when anything that shapes the cell's runs changes."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _run_settings(base: Path, overrides: dict[str, Any]) -> dict:
    from training.config import VOLATILE_SCHEDULE, read_config_yaml

    settings = read_config_yaml(base, overrides)
    schedule = settings.get("schedule")
    if isinstance(schedule, dict):
        settings["schedule"] = {k: v for k, v in schedule.items() if k not in VOLATILE_SCHEDULE}
    return settings


def _revision(method: str) -> int:
    from training.methods import method_revision

    return method_revision(method)


def _run_name(experiment: str, label: str, method: str, fraction: float, seed: int) -> str:
    """A run's folder name; a method's later revision trains into new folders (never a stale reuse)."""
    revision = _revision(method)
    return f"{experiment}-{label}-{_pct(fraction)}-s{seed}" + (f"-r{revision}" if revision > 1 else "")


def _cell_settings(config: ExperimentConfig, base: Path, entry: MethodEntry, by_label: dict[str, MethodEntry],
                   fraction: float, seed: int) -> dict:
    """Every run behind one reported number (teacher, the run, its fine-tune), as YAML settings."""
    common = {**config.set, "seed": seed, "data.label_fraction": fraction}
    settings = {"run": _run_settings(base, {**common, **entry.set, "method.name": entry.method})}
    if _revision(entry.method) > 1:  # only then: the cells of unchanged methods keep their fingerprints
        settings["revision"] = _revision(entry.method)
    if entry.teacher is not None:
        teacher = by_label[entry.teacher]
        settings["teacher"] = _run_settings(base, {**common, **teacher.set, "method.name": teacher.method})
    if entry.then:
        settings["then"] = _run_settings(base, {**common, **entry.then_set, "method.name": entry.then})
    return settings


def run_experiment(path: str | Path, progress: bool = True, fractions: list[float] | None = None,
                   methods: list[str] | None = None) -> dict:
    """Run the sweep (or the part named by ``fractions`` / ``methods``: same run names, so the full
    sweep later reuses those runs)."""
    config, base_dir = load_experiment(path)
    by_label = {e.label: e for e in config.entries()}
    for entry in by_label.values():
        if entry.teacher is not None and (entry.teacher not in by_label or entry.teacher == entry.label):
            raise ExperimentError(f"{entry.label}: teacher {entry.teacher!r} must be the label of another entry "
                                  f"({', '.join(by_label)})")
    base = (base_dir / config.base_config).resolve()
    # every cell of the full config (before --fractions / --methods narrow it), in table order: this
    # call's rows and the earlier ones it keeps
    cells = {(e.label, f, s): cell_fingerprint(_cell_settings(config, base, e, by_label, f, s))
             for e in config.entries() for f in config.label_fractions for s in config.seeds}
    command = f"medcl experiment {path}"
    if fractions:
        unknown = [f for f in fractions if f not in config.label_fractions]
        if unknown:
            raise ExperimentError(f"label fractions {unknown} are not in {path} ({config.label_fractions})")
        config.label_fractions = [f for f in config.label_fractions if f in fractions]
        command += " --fractions " + " ".join(f"{f:g}" for f in fractions)
    if methods:
        known = [e.label for e in config.entries()]
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise ExperimentError(f"methods {unknown} are not in {path} ({known})")
        config.methods = [e for e in config.entries() if e.label in methods]
        command += " --methods " + " ".join(methods)
    out_dir = (base_dir / config.output_dir).resolve()
    results_dir = (base_dir / config.results_dir).resolve()
    rows = []
    total = len(config.entries()) * len(config.label_fractions) * len(config.seeds)
    done = 0
    for entry in config.entries():
        for fraction in config.label_fractions:
            for seed in config.seeds:
                done += 1
                name = _run_name(config.name, entry.label, entry.method, fraction, seed)
                print(f"medcl: experiment {config.name}: run {done}/{total}: {name}", flush=True)
                common = {**config.set, "seed": seed, "data.label_fraction": fraction, "output_dir": str(out_dir)}
                first = {**common, **entry.set, "method.name": entry.method, "name": name}
                if entry.teacher is not None:
                    teacher = by_label[entry.teacher]
                    teacher_name = _run_name(config.name, teacher.label, teacher.method, fraction, seed)
                    teacher_dir = _train(base, {**common, **teacher.set, "method.name": teacher.method,
                                                "name": teacher_name}, progress)
                    first["method.teacher"] = str(teacher_dir)
                run_dir = _train(base, first, progress)
                if entry.then:
                    weights = run_dir / "model.safetensors"
                    run_dir = _train(base, {**common, **entry.then_set, "method.name": entry.then,
                                            "pretrained": str(weights), "name": f"{name}-finetune"}, progress)
                measured = json.loads((run_dir / "metrics.json").read_text())
                test = measured["test"]
                train_seconds = measured.get("train_seconds", 0.0)
                if entry.then:  # the reported model's cost includes its pretraining
                    train_seconds += json.loads((weights.parent / "metrics.json").read_text()).get("train_seconds", 0.0)
                rows.append({"method": entry.label, "label_fraction": fraction, "seed": seed, "run": str(run_dir),
                             "train_seconds": round(train_seconds, 1),
                             **{m: test[m] for m in config.metrics if m in test},
                             "fingerprint": cells[(entry.label, fraction, seed)], "command": command})
    report = {"name": config.name, "dataset": config.dataset, "metrics": config.metrics, "rows": rows,
              "note": config.note, "published": [p.model_dump() for p in config.published]}
    return finish_sweep(report, results_dir, cells)


def finish_sweep(report: dict, results_dir: Path, cells: dict[tuple[str, float, int], str]) -> dict:
    """Add the earlier rows this call did not replace, then write the JSON, table, plot and summary.

    ``cells`` maps every (method, fraction, seed) of the full config to its fingerprint, in the
    order the table lists them; an earlier row is kept only while its fingerprint matches its cell's.
    """
    previous = results_dir / f"{report['name']}.json"
    fresh = {(r["method"], r["label_fraction"], r["seed"]) for r in report["rows"]}
    kept, dropped = [], 0
    if previous.is_file():
        for row in json.loads(previous.read_text()).get("rows", []):
            key = (row.get("method"), row.get("label_fraction"), row.get("seed"))
            if key in fresh:
                continue
            if key in cells and row.get("fingerprint") == cells[key]:
                kept.append(row)
            else:
                dropped += 1
    if dropped:
        print(f"medcl: experiment {report['name']}: {dropped} earlier row(s) of {previous} left out: their cell "
              f"is no longer in the config or its settings changed", flush=True)
    order = {key: i for i, key in enumerate(cells)}
    rows = sorted(report["rows"] + kept,
                  key=lambda r: order.get((r["method"], r["label_fraction"], r["seed"]), len(order)))
    report = {**report, "rows": rows}
    write_outputs(report, results_dir)
    merge_summary(results_dir / "summary.json", report["dataset"], rows, report["metrics"])
    return report


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def write_outputs(report: dict, results_dir: Path) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    name, rows, metrics = report["name"], report["rows"], report["metrics"]
    (results_dir / f"{name}.json").write_text(json.dumps(report, indent=2))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fractions = sorted({r["label_fraction"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"# {name}: {report['dataset']}", "",
             f"Test split; mean ± standard deviation over seeds {seeds}. {report.get('note', '')}".rstrip(), "",
             "| labels | method | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for fraction in fractions:
        for method in methods:
            cell = [r for r in rows if r["method"] == method and r["label_fraction"] == fraction]
            lines.append(f"| {fraction * 100:g}% | {method} | "
                         + " | ".join(_cell([r[m] for r in cell if m in r]) for m in metrics) + " |")
    lines += _paired_lines(rows, methods, fractions, metrics[0])
    published = report.get("published") or []
    if published:
        lines += ["", "Published numbers, for comparison (not measured here; their settings differ from ours):", "",
                  "| labels | method | " + " | ".join(metrics) + " | source |", "|---|---|" + "---|" * (len(metrics) + 1)]
        for p in published:
            lines.append(f"| {p['label_fraction'] * 100:g}% | {p['method']} | "
                         + " | ".join(f"{p['values'][m]:.3f}" if m in p["values"] else "–" for m in metrics)
                         + f" | {p['source']} |")
    commands = list(dict.fromkeys(r["command"] for r in rows if r.get("command")))
    lines += ["", f"![{metrics[0]} by label fraction]({name}.png)", "", "Produced by (each call adds its rows; a "
              "call without `--fractions` / `--methods` runs the whole sweep, reusing finished runs):", "", "```",
              *commands, "```", ""]
    (results_dir / f"{name}.md").write_text("\n".join(lines))
    _plot(rows, methods, fractions, metrics, results_dir / f"{name}.png", name)


def rewrite_tables(path: str | Path) -> Path:
    """The results page and plot of a sweep rewritten from its results JSON (no training): for a change
    of the page's format. Returns the page's path."""
    config, base_dir = load_experiment(path)
    results_dir = (base_dir / config.results_dir).resolve()
    source = results_dir / f"{config.name}.json"
    if not source.is_file():
        raise ExperimentError(f"no results at {source}: run the experiment first")
    write_outputs(json.loads(source.read_text()), results_dir)
    return results_dir / f"{config.name}.md"


def _paired_lines(rows: list[dict], methods: list[str], fractions: list[float], metric: str) -> list[str]:
    """Each method against the baseline (cross_entropy, else the first method) seed by seed on ``metric``:
    mean difference with its bootstrap 95% interval, the per-seed differences, the sign test."""
    from training.stats import paired_summary

    baseline = "cross_entropy" if "cross_entropy" in methods else methods[0]
    out = ["", f"Paired against {baseline} on {metric}, seed by seed (each seed: the same labelled images and "
               "test split for both): mean difference [bootstrap 95% interval] | per seed | sign test.", "",
           "| labels | method | mean difference [95% interval] | per seed | seeds ahead |", "|---|---|---|---|---|"]
    added = False
    for fraction in fractions:
        base = {r["seed"]: r[metric] for r in rows
                if r["method"] == baseline and r["label_fraction"] == fraction and metric in r}
        for method in methods:
            if method == baseline:
                continue
            mine = {r["seed"]: r[metric] for r in rows
                    if r["method"] == method and r["label_fraction"] == fraction and metric in r}
            seeds = sorted(set(base) & set(mine))
            if not seeds:
                continue
            summary = paired_summary([mine[s] - base[s] for s in seeds])
            out.append(f"| {fraction * 100:g}% | {method} | {summary.describe()} |")
            added = True
    return out if added else []


def _plot(rows: list[dict], methods: list[str], fractions: list[float], metrics: list[str], path: Path,
          title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for method in methods:
            xs, ys, es = [], [], []
            for f in fractions:
                values = [r[metric] for r in rows if r["method"] == method and r["label_fraction"] == f and metric in r]
                if values:
                    xs.append(f * 100)
                    ys.append(statistics.mean(values))
                    es.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("labelled fraction (%)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def merge_summary(path: Path, dataset: str, rows: list[dict], metrics: list[str]) -> dict:
    """dataset -> method -> label fraction -> metric -> per-seed values; written atomically."""
    summary = json.loads(path.read_text()) if path.is_file() else {}
    for method in dict.fromkeys(r["method"] for r in rows):
        by_fraction: dict[str, dict[str, list[float]]] = {}
        for r in sorted((r for r in rows if r["method"] == method), key=lambda r: (r["label_fraction"], r["seed"])):
            cell = by_fraction.setdefault(str(r["label_fraction"]), {})
            for m in metrics:
                if m in r:
                    cell.setdefault(m, []).append(r[m])
        summary.setdefault(dataset, {}).setdefault(method, {}).update(by_fraction)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".summary-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return summary
