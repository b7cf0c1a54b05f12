"""The out-of-the-box demo: an S5CL blood-cell classifier trained by the project on real data.

Decision (issue 2): the project carries a 8.7 MB BloodMNIST subset (demo/bloodmnist-demo.npz,
CC BY 4.0, see demo/README.md) and trains on first run, rather than carrying trained weights:
the demo then proves the whole path (data -> training -> checkpoint -> ONNX -> service) on every
fresh machine. The run resumes if interrupted; once the package exists, later runs skip straight
to serving.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo-bloodmnist.yaml"
DEMO_DATA = REPO_ROOT / "demo" / "bloodmnist-demo.npz"
DEMO_NUCLEI_CONFIG = REPO_ROOT / "configs" / "demo-nuclei.yaml"
DEMO_HE_TILES = REPO_ROOT / "demo" / "he-tiles"
DEMO_PCAM_CONFIG = REPO_ROOT / "configs" / "demo-pcam.yaml"
DEMO_PCAM = REPO_ROOT / "demo" / "pcam"  # package/ (the trained model) and index/ (patches for /search)
PCAM_BUILD_COMMAND = "medcl demo build-pcam --data DIR"


def medcl_home() -> Path:
    return Path(os.environ.get("MEDCL_HOME", ".medcl")).resolve()


def demo_package_dir() -> Path:
    return medcl_home() / "packages" / "demo-bloodmnist"


def prepare_demo(force: bool = False) -> Path:
    """Train (or resume) and export the demo model unless its package already exists."""
    package = demo_package_dir()
    if (package / "card.json").is_file() and (package / "model.onnx").is_file() and not force:
        print(f"medcl: demo package ready at {package}", file=sys.stderr)
        return package
    if not DEMO_DATA.is_file():
        raise FileNotFoundError(f"demo data missing at {DEMO_DATA}; the repository is incomplete")
    from export.onnx_export import export_onnx
    from training.config import load_config
    from training.engine import train

    config = load_config(DEMO_CONFIG, {"output_dir": str(medcl_home() / "runs")})
    resume = not force and _checkpoint_matches(config)
    print(f"medcl: first run: training the demo model ({config.method.name}, {config.schedule.steps} steps, "
          f"budget {config.schedule.max_minutes} min) on {DEMO_DATA.name}", file=sys.stderr, flush=True)
    run_dir = train(config, resume=resume)
    print("medcl: exporting to ONNX and checking parity with PyTorch", file=sys.stderr, flush=True)
    return export_onnx(run_dir, package)


def demo_segmenter_dir() -> Path:
    return medcl_home() / "packages" / "demo-nuclei"


def prepare_demo_segmenter(force: bool = False) -> Path:
    """Train (self-supervised, on the carried CC BY H&E tiles) and export the demo nuclei segmenter
    unless its package exists."""
    package = demo_segmenter_dir()
    if (package / "card.json").is_file() and (package / "model.onnx").is_file() and not force:
        print(f"medcl: demo segmenter ready at {package}", file=sys.stderr)
        return package
    if not DEMO_HE_TILES.is_dir():
        raise FileNotFoundError(f"demo H&E tiles missing at {DEMO_HE_TILES}; the repository is incomplete")
    from export.onnx_export import export_onnx
    from training.nuclei import load_segmenter_config

    config = load_segmenter_config(DEMO_NUCLEI_CONFIG, {"output_dir": str(medcl_home() / "runs")})
    print(f"medcl: first run: training the demo nuclei segmenter (self-supervised, at most "
          f"{config.schedule.steps} steps) on {len(list(DEMO_HE_TILES.glob('*.png')))} CC BY H&E tiles",
          file=sys.stderr, flush=True)
    run_dir = train_checked_segmenter(config)
    return export_onnx(run_dir, package, parity_data=DEMO_HE_TILES)


DEMO_SEGMENTER_ATTEMPTS = 3


def train_checked_segmenter(config, attempts: int = DEMO_SEGMENTER_ATTEMPTS, progress: bool = True) -> Path:
    """Train; if the run fails its label-free self-check (its map floods its own training tiles or
    ignores their stain: training/nuclei.py ``self_check``), train again with the next seed, up to
    ``attempts`` runs. The first run that passes is served; if none does, the last is, set to answer
    every tile with the classical method (its card says so), so /segment never serves a broken map."""
    from medcl.card import Card
    from training.nuclei import train_segmenter

    run_dir = None
    for attempt in range(attempts):
        trial = config.model_copy(update={"seed": config.seed + attempt})
        run_dir = train_segmenter(trial, progress=progress)
        training = Card.load(run_dir).training
        if training.get("self_check_passed", True):
            return run_dir
        print(f"medcl: the segmenter trained with seed {trial.seed} failed its self-check (its map passes on "
              f"{training['self_check_pass_share']:.0%} of its training tiles; median coverage "
              f"{training['self_check_median_coverage']:.0%}, stain agreement "
              f"{training['self_check_median_agreement']:.2f})"
              + ("; training again with the next seed" if attempt + 1 < attempts else
                 "; serving the classical method's nuclei instead"), file=sys.stderr, flush=True)
    return run_dir


def fill_demo_index(package: Path) -> dict:
    """Index the demo's training split (labels as metadata) so /search answers on a fresh machine."""
    return _fill_index(package, f"{DEMO_DATA}:train", "the demo's train-split tiles")


