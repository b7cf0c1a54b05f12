"""`medcl retrain --config FILE`: from the data on disk to a gated, exported, registered and (if it
earns it) promoted model, safe to run from a scheduler.

Steps: lock -> preflight (disk, data, classes, held-out set) -> snapshot (manifest of content hashes)
-> train the challenger (warm start from the champion, or from scratch) -> export with the parity
checks -> evaluate challenger and champion on the same held-out set -> gate -> register (alias
``challenger``) -> re-embed the case index -> promote (alias ``champion``).

A run lives in ``<work_dir>/<model>/runs/<key>/`` where the key hashes the data manifest and the
training config: run the command again after a crash and it resumes the same run (training from its
last checkpoint); run it again on unchanged data after a finished run and it does nothing. Nothing
is promoted unless every step before promotion finished in this run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from enum import IntEnum
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from medcl.errors import MedclError
from training.config import DataConfig, TrainConfig, load_config, read_config_yaml, resolve_path, validate_config
from training.gate import GateConfig
from training.snapshot import HoldoutConfig


class Outcome(IntEnum):
    """The exit code a scheduler reads."""

    PROMOTED = 0  # a new champion
    FAILED = 1  # a step failed unexpectedly; nothing promoted; the next run resumes
    BAD_INPUT = 2  # config, data, classes, disk: fix and run again; nothing trained
    KEPT_CHAMPION = 3  # the gate refused the challenger, or the data have not changed since the last run
    UNFINISHED = 4  # training stopped on its time budget; the next run resumes it; nothing promoted
    LOCKED = 5  # another retrain of this model is running; nothing done


class RetrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")  # the name in the model store and in the index
    train_config: str  # method, model, preprocessing, schedule (its data section is replaced by `data`)
    data: DataConfig | None = None  # where this week's images are; default: the training config's data
    holdout: HoldoutConfig
    warm_start: Literal["champion", "scratch"] = "champion"
    set: dict[str, Any] = {}  # overrides of the training config, e.g. {schedule.steps: 300}
    gate: GateConfig = GateConfig()
    work_dir: str = "runs/retrain"
    min_free_gb: float = Field(default=1.0, ge=0.0)
    # Held-out images that are pixel-identical to training images; MedMNIST itself has a few.
    max_holdout_overlap: float = Field(default=0.01, ge=0.0, le=1.0)
    reembed_index: bool = True
    export_tolerance: float = Field(default=1e-4, gt=0.0)
    # >1: the training step runs under torchrun with this many processes (training/distributed.py)
    processes: int = Field(default=1, ge=1, le=64)


class RetrainError(MedclError, ValueError):
    """The run cannot start as configured; the message says what to fix."""


class Locked(RuntimeError):
    pass


def load_retrain_config(path: str | os.PathLike[str], overrides: dict | None = None) -> RetrainConfig:
    raw = read_config_yaml(path, overrides)
    base = Path(path).parent
    if "train_config" in raw:
        raw["train_config"] = str(resolve_path(base, raw["train_config"]))
    for section in ("data", "holdout"):
        if isinstance(raw.get(section), dict) and "path" in raw[section]:
            raw[section]["path"] = str(resolve_path(base, raw[section]["path"]))
    raw["work_dir"] = str(resolve_path(base, raw.get("work_dir", "runs/retrain")))
    return validate_config(RetrainConfig, raw, path)


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """An advisory lock held for the whole run; the kernel drops it when the process dies, so a crash
    never leaves a stale lock behind."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise Locked(f"another retrain holds {lock_path} ({f.read().strip() or 'no details'})") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} since {_now()}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()


def _dotted(tree: dict, prefix: str = "") -> dict:
    """{"schedule": {"steps": 5}} and {"schedule.steps": 5} alike -> {"schedule.steps": 5}: an override
    changes one value, never replaces a whole section."""
    flat: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


