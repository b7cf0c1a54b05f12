"""The ``medcl`` command. Each subcommand imports what it needs when it runs, so ``medcl serve``
never imports torch and ``medcl --help`` is instant.

Errors the user can fix print one line (``medcl: error: ...``) and exit 2; anything unexpected
prints one line and exits 1 (``MEDCL_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from medcl.errors import MedclError

REPO_ROOT = Path(__file__).resolve().parent.parent


class UsageError(MedclError, ValueError):
    """Bad input from the user: exit 2 with the message."""


def _parse_overrides(pairs: Sequence[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.engine import train
    from training.nuclei import is_segmenter_config

    if is_segmenter_config(args.config):  # `task: segment`: the nuclei segmenter or its U-Net baseline
        from training.nuclei import load_segmenter_config, train_segmenter

        seg_config = load_segmenter_config(args.config, _parse_overrides(args.set))
        run_dir = train_segmenter(seg_config, progress=not args.quiet)
        scores = json.loads((run_dir / "metrics.json").read_text())
        print(json.dumps({"run_dir": str(run_dir), **scores.get("mean", {})}))
        return 0

    config = load_config(args.config, _parse_overrides(args.set))
    run_dir = train(config, resume=not args.no_resume, progress=not args.quiet)
    if os.environ.get("RANK", "0") != "0":  # under torchrun the main process reports
        return 0
    metrics = json.loads((run_dir / "metrics.json").read_text())["test"]
    print(json.dumps({"run_dir": str(run_dir), "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                      "balanced_accuracy": metrics["balanced_accuracy"], "knn_accuracy": metrics["knn_accuracy"]}))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from training.experiment import run_experiment
    from training.vessels import is_vessel_transfer_config, run_transfer

    # one runner for every sweep: classification sweeps, and the DRIVE vessel transfer (kind: vessel_transfer)
    if args.tables_only:
        from training.experiment import rewrite_tables

        written = rewrite_tables(args.config)
        print(json.dumps({"experiment": args.config.stem, "rewritten": str(written)}))
        return 0
    runner = run_transfer if is_vessel_transfer_config(args.config) else run_experiment
    report = runner(args.config, progress=not args.quiet, fractions=args.fractions, methods=args.methods)
    print(json.dumps({"experiment": report["name"], "runs": len(report["rows"])}))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from training.retrain import Outcome, retrain

    outcome, report = retrain(args.config, _parse_overrides(args.set), progress=not args.quiet, force=args.force)
    print(json.dumps(report, indent=2, default=str))
    if outcome in (Outcome.FAILED, Outcome.BAD_INPUT, Outcome.LOCKED):
        print(f"medcl: retrain {outcome.name.lower()}: {report.get('message', '')}", file=sys.stderr)
    return int(outcome)


def cmd_drift(args: argparse.Namespace) -> int:
    from medcl.drift_check import check

    verdict = check(args.url, model=args.model, window_seconds=args.window, api_key=os.environ.get("MEDCL_API_KEY"),
                    threshold=args.threshold, min_images=args.min_images)
    print(json.dumps(verdict, indent=2))
    return 3 if verdict["retrain"] else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from training.data import read_folder, read_npz
    from training.engine import load_trained
    from training.metrics import classification_metrics, predict

    model, card = load_trained(args.run_dir)
    aliases = dict(a.split("=", 1) for a in args.alias)
    if args.images:
        folder, _ = read_folder(args.images, card.preprocess)
        mapped = [aliases.get(n, n) for n in folder.class_names]
        unknown = [n for n in mapped if n not in card.class_names]
        if unknown:
            raise UsageError(f"folder classes not in the model's classes: {', '.join(unknown)} (use --alias DIR=CLASS)")
        labels = np.array([card.class_names.index(mapped[y]) for y in folder.labels])
        images, source = folder.images, str(args.images)
    else:
        path = args.data or card.data.path
        split = read_npz(path, card.class_names)
        part = getattr(split, args.split)
        if part is None:
            raise UsageError(f"{path} has no {args.split} split")
        images, labels, source = part.images, part.labels, f"{path} ({args.split})"
    logits, _ = predict(model, images, card.preprocess.mean, card.preprocess.std)
    result = classification_metrics(labels, logits.argmax(1), card.class_names)
    result.update({"source": source, "images": int(len(labels)), "model_version": card.version})
    print(json.dumps(result, indent=None if args.compact else 2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from export.onnx_export import export_onnx

    variants = [v for v in (args.variants or "").split(",") if v]
    if args.format == "mar":
        import tempfile

        from export.torchserve import build_mar

        with tempfile.TemporaryDirectory() as tmp:
            package = export_onnx(args.run_dir, Path(tmp) / "package", parity_data=args.parity_data,
                                  opset=args.opset, tolerance=args.tolerance)
            mar = build_mar(package, args.out)
        print(json.dumps({"mar": str(mar)}))
        return 0
    out = export_onnx(args.run_dir, args.out, parity_data=args.parity_data, opset=args.opset,
                      tolerance=args.tolerance, variants=variants, max_int8_drop=args.max_int8_drop,
                      tensorrt=args.tensorrt)
    from medcl.card import Card

    onnx_spec = Card.load(out).onnx
    print(json.dumps({"package": str(out), "parity": onnx_spec.parity, "variants": onnx_spec.variants}, indent=2))
    trt = onnx_spec.variants.get("tensorrt")
    if trt and not trt.get("built"):
        print(f"medcl: no TensorRT engine built: {trt['reason']}", file=sys.stderr)
    refused = [name for name, v in onnx_spec.variants.items() if isinstance(v, dict) and v.get("written") is False]
    if refused:
        reasons = "; ".join(f"{n} {onnx_spec.variants[n]['refused_because']}" for n in refused)
        raise UsageError(f"package written without {', '.join(refused)}: {reasons}")
    return 0


def _ensure_api_keys(env: dict[str, str]) -> None:
    """Keys are required by default. With none configured, this machine gets a key file in MEDCL_HOME
    with one admin key, printed once (only its SHA-256 is stored): the demo works out of the box and
    is still not open to the network."""
    from medcl.auth import KeyStore, add_key_to_file, auth_disabled, default_key_file

    if auth_disabled():
        print("medcl: MEDCL_AUTH=off: every endpoint is open to anyone who can reach the port", file=sys.stderr)
        return
    if KeyStore.from_environment().configured:  # also validates the file: a bad one stops here, in one line
        return
    path = default_key_file().resolve()
    if not (path.exists() and KeyStore(file=path).configured):
        key = add_key_to_file(path, f"local-admin-{int(time.time())}", ["admin"])
        print(f"medcl: API key for this machine (admin; shown once, stored hashed in {path}):\n    {key}\n"
              f"medcl: send it as 'Authorization: Bearer KEY'; more keys: `medcl keys new --name NAME --scopes read`",
              file=sys.stderr, flush=True)
    env["MEDCL_API_KEYS_FILE"] = str(path)


def _bentoml_serve(package: Path | None, port: int, host: str, models: str | None = None) -> int:
    """Serve one package, or several models (``models``: NAME=FOLDER_OR_STORE_REF,... as MEDCL_MODELS)."""
    # Absolute paths: the service process does not run in the caller's folder.
    env = dict(os.environ, MEDCL_HOME=str(Path(os.environ.get("MEDCL_HOME", ".medcl")).resolve()))
    if models:
        from service.registry import parse_model_list

        entries = []
        for name, where in parse_model_list(models, "--models"):
            folder = Path(where)
            if folder.is_dir():
                if not (folder / "card.json").is_file():
                    raise UsageError(f"no model package at {folder}")
                where = str(folder.resolve())
            entries.append(f"{name}={where}")
        env["MEDCL_MODELS"] = ",".join(entries)
        env.pop("MEDCL_PACKAGE", None)
        what = ", ".join(entries)
    else:
        if package is None or not (package / "card.json").is_file():
            raise UsageError(f"no model package at {package}; run `medcl demo prepare` or `medcl export`")
        env["MEDCL_PACKAGE"] = str(package.resolve())
        env.pop("MEDCL_MODELS", None)
        what = str(package)
    from medcl.index import index_uri

    uri = index_uri()
    if uri.startswith(("embedded://", "milvus://")):
        scheme, path = uri.split("://", 1)
        env["MEDCL_INDEX"] = f"{scheme}://{Path(path).resolve()}"
    if env.get("MEDCL_API_KEYS_FILE"):
        env["MEDCL_API_KEYS_FILE"] = str(Path(env["MEDCL_API_KEYS_FILE"]).resolve())
    _ensure_api_keys(env)
    from service.launch import WorkerCountError, api_workers, port_in_use

    try:
        api_workers()
    except WorkerCountError as e:
        raise UsageError(str(e)) from None

    if port_in_use(host, port):
        raise UsageError(f"port {port} on {host} is already in use (another service, or a worker left from an "
                         f"earlier one: `fuser -k {port}/tcp` stops it); choose another with --port")
    # One Prometheus directory per service (service/launch.py): two services on one host never share it.
    env["MEDCL_PROMETHEUS_DIR"] = str(Path(env["MEDCL_HOME"]) / "run" / f"port-{port}" / "prometheus")
    cmd = [sys.executable, "-m", "service.launch", "serve", "service.service:Medcl", "--port", str(port),
           "--host", host, "--working-dir", str(REPO_ROOT)]
    print(f"medcl: serving {what} on http://{host}:{port}", file=sys.stderr, flush=True)
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


def cmd_serve(args: argparse.Namespace) -> int:
    from service.package import default_package_dir

    if args.models:
        return _bentoml_serve(None, args.port, args.host, models=args.models)
    if args.model:
        from medcl.model_store import resolve

        return _bentoml_serve(resolve(args.model), args.port, args.host)
    return _bentoml_serve(Path(args.package) if args.package else default_package_dir(), args.port, args.host)


def cmd_demo(args: argparse.Namespace) -> int:
    from medcl import demo
    from medcl.card import Card

    if args.action == "build-pcam":
        if args.data is None:
            raise UsageError("demo build-pcam needs --data DIR (PatchCamelyon as DIR/{train,valid}/{0,1}/*.jpg)")
        if args.steps is not None and args.steps < 1:
            raise UsageError("--steps must be at least 1")
        package = demo.build_pcam_demo(args.data, out=args.out or demo.DEMO_PCAM, runs=args.runs, steps=args.steps)
        print(json.dumps({"package": str(package), "metrics": {k: v for k, v in Card.load(package).metrics.items()
                                                                if isinstance(v, float)}}))
        return 0
    package = demo.prepare_demo(force=args.force)
    segmenter = demo.prepare_demo_segmenter(force=args.force)
    pcam = demo.prepare_demo_pcam()
    demo.fill_demo_index(package)
    demo.fill_pcam_index(pcam)
    models = f"demo-bloodmnist={package},demo-nuclei={segmenter},demo-pcam={pcam}"
    if args.action == "serve":
        return _bentoml_serve(None, args.port, args.host, models=models)
    print(json.dumps({"package": str(package), "segmenter": str(segmenter), "pcam": str(pcam)}))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from medcl import model_store

    if args.action == "list":
        rows = model_store.list_models()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"{'tag':58} {'method':14} {'accuracy':>8}  aliases")
            for r in rows:
                print(f"{r['tag']:58} {r.get('method', ''):14} {r.get('accuracy', ''):>8}  {','.join(r['aliases'])}")
        return 0
    if args.action == "audit":
        for entry in model_store.audit_log():
            print(json.dumps(entry))
        return 0
    if not args.target:
        raise UsageError(f"`medcl models {args.action}` needs a {'PACKAGE_DIR' if args.action == 'register' else 'model'}")
    if args.action == "register":
        tag = model_store.register(args.target, name=args.name)
        if args.promote:
            model_store.promote(tag, args.alias)
        print(json.dumps({"registered": tag, "promoted": args.alias if args.promote else None}))
    elif args.action == "show":
        from medcl.card import Card

        print(Card.load(model_store.resolve(args.target)).model_dump_json(indent=2))
    elif args.action == "promote":
        previous = model_store.promote(args.target, args.alias)
        print(json.dumps({"alias": args.alias, "now": args.target, "before": previous}))
    elif args.action == "rollback":
        restored = model_store.rollback(args.target, args.alias)
        index = _restore_index_pointer(restored) if args.alias == "champion" else None
        print(json.dumps({"alias": args.alias, "now": restored, "index": index}))
    return 0


def _restore_index_pointer(tag: str) -> str | None:
    """After a rollback, point the case index back at the restored version's index (kept on disk by
    re-embedding); returns that version, or None when it has no index."""
    from medcl import model_store
    from medcl.card import Card
    from medcl.index import set_current_version, stored_dim
    from medcl.index.schema import CaseIndexError

    card = Card.load(model_store.resolve(tag))
    if card.task == "segment":
        return None
    try:
        stored_dim(card.name, card.version)
    except CaseIndexError:
        return None
    set_current_version(card.name, card.version)
    return card.version


def _package_dir(ref: str | None) -> Path:
    """A package folder, or a model-store reference (NAME, NAME@challenger, NAME:VERSION); default: the served one."""
    if ref is None:
        from service.package import default_package_dir

        return default_package_dir()
    if (Path(ref) / "card.json").is_file():
        return Path(ref)
    from medcl.model_store import resolve

    return resolve(ref)


def cmd_index(args: argparse.Namespace) -> int:
    from medcl.index.build import Embedder, build_index, reembed

    if args.action == "build":
        if not args.data:
            raise UsageError("`medcl index build` needs --data DIR, MANIFEST.csv or FILE.npz[:split]")
        embedder = Embedder(_package_dir(args.model))
        print(json.dumps(build_index(embedder, args.data, kind=args.kind, batch_size=args.batch_size,
                                     progress=not args.quiet)))
        return 0
    if args.action == "search":
        from medcl.index.schema import SearchFilter
        from medcl.preprocess import ImageDecodeError, decode_image

        if not args.files:
            raise UsageError("`medcl index search` needs one or more image files")
        embedder = Embedder(_package_dir(args.model))
        index = embedder.open_index(kind=args.kind)
        try:
            where = SearchFilter(label=args.label, case_id=args.case_id, slide_id=args.slide_id, site=args.site,
                                 date_from=args.date_from, date_to=args.date_to)
            images = []
            for f in args.files:
                try:
                    images.append(decode_image(f))
                except ImageDecodeError as e:
                    raise UsageError(f"{f}: {e}") from None
            results = index.search(embedder.embed(images), k=args.k, where=where)
        finally:
            index.close()
        for file, result in zip(args.files, results):
            print(json.dumps({"file": str(file), **result.model_dump(mode="json")}))
        return 0
    if args.action == "reembed":
        from medcl.index import current_version, open_index, stored_dim

        if not args.to:
            raise UsageError("`medcl index reembed` needs --to PACKAGE_DIR or NAME:VERSION (the new model)")
        embedder = Embedder(_package_dir(args.to))
        name = embedder.card.name
        old_version = args.from_version or current_version(name)
        if old_version is None:
            raise UsageError(f"no current index for model {name}; pass --from VERSION")
        old = open_index(name, old_version, stored_dim(name, old_version))
        try:
            print(json.dumps(reembed(old, embedder, batch_size=args.batch_size, progress=not args.quiet)))
        finally:
            old.close()
        return 0
    # stats
    from medcl.index import current_version, open_index, stored_dim

    package = _package_dir(args.model)
    from medcl.card import Card

    card = Card.load(package)
    version = current_version(card.name) or card.version
    index = open_index(card.name, version, stored_dim(card.name, version))
    try:
        print(json.dumps({"model": card.name, "current_version": current_version(card.name), "version": version,
                          "cases": index.count(), "kind": getattr(index, "active_kind", "milvus")}))
    finally:
        index.close()
    return 0


def cmd_bento(args: argparse.Namespace) -> int:
    from medcl.bento import build_bento

    from service.registry import parse_model_list

    models = {name: Path(where) for name, where in parse_model_list(args.models, "--models")}
    if not models:
        raise UsageError("--models needs at least one NAME=PACKAGE_DIR")
    tag = build_bento(models, default=args.default)
    print(json.dumps({"bento": tag, "models": sorted(models)}))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from medcl.auth import add_key_to_file, default_key_file, read_key_file, revoke_key_in_file

    path = Path(args.file or os.environ.get("MEDCL_API_KEYS_FILE") or default_key_file())
    if args.action == "new":
        if not args.name:
            raise UsageError("keys new needs --name (who or what will use the key)")
        scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
        print(add_key_to_file(path, args.name, scopes))  # the key itself, alone on stdout: $(medcl keys new ...)
        print(f"medcl: key {args.name!r} ({', '.join(scopes)}) added to {path}; a running service picks it up "
              "within a second", file=sys.stderr)
    elif args.action == "revoke":
        if not args.name:
            raise UsageError("keys revoke needs --name")
        revoke_key_in_file(path, args.name)
        print(f"medcl: key {args.name!r} revoked in {path}", file=sys.stderr)
    else:
        entries = read_key_file(path) if path.exists() else []
        for e in entries:
            print(json.dumps({"name": e.name, "scopes": e.scopes}))
    return 0


def _client_call(args: argparse.Namespace, call: str) -> int:
    """predict / embed / segment: files in batches, one JSON line per file, in the order given."""
    from medcl.client import MedclClient

    files = [Path(f) for f in args.files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UsageError(f"no such file: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    with MedclClient(args.url, api_key=args.api_key, retries=args.retries) as client:
        for i in range(0, len(files), args.batch_size):
            batch = files[i:i + args.batch_size]
            if call == "classify":
                answers = client.classify(batch, top_k=args.top_k, model=args.model, pixel_size_um=args.pixel_size_um)
            elif call == "segment":
                answers = client.segment(batch, pixel_size_um=args.pixel_size_um, return_geojson=args.geojson,
                                         model=args.model, modality=args.modality)
            else:
                answers = client.embed(batch, model=args.model, pixel_size_um=args.pixel_size_um)
            for f, answer in zip(batch, answers):
                print(json.dumps({"file": str(f), **answer}), flush=True)
                if answer.get("in_distribution") is False:
                    print(f"medcl: {f} is out of distribution for {answer.get('model')} (ood_score "
                          f"{answer.get('ood_score')}): unlike its training images, do not trust its label",
                          file=sys.stderr, flush=True)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    return _client_call(args, "classify")


def cmd_embed(args: argparse.Namespace) -> int:
    return _client_call(args, "embed")


def cmd_segment(args: argparse.Namespace) -> int:
    return _client_call(args, "segment")


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    from bench.gpu import run_from_arguments

    result = run_from_arguments(args)
    print(json.dumps({"results": str(args.out.with_suffix(".md")), "gpu": result["device"].get("gpu")}))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.speed import SECTIONS, BenchOptions, run_bench
    from bench.speed_report import write_report

    unknown = [s for s in args.only if s not in SECTIONS]
    if unknown:
        raise UsageError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    options = BenchOptions(run=args.run, run_224=args.run_224, segmenter_run=args.segmenter_run, seconds=args.seconds,
                           concurrency=args.concurrency, tiles=args.tiles, sections=args.only or list(SECTIONS),
                           search_size=args.search_size, rounds=args.rounds, out=args.out)
    result = run_bench(options)
    write_report(result, options.out, options.command())
    print(json.dumps({"results": str(options.out.with_suffix(".md")), **result["headline"]}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medcl", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    default_port = int(os.environ.get("MEDCL_PORT", 3000))

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config", type=Path)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.label_fraction=0.1 (repeatable)")
    t.add_argument("--no-resume", action="store_true", help="start again even if a checkpoint exists")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    x_ = sub.add_parser("experiment", help="run a sweep (methods x label fractions x seeds) and write tables, "
                                          "plots and docs/results/summary.json")
    x_.add_argument("config", type=Path)
    x_.add_argument("--quiet", action="store_true", help="no progress bars")
    x_.add_argument("--fractions", type=float, nargs="+",
                    help="run only these label fractions of the config (their rows are added to the existing results)")
    x_.add_argument("--methods", nargs="+", help="run only these methods (labels) of the config")
    x_.add_argument("--tables-only", action="store_true",
                    help="train nothing: rewrite the results page and plot from the results JSON already there")
    x_.set_defaults(func=cmd_experiment)

    r = sub.add_parser("retrain", help="scheduled retraining: snapshot, train, export, gate, register, promote; "
                                       "exit 0 promoted, 3 champion kept, 4 unfinished (resumes), 5 locked, "
                                       "2 bad input, 1 failed")
    r.add_argument("--config", type=Path, required=True, help="retrain YAML (see configs/retrain-*.yaml)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a retrain config value, e.g. --set gate.max_drop=0.02 (repeatable)")
    r.add_argument("--force", action="store_true", help="retrain even if the data have not changed")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_retrain)

    dr = sub.add_parser("drift", help="compare a window of a running service's traffic with the model's training "
                                      "reference; exit 3 = drifted (retrain), 0 = not")
    dr.add_argument("--url", default=os.environ.get("MEDCL_URL", f"http://127.0.0.1:{default_port}"))
    dr.add_argument("--model", help="served model name (default: the first with a drift reference)")
    dr.add_argument("--window", type=float, default=0.0, metavar="SECONDS",
                    help="watch this long and judge that traffic only (default 0: everything since the service started)")
    dr.add_argument("--threshold", type=float, default=0.25, help="PSI above which a signal has shifted (default 0.25)")
    dr.add_argument("--min-images", type=int, default=200, help="no verdict on fewer images (default 200)")
    dr.set_defaults(func=cmd_drift)

    e = sub.add_parser("evaluate", help="evaluate a trained run on a split or a class-per-folder image tree")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--data", type=Path, help="an .npz with splits (default: the run's own data)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--images", type=Path, help="class-per-folder images, preprocessed by the card")
    e.add_argument("--alias", action="append", default=[], metavar="FOLDER=CLASS",
                   help="map a folder name to a class name, e.g. ig=immature_granulocyte")
    e.add_argument("--compact", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="export a trained run to an ONNX package (parity-checked)")
    x.add_argument("run_dir", type=Path)
    x.add_argument("--out", type=Path, required=True,
                   help="package folder (onnx), or the folder that receives NAME.mar (mar)")
    x.add_argument("--format", choices=["onnx", "mar"], default="onnx",
                   help="onnx: a package for the medcl service; mar: a TorchServe archive of the same model")
    x.add_argument("--parity-data", type=Path, help="real held-out images (folder or .npz) for the parity check")
    x.add_argument("--opset", type=int, default=17)
    x.add_argument("--tolerance", type=float, default=1e-4)
    x.add_argument("--variants", default="", metavar="fp16,int8",
                   help="also write reduced-precision variants, gated against fp32 on held-out images")
    x.add_argument("--tensorrt", choices=["off", "auto", "require"], default="off",
                   help="build a cached TensorRT engine: auto = where TensorRT runs, require = fail if it cannot")
    x.add_argument("--max-int8-drop", type=float, default=0.01,
                   help="largest accuracy or macro-F1 loss (fraction) an int8 model may have (default 0.01)")
    x.set_defaults(func=cmd_export)

    s = sub.add_parser("serve", help="serve a model package over HTTP (BentoML)")
    s.add_argument("--package", type=Path, help="package directory (default: MEDCL_PACKAGE or the demo)")
    s.add_argument("--model", help="serve from the model store: NAME (its champion), NAME@challenger or NAME:VERSION")
    s.add_argument("--models", help="serve several models: NAME=FOLDER_OR_STORE_REF,... (the first is the default; "
                                    "requests pick one with 'model')")
    s.add_argument("--port", type=int, default=default_port)
    s.add_argument("--host", default=os.environ.get("MEDCL_HOST", "127.0.0.1"))
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("models", help="the model store: list, show, register, promote, rollback, audit")
    m.add_argument("action", choices=["list", "show", "register", "promote", "rollback", "audit"])
    m.add_argument("target", nargs="?", help="PACKAGE_DIR (register), name:version (promote), name or "
                                             "name@alias (show), name (rollback)")
    m.add_argument("--alias", default="champion", choices=["champion", "challenger"])
    m.add_argument("--name", help="register under this model name (default: the card's name)")
    m.add_argument("--promote", action="store_true", help="with register: also point --alias at it")
    m.add_argument("--json", action="store_true", help="with list: JSON instead of a table")
    m.set_defaults(func=cmd_models)

    i = sub.add_parser("index", help="the similar-case index: build, search, reembed, stats "
                                     "(backend from MEDCL_INDEX, default embedded FAISS+SQLite)")
    i.add_argument("action", choices=["build", "search", "reembed", "stats"])
    i.add_argument("files", nargs="*", type=Path, help="search: query images")
    i.add_argument("--model", help="package dir or model-store ref (default: what `medcl serve` would serve)")
    i.add_argument("--data", help="build: a class-per-folder DIR, a MANIFEST.csv or FILE.npz[:split]")
    i.add_argument("--to", help="reembed: the new model (package dir or NAME:VERSION)")
    i.add_argument("--from", dest="from_version", help="reembed: the version to read (default: the current one)")
    i.add_argument("-k", type=int, default=10)
    for field in ("label", "case-id", "slide-id", "site", "date-from", "date-to"):
        i.add_argument(f"--{field}", help=f"search: filter on {field.replace('-', ' ')}")
    i.add_argument("--kind", choices=["auto", "flat", "hnsw", "ivf"], help="embedded backend's FAISS index kind")
    i.add_argument("--batch-size", type=int, default=256)
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    i.set_defaults(func=cmd_index)

    for name, func, text in (("predict", cmd_predict, "classify image files with a running service"),
                             ("embed", cmd_embed, "embed image files with a running service"),
                             ("segment", cmd_segment, "find nuclei in H&E (or fluorescence) tiles with a running service")):
        c = sub.add_parser(name, help=text + " (one JSON line per file)")
        c.add_argument("files", nargs="+", type=Path)
        c.add_argument("--url", default=os.environ.get("MEDCL_URL"), help="service URL (MEDCL_URL, default "
                                                                         "http://127.0.0.1:3000)")
        c.add_argument("--api-key", default=None, help="default: MEDCL_API_KEY")
        c.add_argument("--batch-size", type=int, default=4 if name == "segment" else 32)
        c.add_argument("--retries", type=int, default=3)
        c.add_argument("--model", help="which served model (default: the service's default for the task)")
        if name == "predict":
            c.add_argument("--top-k", type=int, default=3)
        if name in ("predict", "embed"):
            c.add_argument("--pixel-size-um", type=float, help="µm per pixel of the tiles: each is cut to the model's "
                                                               "field of view (models whose card records a pixel size)")
        if name == "segment":
            c.add_argument("--pixel-size-um", type=float, help="µm per pixel of the tiles (areas in µm², resampling)")
            c.add_argument("--geojson", action="store_true", help="include a GeoJSON FeatureCollection per tile")
            c.add_argument("--modality", choices=["auto", "brightfield", "fluorescence"], default="auto",
                           help="fluorescence images are inverted before the model (default: detected per image)")
        c.set_defaults(func=func)

    b = sub.add_parser("bento", help="build a Bento (bentoml build, offline) that carries the models it serves")
    b.add_argument("action", choices=["build"])
    b.add_argument("--models", required=True, help="NAME=PACKAGE_DIR,... (the first is the default)")
    b.add_argument("--default", help="the default model's name")
    b.set_defaults(func=cmd_bento)

    k = sub.add_parser("keys", help="API keys of the service: new (prints the key once), list, revoke")
    k.add_argument("action", choices=["new", "list", "revoke"])
    k.add_argument("--name")
    k.add_argument("--scopes", default="read", help="comma-separated: read, write, admin (default read)")
    k.add_argument("--file", help="key file (default: MEDCL_API_KEYS_FILE or MEDCL_HOME/api-keys.yaml)")
    k.set_defaults(func=cmd_keys)

    bn = sub.add_parser("bench", help="speed, side by side in one run: raw onnxruntime, PyTorch eager, the service "
                                      "over HTTP, TorchServe; segmentation per megapixel; case search")
    bn.add_argument("--run", type=Path, help="the small model's run (default: the demo classifier, trained if missing)")
    bn.add_argument("--run-224", type=Path, help="the 224 px model's run (default: configs/bench-resnet18-224.yaml)")
    bn.add_argument("--segmenter-run", type=Path, help="default: the demo nuclei segmenter")
    bn.add_argument("--seconds", type=float, default=8.0, help="measured seconds per cell (after warm-up)")
    bn.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    bn.add_argument("--tiles", type=int, default=8, help="images per batch-of-tiles request")
    bn.add_argument("--only", nargs="+", default=[], metavar="SECTION", help="demo, 224, segment, search (default: all)")
    bn.add_argument("--search-size", type=int, default=100_000, help="vectors in the case-search benchmark")
    bn.add_argument("--rounds", type=int, default=3,
                    help="paired, alternating re-measurements behind each headline ratio (0: read them from the grid)")
    bn.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="writes OUT.md, OUT.json, OUT.png")
    bn.set_defaults(func=cmd_bench)

    bg = sub.add_parser("bench-gpu", help="on a GPU: onnxruntime CUDA/TensorRT fp32 and fp16, PyTorch eager, "
                                          "and the service over HTTP, same models and images as `medcl bench`")
    bg.add_argument("--run", type=Path, help="the demo classifier's run (default: the demo's, trained if missing)")
    bg.add_argument("--run-224", type=Path, help="the 224 px model's run (default: configs/bench-resnet18-224.yaml)")
    bg.add_argument("--seconds", type=float, default=2.0, help="timing window per in-process cell")
    bg.add_argument("--service-seconds", type=float, default=4.0, help="timing window per HTTP cell")
    bg.add_argument("--no-service", action="store_true", help="in-process engines only")
    bg.add_argument("--no-engines", action="store_true", help="the service over HTTP only")
    bg.add_argument("--workers", type=int, nargs="+", default=[1],
                    help="API process counts to serve with (MEDCL_WORKERS), e.g. 1 4 8")
    bg.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="clients per HTTP cell")
    bg.add_argument("--out", type=Path, default=Path("docs/benchmarks-gpu"), help="writes OUT.json and OUT.md")
    bg.set_defaults(func=cmd_bench_gpu)

    d = sub.add_parser("demo", help="train the demo models if needed, then serve them (build-pcam: rebuild the "
                                    "carried PatchCamelyon model)")
    d.add_argument("action", choices=["prepare", "serve", "build-pcam"])
    d.add_argument("--force", action="store_true", help="retrain even if the demo package exists")
    d.add_argument("--data", type=Path, help="build-pcam: PatchCamelyon as DIR/{train,valid}/{0,1}/*.jpg")
    d.add_argument("--out", type=Path, help="build-pcam: where package/ and index/ go (default: demo/pcam)")
    d.add_argument("--runs", type=Path, help="build-pcam: training runs folder (default: MEDCL_HOME/runs)")
    d.add_argument("--steps", type=int, help="build-pcam: a shortened run of this many steps (for tests)")
    d.add_argument("--port", type=int, default=default_port)
    d.add_argument("--host", default=os.environ.get("MEDCL_HOST", "127.0.0.1"))
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("medcl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; the traceback only on request
        if os.environ.get("MEDCL_DEBUG"):
            raise
        expected = _is_user_error(e)
        kind = "error" if expected else f"unexpected {type(e).__name__}"
        print(f"medcl: {kind}: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2 if expected else 1


def _is_user_error(e: Exception) -> bool:
    from pydantic import ValidationError

    return isinstance(e, (MedclError, FileNotFoundError, NotADirectoryError, PermissionError, ValidationError))


if __name__ == "__main__":
    sys.exit(main())
