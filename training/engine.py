"""One training loop for every method: seeded, resumable, with a progress bar.

A run writes into ``<output_dir>/<name>/``: ``checkpoint/`` while training (resumed from if the
config is unchanged), then ``model.safetensors`` + ``card.json`` (the checkpoint that export
reads), ``history.json``, ``metrics.json`` and figures.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medcl.card import Card, DataSpec
from medcl.errors import MedclError
from training.checkpoint import (find_training_checkpoint, load_training_checkpoint, load_weights,
                                 save_training_checkpoint, save_weights)
from training.config import DataConfig, TrainConfig
from training.distributed import ShardedForward, agree, barrier, from_environment, global_batchnorm
from training.data import (UNLABELLED, DataError, ImageSet, MPerClassSampler, RandomBatches, Splits, group_split,
                           label_subsample, read_csv_manifest, read_folder, read_npz, resize_images)
from training.methods import Batch, StepContext, create_method
from training.metrics import classification_metrics, knn_accuracy, macro_auroc, predict
from training.models import EncoderClassifier, create_model
from training.plots import confusion_matrix_plot, learning_curve


class StaleRunError(MedclError, RuntimeError):
    """The run folder holds a checkpoint of other settings: resuming it would mix two trainings."""


@dataclass
class TrainingData:
    labelled: ImageSet
    unlabelled: ImageSet | None
    val: ImageSet | None
    test: ImageSet
    fingerprint: str


def load_splits(config: DataConfig, spec, seed: int) -> Splits:
    """Train/val/test from any reader; folder and CSV sources get a seeded group-safe split."""
    if config.kind == "npz":
        splits = read_npz(config.path, config.class_names)
        if splits.train.images.shape[1] != spec.input_size:
            # e.g. 28 px MedMNIST at 224 (MedMNIST's own "ResNet (224)" setting): resized by the card's
            # preprocessing, exactly as the service resizes a 28 px upload
            for part in (splits.train, splits.val, splits.test):
                if part is not None:
                    part.images = resize_images(part.images, spec)
        return splits
    fixed_test = None
    if config.kind == "folder":
        everything, extra_unlabelled = read_folder(config.path, spec, config.class_names)
        if config.test_path:
            fixed_test, _ = read_folder(config.test_path, spec, config.class_names)
            if fixed_test.class_names != everything.class_names:
                raise DataError(f"{config.test_path} has classes {fixed_test.class_names} but {config.path} has "
                                f"{everything.class_names}")
    else:
        everything = read_csv_manifest(config.path, spec, config.path_column, config.label_column,
                                       config.group_column, config.class_names, config.path_template)
        extra_unlabelled = None
        if (everything.labels == UNLABELLED).any():
            extra_unlabelled = everything.subset(np.flatnonzero(everything.labels == UNLABELLED))
            everything = everything.subset(np.flatnonzero(everything.labels != UNLABELLED))
    if config.split_seed is not None:
        seed = config.split_seed
    if fixed_test is not None:
        train, test = everything, fixed_test
    else:
        train_idx, test_idx = group_split(everything.labels, everything.groups, config.test_fraction, seed)
        train, test = everything.subset(train_idx), everything.subset(test_idx)
    val = None
    if config.val_fraction > 0:
        tr, va = group_split(train.labels, train.groups, config.val_fraction, seed + 1)
        train, val = train.subset(tr), train.subset(va)
    return Splits(train=train, val=val, test=test, unlabelled=extra_unlabelled)


def prepare_data(config: TrainConfig) -> TrainingData:
    splits = load_splits(config.data, config.preprocess, config.seed)
    train = splits.train
    if config.data.max_train_images and len(train) > config.data.max_train_images:
        keep = label_subsample(train.labels, config.data.max_train_images / len(train), config.seed + 7)
        train = train.subset(keep)
    labelled_idx = label_subsample(train.labels, config.data.label_fraction, config.seed, train.groups)
    labelled = train.subset(labelled_idx)
    # S5CL's unlabelled set: the training images whose labels are withheld (all of them at 100%).
    rest = np.setdiff1d(np.arange(len(train)), labelled_idx)
    pool = train.subset(rest if len(rest) else np.arange(len(train)))
    if splits.unlabelled is not None:
        pool = ImageSet(np.concatenate([pool.images, splits.unlabelled.images]),
                        np.full(len(pool) + len(splits.unlabelled), UNLABELLED), pool.class_names)
    unlabelled = ImageSet(pool.images, np.full(len(pool), UNLABELLED), pool.class_names)
    return TrainingData(labelled=labelled, unlabelled=unlabelled, val=splits.val, test=splits.test,
                        fingerprint=train.fingerprint())


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def code_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medcl")
    except PackageNotFoundError:
        return "unknown"


def make_optimizer(config: TrainConfig, model: torch.nn.Module,
                   extra: list[torch.nn.Parameter] | None = None) -> torch.optim.Optimizer:
    o = config.optim
    params = [*model.parameters(), *(extra or [])]
    if o.name == "adamax":
        return torch.optim.Adamax(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay, momentum=0.9, nesterov=True)


def learning_rate(config: TrainConfig, step: int) -> float:
    if config.optim.schedule == "cosine":
        return 0.5 * config.optim.lr * (1 + math.cos(math.pi * min(step, config.schedule.steps) / config.schedule.steps))
    return config.optim.lr


def make_card(config: TrainConfig, data: TrainingData, version: str) -> Card:
    return Card(
        name=config.name,
        version=version,
        task="classify",
        method=config.method.name,
        architecture=config.model,
        class_names=data.labelled.class_names,
        preprocess=config.preprocess,
        data=DataSpec(name=config.data.name, kind=config.data.kind, path=config.data.path,
                      fingerprint=data.fingerprint, label_fraction=config.data.label_fraction,
                      n_labelled=len(data.labelled), n_unlabelled=len(data.unlabelled or []),
                      n_test=len(data.test)),
        training={"seed": config.seed, "steps": config.schedule.steps, "config_fingerprint": config.fingerprint(),
                  "optimizer": config.optim.name, "lr": config.optim.lr, "pretrained": config.pretrained,
                  "init_from": config.init_from},
        code_version=code_version(),
    )


def evaluate(model: EncoderClassifier, card: Card, data: TrainingData, split: ImageSet, knn_k: int) -> dict:
    logits, emb = predict(model, split.images, card.preprocess.mean, card.preprocess.std)
    metrics = classification_metrics(split.labels, logits.argmax(1), card.class_names)
    auroc = macro_auroc(split.labels, logits)
    if auroc is not None:
        metrics["macro_auroc"] = auroc
    _, bank = predict(model, data.labelled.images, card.preprocess.mean, card.preprocess.std)
    metrics["knn_accuracy"] = knn_accuracy(bank, data.labelled.labels, emb, split.labels, k=knn_k)
    return metrics


def train(config: TrainConfig, resume: bool = True, progress: bool = True) -> Path:
    """Train, evaluate on the test split, and write the checkpoint; returns the run directory."""
    sched = config.schedule
    group = from_environment()  # under torchrun: one process of several (training/distributed.py)
    world = group.world if group else 1
    main = group is None or group.main
    torch.set_num_threads(sched.threads or max(1, (os.cpu_count() or 1) // world))
    generator = seed_everything(config.seed)
    run_dir = config.run_dir()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)

    data = prepare_data(config)
    model = create_model(config.model, len(data.labelled.class_names), config.pretrained)
    if group:
        global_batchnorm(model)  # before the optimiser takes the parameters
    if config.init_from:
        try:
            load_weights(model, Path(config.init_from))
        except RuntimeError as e:  # shapes differ: another architecture or class count
            raise DataError(f"init_from {config.init_from} does not fit this model: {str(e).splitlines()[0]}") from None
    method = create_method(config.method)
    extra: list[torch.nn.Parameter] = []
    if hasattr(method, "prepare"):  # parameters of the method's own (a projection head), class statistics
        # the training set's size: labelled + unlabelled, except at 100% where the unlabelled stream
        # is the labelled images again
        unlabelled_count = len(data.unlabelled) if data.unlabelled is not None else 0
        if config.data.label_fraction >= 1.0:
            unlabelled_count = 0
        extra = method.prepare(model, torch.from_numpy(data.labelled.labels), len(data.labelled.class_names),
                               len(data.labelled) + unlabelled_count)
    optimizer = make_optimizer(config, model, extra)
    net = ShardedForward(model, group) if group else model  # what the method calls
    labelled_sampler = MPerClassSampler(data.labelled.labels, sched.labelled_batch, sched.m_per_class, config.seed)
    unlabelled_sampler = RandomBatches(len(data.unlabelled), sched.unlabelled_batch, config.seed + 1) \
        if method.uses_unlabelled and data.unlabelled is not None else None
    card = make_card(config, data, version="training")

    start_step, history, elapsed_before = 0, [], 0.0
    ckpt = find_training_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        state = load_training_checkpoint(ckpt, model, optimizer)
        if state.get("config_fingerprint") != config.fingerprint():
            raise StaleRunError(f"{run_dir} holds a run of a different config; use a new name or --no-resume")
        start_step, history, elapsed_before = state["step"], state["history"], state["elapsed_s"]
        labelled_sampler.set_state(state["labelled_sampler"])
        if unlabelled_sampler is not None:
            unlabelled_sampler.set_state(state["unlabelled_sampler"])
        generator.set_state(torch.tensor(state["torch_generator"], dtype=torch.uint8))
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))

    labelled_images = torch.from_numpy(data.labelled.images)
    labelled_labels = torch.from_numpy(data.labelled.labels)
    unlabelled_images = torch.from_numpy(data.unlabelled.images) if data.unlabelled is not None else None

    def checkpoint(step: int) -> None:
        if not main:
            return
        save_training_checkpoint(run_dir, model, optimizer, card, {
            "step": step, "history": history, "elapsed_s": elapsed_before + (time.time() - t0),
            "config_fingerprint": config.fingerprint(),
            "labelled_sampler": labelled_sampler.state(),
            "unlabelled_sampler": unlabelled_sampler.state() if unlabelled_sampler is not None else None,
            "torch_generator": generator.get_state().tolist(), "torch_rng": torch.get_rng_state().tolist(),
        })

    t0 = time.time()
    stopped_early = False
    net.train()
    bar = tqdm(range(start_step, sched.steps), initial=start_step, total=sched.steps, desc=config.name,
               unit="step", disable=not (progress and main), dynamic_ncols=True)
    step = start_step
    for step in bar:
        li = labelled_sampler.next_batch()
        ui = unlabelled_sampler.next_batch() if unlabelled_sampler is not None else None
        batch = Batch(labelled=labelled_images[li], labels=labelled_labels[li],
                      unlabelled=unlabelled_images[ui] if ui is not None else None)
        ctx = StepContext(step=step, generator=generator, augment=config.augment, preprocess=config.preprocess,
                          total_steps=sched.steps)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        terms = method.loss_terms(net, batch, ctx)
        loss = torch.stack(list(terms.values())).sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}: lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        row = {"step": step + 1, "loss": loss.item(), **{k: v.item() for k, v in terms.items()}}
        history.append(row)
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k != "step"})
        if main and sched.eval_every and (step + 1) % sched.eval_every == 0 and data.val is not None:
            logits, _ = predict(model, data.val.images, config.preprocess.mean, config.preprocess.std)
            history.append({"step": step + 1, "val_accuracy": float((logits.argmax(1) == data.val.labels).mean())})
        out_of_time = bool(sched.max_minutes) and (elapsed_before + time.time() - t0) > sched.max_minutes * 60
        if group:
            out_of_time = agree(out_of_time)  # each process has its own clock; all stop together
        if (step + 1) % sched.checkpoint_every == 0 or step + 1 == sched.steps or out_of_time:
            checkpoint(step + 1)
        if out_of_time:
            stopped_early = True
            break
    bar.close()
    steps_done = step + 1 if sched.steps > start_step else start_step
    train_seconds = elapsed_before + (time.time() - t0)
    if not main:  # the main process evaluates and writes the run; the others wait for it
        barrier()
        return run_dir

    metrics = evaluate(model, card, data, data.test, sched.knn_k)
    version = f"{config.name}-{datetime.now(timezone.utc):%Y%m%d%H%M%S}"
    card = make_card(config, data, version)
    card.metrics = {k: v for k, v in metrics.items()}
    card.training.update({"steps_done": steps_done, "train_seconds": round(train_seconds, 1),
                          "stopped_on_time_budget": stopped_early, "processes": world})
    save_weights(model, run_dir)
    write_drift_reference(model, card, data, run_dir, config.seed)
    card.save(run_dir)
    (run_dir / "history.json").write_text(json.dumps(history))
    (run_dir / "metrics.json").write_text(json.dumps({"test": metrics, "train_seconds": train_seconds,
                                                      "steps_done": steps_done}, indent=2))
    learning_curve(history, run_dir / "learning_curve.png", f"{config.name} ({config.method.name})")
    confusion_matrix_plot(metrics["confusion_matrix"], card.class_names, run_dir / "confusion_matrix.png",
                          f"{config.name}: test accuracy {metrics['accuracy']:.3f}")
    if group:
        barrier()
    return run_dir


def write_drift_reference(model: EncoderClassifier, card: Card, data: TrainingData, run_dir: Path, seed: int) -> None:
    """What in-distribution traffic looks like to this model (medcl/drift.py): a sample of training
    embeddings, and the held-out images' confidences and distances to it. With a validation split, the
    card's out-of-distribution threshold is set on the validation images' distances (never the test's)."""
    from medcl.card import OodSpec
    from medcl.drift import OOD_QUANTILE, REFERENCE_SAMPLE, build_reference, nearest_distance, ood_threshold, \
        save_reference

    pool = data.labelled.images if data.unlabelled is None else np.concatenate([data.labelled.images,
                                                                                 data.unlabelled.images])
    pick = np.random.default_rng(seed).permutation(len(pool))[:REFERENCE_SAMPLE]
    sample = pool[np.sort(pick)]
    _, train_emb = predict(model, sample, card.preprocess.mean, card.preprocess.std)
    logits, emb = predict(model, data.test.images, card.preprocess.mean, card.preprocess.std)
    reference = build_reference(train_emb, logits, emb, seed, train_pixels=sample)
    save_reference(reference, run_dir)
    if data.val is not None and len(data.val):
        _, val_emb = predict(model, data.val.images, card.preprocess.mean, card.preprocess.std)
        distance = nearest_distance(val_emb, reference.train_embeddings)
        image_distance = reference.image_distance(data.val.images)
        card.ood = OodSpec(threshold=round(ood_threshold(distance), 6),
                           image_threshold=round(ood_threshold(image_distance), 4),
                           image_score=reference.statistics.name,
                           quantile=OOD_QUANTILE, images=len(distance))


def load_trained(run_dir: str | Path) -> tuple[EncoderClassifier, Card]:
    """A finished run's model and card (what ``medcl export`` and ``medcl evaluate`` read)."""
    run_dir = Path(run_dir)
    card = Card.load(run_dir)
    model = create_model(card.architecture, card.num_classes)
    load_weights(model, run_dir)
    model.eval()
    return model, card
