"""`medcl retrain` as a scheduler runs it: real BloodMNIST, a store, a running service following it.

One week's data is promoted; the same data again is a no-op; labels shuffled on purpose are refused
by the gate; the next week's data is killed mid-training, resumed, promoted, and its case index
re-embedded, while the service answers throughout; rollback brings back the champion and its index.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.conftest import ADMIN_KEY, DEMO_CONFIG, REPO_ROOT, running_service, shared

CLASSES = ["basophil", "eosinophil", "erythroblast", "immature_granulocyte", "lymphocyte", "monocyte",
           "neutrophil", "platelet"]


def _week(source: Path, out: Path, n: int, seed: int, shuffle_labels: bool = False) -> Path:
    """A week's data file: n training images of the real archive (the held-out split kept whole)."""
    with np.load(source) as z:
        rng = np.random.default_rng(seed)
        pick = rng.permutation(len(z["train_images"]))[:n]
        labels = z["train_labels"][pick]
        if shuffle_labels:
            labels = rng.permutation(labels)
        np.savez(out, train_images=z["train_images"][pick], train_labels=labels,
                 test_images=z["test_images"][:400], test_labels=z["test_labels"][:400])
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> dict:
    source = shared("bloodmnist", "bloodmnist.npz")
    root = tmp_path_factory.mktemp("lab")
    holdout = root / "holdout.npz"
    with np.load(source) as z:  # the fixed held-out set: 3,021 images of the official test split
        np.savez(holdout, train_images=z["val_images"][:8], train_labels=z["val_labels"][:8],
                 test_images=z["test_images"][400:], test_labels=z["test_labels"][400:])
    env = dict(os.environ, BENTOML_HOME=str(root / "store"), MEDCL_INDEX=f"embedded://{root / 'index'}",
               MEDCL_USER="scheduler")
    return {"root": root, "source": source, "holdout": holdout, "env": env}