class Retrain:
    """One invocation. ``run()`` returns the outcome; ``report`` is what happened, step by step."""

    def __init__(self, config: RetrainConfig, progress: bool = True, force: bool = False) -> None:
        self.config = config
        self.progress = progress
        self.force = force
        self.home = Path(config.work_dir) / config.model_name
        self.report: dict[str, Any] = {"model": config.model_name, "started": _now(), "steps": []}
        self.state: dict[str, Any] = {}
        self.run_dir: Path | None = None

    # -- the whole run ---------------------------------------------------------------------------
    def run(self) -> Outcome:
        from medcl.model_store import StoreError
        from training.config import ConfigError
        from training.data import DataError

        try:
            with exclusive(self.home / "retrain.lock"):
                outcome = self._steps()
        except Locked as e:
            outcome = self._end(Outcome.LOCKED, str(e))
        except (RetrainError, DataError, ConfigError, StoreError, FileNotFoundError) as e:
            outcome = self._end(Outcome.BAD_INPUT, str(e).splitlines()[0])
        except Exception as e:  # noqa: BLE001 - reported, with the step it happened in; nothing promoted
            outcome = self._end(Outcome.FAILED, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return outcome

    def _end(self, outcome: Outcome, message: str) -> Outcome:
        self.report.update({"outcome": outcome.name.lower(), "exit_code": int(outcome), "message": message,
                            "finished": _now()})
        if self.run_dir is not None:
            if outcome in (Outcome.PROMOTED, Outcome.KEPT_CHAMPION):
                self.state["status"] = "done"
                # Judged: the resumable trainer state (weights + optimiser) is no longer needed.
                shutil.rmtree(self.run_dir / "train" / self.config.model_name / "checkpoint", ignore_errors=True)
            self.state["outcome"] = outcome.name.lower()
            _write_json(self.run_dir / "state.json", self.state)
            _write_json(self.run_dir / "report.json", self.report)
        if self.home.is_dir() and outcome is not Outcome.LOCKED:  # the running one will write its own
            _write_json(self.home / "last-report.json", self.report)
        return outcome

    @contextmanager
    def _step(self, name: str) -> Iterator[dict]:
        entry: dict[str, Any] = {"step": name, "status": "running"}
        self.report["steps"].append(entry)
        t0 = time.time()
        try:
            yield entry
            entry["status"] = entry.get("status_override", "done")
            entry.pop("status_override", None)
        except BaseException as e:
            entry["status"] = "failed"
            entry["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise
        finally:
            entry["seconds"] = round(time.time() - t0, 2)

    def _steps(self) -> Outcome:
        from medcl import model_store

        config = self.config
        with self._step("preflight") as step:
            train_config, champion, data, holdout = self._preflight(step)
        with self._step("snapshot") as step:
            key = self._open_run(train_config, data, holdout, step)
            if self.state.get("status") == "done" and not self.force:
                step["status_override"] = "skipped"
                self.run_dir = None  # that run's own state and report stay as they were
                return self._end(Outcome.KEPT_CHAMPION,
                                 f"the data and training config have not changed since run {key} "
                                 f"(outcome: {self.state.get('outcome')}); nothing to do (--force retrains anyway)")
        train_config = self._with_start_point(train_config, champion)
        with self._step("train") as step:
            finished = self._train(train_config, step)
        if not finished:
            return self._end(Outcome.UNFINISHED, "training stopped on its time budget (schedule.max_minutes); "
                                                 "run again to resume; nothing promoted")
        with self._step("export") as step:
            package = self._export(train_config.run_dir(), step)
        with self._step("evaluate") as step:
            from training.gate import evaluate_package

            challenger_scores = evaluate_package(package, holdout)
            champion_now = self._champion()  # the champion at judging time (a person may have promoted meanwhile)
            champion_scores = evaluate_package(champion_now[1], holdout) if champion_now else None
            step.update({"challenger": challenger_scores, "champion": champion_scores,
                         "champion_tag": champion_now[0] if champion_now else None})
        with self._step("gate") as step:
            from training.gate import decide

            passed, reasons = decide(config.gate, challenger_scores, champion_scores)
            step.update({"passed": passed, "reasons": reasons, "rule": config.gate.model_dump()})
        with self._step("register") as step:
            tag = self._register(package, step)
            model_store.promote(tag, "challenger")
        self.report["challenger"] = tag
        if not passed:
            return self._end(Outcome.KEPT_CHAMPION, "gate refused the challenger: " + "; ".join(reasons))
        with self._step("reembed_index") as step:
            self._reembed(package, champion_now, step)
        with self._step("promote") as step:
            previous = model_store.promote(tag, "champion")
            step.update({"champion": tag, "previous": previous})
        self.report["champion"] = tag
        return self._end(Outcome.PROMOTED, f"{tag} is the new champion (was {previous})")

    # -- steps -----------------------------------------------------------------------------------
    def _champion(self) -> tuple[str, Path] | None:
        from medcl import model_store

        tag = model_store.aliases_of(self.config.model_name).get("champion")
        return (tag, model_store.resolve(tag)) if tag else None

    def _preflight(self, step: dict):
        from medcl.card import Card
        from training.snapshot import image_digests, load_holdout, load_training_data

        config = self.config
        for where in (self.home, Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))):
            where.mkdir(parents=True, exist_ok=True)
            free_gb = shutil.disk_usage(where).free / 1e9
            if free_gb < config.min_free_gb:
                raise RetrainError(f"only {free_gb:.1f} GB free at {where}; min_free_gb is {config.min_free_gb}")
        overrides = _dotted(config.set)
        if config.data is not None:
            overrides["data"] = config.data.model_dump()
        train_config = load_config(config.train_config, overrides)
        champion = self._champion()
        step["champion"] = champion[0] if champion else None
        data = load_training_data(train_config.data, train_config.preprocess)
        names = data.images.class_names
        if champion:
            before = Card.load(champion[1]).class_names
            if before != names:
                added = [n for n in names if n not in before]
                removed = [n for n in before if n not in names]
                raise RetrainError(f"the class list changed (added: {added or 'none'}, removed: {removed or 'none'}"
                                   f"{', order differs' if not added and not removed else ''}); a model with other "
                                   "classes is a new model: give it another model_name")
        if len(data.images) == 0:
            raise RetrainError(f"no labelled images in {train_config.data.path}")
        holdout = load_holdout(config.holdout, train_config.preprocess, names)
        shared = len(image_digests(holdout.images) & image_digests(data.images.images))
        if shared / len(holdout) > config.max_holdout_overlap:
            raise RetrainError(f"{shared} of {len(holdout)} held-out images are also in the training data "
                               f"(max_holdout_overlap {config.max_holdout_overlap}); the gate would be judged on "
                               "images the challenger trained on")
        step.update({"labelled": len(data.images), "unlabelled": data.n_unlabelled, "classes": len(names),
                     "holdout": len(holdout), "holdout_images_also_in_training": shared})
        return train_config, champion, data, holdout

    def _open_run(self, train_config: TrainConfig, data, holdout, step: dict) -> str:
        from training.snapshot import holdout_file_list, manifest

        roots = [Path(train_config.data.path).parent, Path(self.config.holdout.path).parent]
        snapshot = manifest(data, holdout_file_list(self.config.holdout, holdout), roots)
        recipe = train_config.model_copy(update={"init_from": None, "name": self.config.model_name}).fingerprint()
        key = hashlib.sha256(f"{snapshot['digest']}|{recipe}|{self.config.warm_start}".encode()).hexdigest()[:12]
        runs = self.home / "runs"
        run_dir = runs / key
        state_path = run_dir / "state.json"
        self.state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        resumed = self.state.get("status") == "running"
        if self.force and self.state.get("status") == "done":
            run_dir, self.state = runs / f"{key}-{datetime.now(timezone.utc):%Y%m%d%H%M%S}", {}
        if not self.state:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.state = {"key": key, "status": "running", "created": _now(), "data_digest": snapshot["digest"]}
            _write_json(run_dir / "manifest.json", snapshot)
        for other in runs.iterdir() if runs.is_dir() else []:  # unfinished runs on other data: never resumed
            other_state = other / "state.json"
            if other != run_dir and other_state.is_file():
                s = json.loads(other_state.read_text())
                if s.get("status") == "running":
                    s["status"] = "abandoned"
                    _write_json(other_state, s)
                    shutil.rmtree(other / "train" / self.config.model_name / "checkpoint", ignore_errors=True)
        self.run_dir = run_dir
        self.report.update({"run": str(run_dir), "data_digest": snapshot["digest"]})
        step.update({"run": run_dir.name, "files": len(snapshot["files"]), "resumed": resumed,
                     "labelled_per_class": snapshot["labelled_per_class"]})
        _write_json(run_dir / "state.json", self.state)
        return key

    def _with_start_point(self, train_config: TrainConfig, champion: tuple[str, Path] | None) -> TrainConfig:
        """Where training starts, fixed when the run starts: a resumed run keeps its first start point
        even if the champion changed meanwhile (its checkpoints belong to that start)."""
        if "init_from" not in self.state:
            warm = self.config.warm_start == "champion" and champion is not None
            if warm and not (champion[1] / "model.safetensors").is_file():
                raise RetrainError(f"champion {champion[0]} carries no training weights (model.safetensors; "
                                   "packages exported before this version lack them): set warm_start: scratch")
            self.state["init_from"] = str(champion[1]) if warm else None
            self.state["init_from_tag"] = champion[0] if warm else None
            _write_json(self.run_dir / "state.json", self.state)
        assert self.run_dir is not None
        return train_config.model_copy(update={"init_from": self.state["init_from"],
                                               "name": self.config.model_name,
                                               "output_dir": str(self.run_dir / "train")})

    def _train(self, train_config: TrainConfig, step: dict) -> bool:
        from medcl.card import Card
        from training.checkpoint import find_training_checkpoint
        from training.engine import train

        run_dir = train_config.run_dir()
        step["init_from"] = self.state.get("init_from_tag") or "scratch"
        if (run_dir / "metrics.json").is_file() and Card.load(run_dir).training.get("steps_done") == \
                train_config.schedule.steps:
            step["status_override"] = "skipped"
            step["reason"] = "trained before an interruption"
            return True
        ckpt = find_training_checkpoint(run_dir)
        step["resumed_from_step"] = json.loads((ckpt / "trainer_state.json").read_text())["step"] if ckpt else 0
        if self.config.processes > 1:
            self._train_distributed(train_config, step)
        else:
            train(train_config, resume=True, progress=self.progress)
        card = Card.load(run_dir)
        step.update({"steps_done": card.training.get("steps_done"), "steps": train_config.schedule.steps,
                     "train_seconds": card.training.get("train_seconds"), "version": card.version})
        return not card.training.get("stopped_on_time_budget") and \
            card.training.get("steps_done") == train_config.schedule.steps

    def _train_distributed(self, train_config: TrainConfig, step: dict) -> None:
        """`medcl train` under torchrun on the exact config of this run (written beside it, all paths absolute)."""
        import subprocess
        import sys

        import yaml

        assert self.run_dir is not None
        config_file = self.run_dir / "train-config.yaml"
        config_file.write_text(yaml.safe_dump(train_config.model_dump(mode="json"), sort_keys=False))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={self.config.processes}", "-m", "medcl.cli", "train", str(config_file)]
        if not self.progress:
            cmd.append("--quiet")
        step["processes"] = self.config.processes
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=None if self.progress else subprocess.PIPE,
                              text=True)
        if done.returncode != 0:
            tail = (done.stderr or "").strip().splitlines()
            raise RuntimeError(f"torchrun training exited {done.returncode}: {tail[-1] if tail else 'see its output'}")

    def _export(self, trained: Path, step: dict) -> Path:
        from export.onnx_export import export_onnx
        from medcl.card import Card

        assert self.run_dir is not None
        package = self.run_dir / "package"
        version = Card.load(trained).version
        if (package / "card.json").is_file() and Card.load(package).onnx and Card.load(package).version == version:
            step["status_override"] = "skipped"
        else:
            holdout = self.config.holdout
            parity = holdout.path if holdout.kind in ("npz", "folder") else None
            export_onnx(trained, package, parity_data=parity, tolerance=self.config.export_tolerance)
        step.update({"package": str(package), "version": version, "parity": Card.load(package).onnx.parity})
        return package

    def _register(self, package: Path, step: dict) -> str:
        import bentoml

        from medcl import model_store
        from medcl.card import Card

        version = Card.load(package).version
        tag = f"{self.config.model_name}:{model_store._store_name(version)}"
        try:
            bentoml.models.get(tag)
            step["status_override"] = "skipped"  # registered before an interruption
        except bentoml.exceptions.NotFound:
            tag = model_store.register(package, name=self.config.model_name)
        step["tag"] = tag
        return tag

    def _reembed(self, package: Path, champion: tuple[str, Path] | None, step: dict) -> None:
        from medcl.card import Card
        from medcl.index import current_version, open_index, stored_dim
        from medcl.index.build import Embedder, reembed
        from medcl.index.schema import CaseIndexError

        # The index to carry over is the champion's: the service adds cases to the index of the version
        # it serves (under the card's name, which may predate model_name).
        if champion:
            old_card = Card.load(champion[1])
            name, old_version = old_card.name, old_card.version
        else:
            name = self.config.model_name
            old_version = current_version(name)
        if not self.config.reembed_index or old_version is None:
            step["status_override"] = "skipped"
            step["reason"] = "re-embedding off in the config" if not self.config.reembed_index \
                else f"no case index for {name}"
            return
        embedder = Embedder(package)
        if old_version == embedder.card.version:
            step["status_override"] = "skipped"
            step["reason"] = "the index is already of this version"
            return
        try:
            old = open_index(name, old_version, stored_dim(name, old_version))
        except CaseIndexError as e:
            step["status_override"] = "skipped"
            step["reason"] = str(e)
            return
        try:
            step.update(reembed(old, embedder, progress=self.progress))
            # Catch-up pass just before promotion: cases the service added while the first pass ran
            # (only ids not yet in the new index are embedded).
            caught_up = reembed(old, embedder, progress=False)
            step["cases"] = caught_up["cases"]
        finally:
            old.close()


def retrain(config_path: str | os.PathLike[str], overrides: dict | None = None, progress: bool = True,
            force: bool = False) -> tuple[Outcome, dict]:
    """Run one retrain; returns the outcome (= exit code) and the report."""
    try:
        config = load_retrain_config(config_path, overrides)
    except MedclError as e:
        return Outcome.BAD_INPUT, {"outcome": "bad_input", "exit_code": int(Outcome.BAD_INPUT), "message": str(e)}
    job = Retrain(config, progress=progress, force=force)
    outcome = job.run()
    return outcome, job.report