def _fill_index(package: Path, data: str | Path, what: str) -> dict:
    """Index ``data`` with ``package``'s model; skipped when the index of this model version already
    holds as many cases (later runs start fast)."""
    from medcl.index.build import Embedder, build_index, items_from

    wanted = len(items_from(data))
    embedder = Embedder(package)
    index = embedder.open_index()
    try:
        if index.count() >= wanted:
            return {"cases": index.count(), "added": 0}
    finally:
        index.close()
    print(f"medcl: indexing {wanted} of {what} for /search", file=sys.stderr, flush=True)
    return build_index(embedder, data)


def demo_pcam_dir() -> Path:
    return medcl_home() / "packages" / "demo-pcam"


def prepare_demo_pcam() -> Path:
    """The histology demo model. Unlike the blood-cell demo it is not trained on first run (a 96 px
    model needs the full 6,000-patch training set, which the repository does not carry, and ~15
    minutes): the repository carries the package that ``medcl demo build-pcam`` produced. It is copied
    under MEDCL_HOME, so the service and its index never write into the repository."""
    import shutil

    from medcl.card import Card

    source = DEMO_PCAM / "package"
    if not (source / "card.json").is_file():
        raise FileNotFoundError(f"the PatchCamelyon demo package is missing at {source}; the repository is incomplete")
    target = demo_pcam_dir()
    if (target / "card.json").is_file() and Card.load(target).version == Card.load(source).version:
        return target
    staging = target.with_name(f".{target.name}-copy")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def fill_pcam_index(package: Path) -> dict:
    """Index the carried PatchCamelyon training patches (demo/pcam/index/<class>/) for /search."""
    return _fill_index(package, DEMO_PCAM / "index", "the PatchCamelyon training patches")


def build_pcam_demo(data: Path, out: Path = DEMO_PCAM, runs: Path | None = None, steps: int | None = None,
                    index_per_class: int = 500, progress: bool = True) -> Path:
    """Train configs/demo-pcam.yaml on ``data``/train (``data``/valid reports), export it to
    ``out``/package and copy a seeded, class-balanced sample of the training patches to ``out``/index.

    This is the command behind the carried package; ``steps`` shortens it (the test runs it so). The
    package leaves out the training weights (model.safetensors, 11 MB): it serves, but a scheduled
    retrain cannot warm-start from it."""
    import random
    import shutil

    from export.onnx_export import export_onnx
    from medcl.card import Card
    from medcl.errors import MedclError
    from training.config import load_config
    from training.engine import train

    data = Path(data)
    for part in ("train", "valid"):
        if not (data / part).is_dir():
            raise MedclError(f"{data} has no {part}/ folder (expected PatchCamelyon as {{train,valid}}/{{0,1}}/*.jpg)")
    overrides: dict = {"data.path": str((data / "train").resolve()), "data.test_path": str((data / "valid").resolve()),
                       "output_dir": str(Path(runs).resolve() if runs else medcl_home() / "runs")}
    if steps is not None:
        overrides.update({"schedule.steps": steps, "schedule.eval_every": 0, "name": f"demo-pcam-{steps}-steps"})
    config = load_config(DEMO_PCAM_CONFIG, overrides)
    run_dir = config.run_dir()
    if not _finished_run_of(config):
        run_dir = train(config, resume=True, progress=progress)  # an interrupted run of this config resumes
    card = Card.load(run_dir)
    card.training["built_by"] = PCAM_BUILD_COMMAND + (f" --steps {steps}" if steps is not None else "")
    card.save(run_dir)
    out = Path(out)
    package = export_onnx(run_dir, out / "package", parity_data=data / "valid")
    (package / "model.safetensors").unlink(missing_ok=True)
    index = out / "index"
    shutil.rmtree(index, ignore_errors=True)
    rng = random.Random(config.seed)
    for folder, name in zip(sorted(d.name for d in (data / "train").iterdir() if d.is_dir()), card.class_names):
        files = sorted((data / "train" / folder).glob("*.jpg"))
        (index / name).mkdir(parents=True)
        for f in sorted(rng.sample(files, min(index_per_class, len(files)))):
            shutil.copy2(f, index / name / f.name)
    return package


def _finished_run_of(config) -> bool:
    """A finished, evaluated run of exactly this config (evaluation included) sits in its run folder."""
    from medcl.card import Card

    card_file = config.run_dir() / "card.json"
    if not card_file.is_file() or not (config.run_dir() / "model.safetensors").is_file():
        return False
    card = Card.load(card_file)
    # the model factory fills in feature_dim before training takes the fingerprint
    filled = config.model_copy(update={"model": config.model.model_copy(
        update={"feature_dim": card.architecture.feature_dim})})
    return (card.training.get("config_fingerprint") == filled.fingerprint()
            and card.training.get("steps_done") == config.schedule.steps and card.architecture.test_time_augmentation
            == config.model.test_time_augmentation and card.preprocess == config.preprocess)


def _checkpoint_matches(config) -> bool:
    """Resume an interrupted demo run only if it was made by this demo config; else start afresh
    (a demo from an older version of the project must not block the new one)."""
    import json

    from training.checkpoint import STATE_FILENAME, find_training_checkpoint

    checkpoint = find_training_checkpoint(config.run_dir())
    if checkpoint is None:
        return False
    state = json.loads((checkpoint / STATE_FILENAME).read_text())
    return state.get("config_fingerprint") == config.fingerprint()