def _config(lab: dict, data: Path | dict, name: str, **extra) -> Path:
    """A retrain config; ``data`` is a week's npz, or a whole data section."""
    config = {
        "model_name": "blood",
        "train_config": str(DEMO_CONFIG),
        "data": data if isinstance(data, dict) else {"name": "bloodmnist", "kind": "npz", "path": str(data),
                                                     "class_names": CLASSES},
        "holdout": {"kind": "npz", "path": str(lab["holdout"]), "split": "test"},
        "set": {"model": {"width": 16}, "schedule": {"steps": 40, "eval_every": 0, "checkpoint_every": 5,
                                                     "unlabelled_batch": 32, "max_minutes": None},
                "method": {"pseudo_warmup_steps": 20}},
        # Per-class recall on ~70-200 images a class moves by a few points between two equally good
        # models (binomial noise), so the class rule here is 8 points; the shuffled run loses far more.
        "gate": {"primary_metric": "macro_f1", "max_drop": 0.01, "max_class_recall_drop": 0.08},
        "work_dir": str(lab["root"] / "work"),
        "min_free_gb": 0.1,
    }
    for key, value in extra.items():
        config[key] = value
    path = lab["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _retrain(lab: dict, config: Path, *more: str) -> tuple[int, dict, str]:
    done = subprocess.run([sys.executable, "-m", "medcl.cli", "retrain", "--config", str(config), "--quiet", *more],
                          capture_output=True, text=True, timeout=600, env=lab["env"], cwd=REPO_ROOT)
    report = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
    return done.returncode, report, done.stderr


def _aliases(lab: dict) -> dict:
    done = subprocess.run([sys.executable, "-m", "medcl.cli", "models", "list", "--json"], capture_output=True,
                          text=True, timeout=120, env=lab["env"], cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    return {alias: row["tag"] for row in json.loads(done.stdout) for alias in row["aliases"]}


def _step(report: dict, name: str) -> dict:
    return next(s for s in report["steps"] if s["step"] == name)


@pytest.fixture(scope="module")
def first_champion(lab: dict) -> str:
    week1 = _week(lab["source"], lab["root"] / "week1.npz", 1500, seed=1)
    code, report, err = _retrain(lab, _config(lab, week1, "week1"))
    assert code == 0, (err, report.get("message"))
    assert report["outcome"] == "promoted" and _step(report, "train")["init_from"] == "scratch"
    return report["champion"]


def test_first_run_promotes_and_unchanged_data_is_a_no_op(lab: dict, first_champion: str) -> None:
    assert _aliases(lab)["champion"] == first_champion
    run = Path(lab["root"] / "work" / "blood" / "runs")
    manifest = json.loads(next(run.glob("*/manifest.json")).read_text())
    assert manifest["files"][0]["sha256"] and manifest["labelled_per_class"]["neutrophil"] > 0

    first_report = next(run.glob("*/report.json")).read_text()
    code, report, _ = _retrain(lab, lab["root"] / "week1.yaml")
    assert code == 3 and "have not changed" in report["message"]
    assert _aliases(lab)["champion"] == first_champion
    assert next(run.glob("*/report.json")).read_text() == first_report  # the finished run's record is kept


def test_shuffled_labels_are_refused_by_the_gate(lab: dict, first_champion: str) -> None:
    bad = _week(lab["source"], lab["root"] / "shuffled.npz", 1500, seed=2, shuffle_labels=True)
    code, report, _ = _retrain(lab, _config(lab, bad, "shuffled", warm_start="scratch"))
    assert code == 3, report.get("message")
    gate = _step(report, "gate")
    assert not gate["passed"] and any("fell" in r for r in gate["reasons"]), gate["reasons"]
    aliases = _aliases(lab)
    assert aliases["champion"] == first_champion  # nothing promoted
    assert aliases["challenger"] == report["challenger"] != first_champion  # kept for a person to look at


def test_a_killed_retrain_resumes_and_promotes_while_the_service_answers(lab: dict, first_champion: str) -> None:
    photo = sorted(shared("blood-photos").rglob("*.jpg"))[0]
    files = [("images", (photo.name, photo.read_bytes(), "image/jpeg"))]
    week2 = _week(lab["source"], lab["root"] / "week2.npz", 3000, seed=3)
    # Trained by 2 processes (torchrun, gloo): the kill takes down torchrun and both workers.
    # This test is about resuming and promoting under a live service, not the gate's sensitivity (the
    # shuffled-labels test checks that). 60 steps of a width-16 model leave per-class recall noisy: a
    # resumed run that is as good overall lost 8 points of lymphocyte recall on CI (0.938 -> 0.858),
    # so the class rule here allows 15 points and the macro-F1 rule 3; shuffled labels lose far more.
    config = _config(lab, week2, "week2", processes=2, set={
        "model": {"width": 16}, "schedule": {"steps": 60, "eval_every": 0, "checkpoint_every": 5,
                                             "unlabelled_batch": 32, "max_minutes": None},
        "method": {"pseudo_warmup_steps": 20}},
        gate={"primary_metric": "macro_f1", "max_drop": 0.03, "max_class_recall_drop": 0.15})
    service_env = {k: lab["env"][k] for k in ("BENTOML_HOME", "MEDCL_INDEX")}
    with running_service(None, lab["root"] / "svc", models="blood=blood", MEDCL_FOLLOW_SECONDS="1",
                         **service_env) as url:
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
        added = client.post("/cases", files=files * 3)
        assert added.status_code == 200, added.text
        first_version = added.json()["model_version"]

        failures: list[str] = []
        versions: set[str] = set()
        stop = threading.Event()

        def keep_asking() -> None:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as c:
                while not stop.is_set():
                    try:
                        r = c.post("/classify", files=files)
                        if r.status_code != 200:
                            failures.append(f"{r.status_code} {r.text[:200]}")
                        else:
                            versions.add(r.json()[0]["model_version"])
                    except httpx.HTTPError as e:
                        failures.append(repr(e))
                    time.sleep(0.05)

        asker = threading.Thread(target=keep_asking, daemon=True)
        asker.start()
        try:
            # Killed once a checkpoint is on disk: no clean-up code runs (SIGKILL).
            runs = lab["root"] / "work" / "blood" / "runs"
            before = set(runs.iterdir())
            proc = subprocess.Popen([sys.executable, "-m", "medcl.cli", "retrain", "--config", str(config), "--quiet"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=lab["env"],
                                    cwd=REPO_ROOT, start_new_session=True)
            deadline = time.time() + 300
            state = None
            while time.time() < deadline and proc.poll() is None:
                state = next((p for p in runs.glob("*/train/blood/checkpoint/trainer_state.json")
                              if p.parents[3] not in before), None)
                if state is not None and json.loads(state.read_text())["step"] >= 10:
                    break
                time.sleep(0.2)
            assert proc.poll() is None, "the retrain ended before it could be killed"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            assert _aliases(lab)["champion"] == first_champion  # nothing promoted from the partial run

            code, report, err = _retrain(lab, config)
            assert code == 0, (err, report.get("message"), report.get("steps"))
            assert _step(report, "snapshot")["resumed"]
            assert _step(report, "train")["resumed_from_step"] >= 10
            assert _step(report, "train")["init_from"] == first_champion
            assert _step(report, "train")["processes"] == 2
            new_champion = report["champion"]
            assert _aliases(lab)["champion"] == new_champion
            new_version = _step(report, "train")["version"]
            reembedded = _step(report, "reembed_index")
            assert reembedded["from"] == first_version and reembedded["to"] == new_version
            assert reembedded["cases"] == 3 and reembedded["not_reembedded"] == []

            deadline = time.time() + 30
            while new_version not in versions and time.time() < deadline:
                time.sleep(0.2)
        finally:
            stop.set()
            asker.join(timeout=60)
        assert new_version in versions and first_version in versions
        assert failures == []
        found = client.post("/search", files=files, data={"k": "3"})
        assert found.status_code == 200 and found.json()[0]["model_version"] == new_version
        assert len(found.json()[0]["hits"]) == 3

        # Rollback restores the champion and points the index back at its version.
        done = subprocess.run([sys.executable, "-m", "medcl.cli", "models", "rollback", "blood"], capture_output=True,
                              text=True, timeout=120, env=lab["env"], cwd=REPO_ROOT)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"alias": "champion", "now": first_champion, "index": first_version}
        deadline = time.time() + 30
        while time.time() < deadline:
            answer = client.post("/classify", files=files).json()[0]["model_version"]
            if answer == first_version:
                break
            time.sleep(0.3)
        assert answer == first_version
        assert client.post("/search", files=files, data={"k": "3"}).json()[0]["model_version"] == first_version


def test_a_second_run_waits_for_the_lock(lab: dict) -> None:
    config = _config(lab, lab["root"] / "week1.npz", "locked")
    lock = lab["root"] / "work" / "blood" / "retrain.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code, report, err = _retrain(lab, config)
    assert code == 5 and report["outcome"] == "locked"
    assert err.count("\n") == 1 and "another retrain holds" in err


def test_bad_data_stops_before_training_with_one_line(lab: dict, first_champion: str, tmp_path: Path) -> None:
    folder = tmp_path / "tiles"
    for name in CLASSES:
        (folder / name).mkdir(parents=True)
    (folder / "neutrophil" / "broken.png").write_bytes(b"not a png")
    config = _config(lab, {"name": "tiles", "kind": "folder", "path": str(folder)}, "broken")
    code, report, err = _retrain(lab, config)
    assert code == 2 and err.count("\n") == 1 and "class folder(s) without images: basophil" in err

    photo = sorted(shared("blood-photos").rglob("*.jpg"))[0]
    for name in CLASSES:
        (folder / name / "cell.jpg").write_bytes(photo.read_bytes())
    code, report, err = _retrain(lab, config)
    assert code == 2 and "unreadable image" in err and "broken.png" in err

    (folder / "neutrophil" / "broken.png").unlink()
    (folder / "band_cell").mkdir()
    (folder / "band_cell" / "cell.jpg").write_bytes(photo.read_bytes())
    code, report, err = _retrain(lab, config)
    assert code == 2 and "class list changed (added: ['band_cell']" in err
    assert _aliases(lab)["champion"] == first_champion


def test_the_crontab_line_runs_as_cron_would(lab: dict, first_champion: str, tmp_path: Path) -> None:
    """The weekly line of deploy/cron/medcl.crontab under /bin/sh, in a checkout-like folder whose
    `.venv/bin/medcl` is this interpreter and whose config is week 1's (unchanged data: exit 3)."""
    crontab = (REPO_ROOT / "deploy" / "cron" / "medcl.crontab").read_text().splitlines()
    jobs = [line for line in crontab if line.strip() and not line.startswith("#") and "=" not in line.split()[0]]
    assert len(jobs) == 2
    for line in jobs:
        fields = line.split()[:5]
        assert all(f == "*" or f.isdigit() for f in fields), line  # minute hour day month weekday
    weekly = next(line for line in jobs if "drift" not in line)
    command = " ".join(weekly.split()[5:])

    checkout = tmp_path / "medcl"
    (checkout / ".venv" / "bin").mkdir(parents=True)
    (checkout / "configs").mkdir()
    shim = checkout / ".venv" / "bin" / "medcl"
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO_ROOT}" exec "{sys.executable}" -m medcl.cli "$@"\n')
    shim.chmod(0o755)
    (checkout / "configs" / "retrain-bloodmnist.yaml").write_text((lab["root"] / "week1.yaml").read_text())
    env = {**lab["env"], "MEDCL_DIR": str(checkout), "SHELL": "/bin/sh"}
    done = subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr
    report = json.loads((checkout / "runs" / "retrain" / "weekly-report.json").read_text())
    assert report["outcome"] == "kept_champion" and "have not changed" in report["message"]


def test_the_cronjob_runs_the_real_command_with_a_valid_config() -> None:
    import shlex

    from medcl.cli import build_parser
    from training.retrain import RetrainConfig

    docs = {d["kind"]: d for d in yaml.safe_load_all(
        (REPO_ROOT / "deploy" / "kubernetes" / "retrain-cronjob.yaml").read_text())}
    job = docs["CronJob"]["spec"]
    assert job["concurrencyPolicy"] == "Forbid"
    pod = job["jobTemplate"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    script = container["args"][0]
    argv = shlex.split(script.split(";")[0])
    assert argv[0] == "medcl"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "retrain"
    assert "3|4|5) exit 0" in script  # normal outcomes are not failures; 1 and 2 are

    config = RetrainConfig.model_validate(yaml.safe_load(docs["ConfigMap"]["data"]["retrain.yaml"]))
    mounts = {v["mountPath"]: v for v in container["volumeMounts"]}
    assert str(args.config).startswith(next(m for m in mounts if "retrain" in m) + "/")
    assert (REPO_ROOT / Path(config.train_config).relative_to(container["workingDir"])).is_file()
    for path in (config.data.path, config.holdout.path, config.work_dir):
        assert any(path.startswith(m + "/") for m in mounts), path
    assert not mounts["/var/lib/medcl"].get("readOnly")
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["BENTOML_HOME"].startswith("/var/lib/medcl/") and env["MEDCL_INDEX"].startswith("embedded:///var/lib/medcl/")
