"""Training methods: each turns one batch into named loss terms; the engine sums and logs them.

A method sees uint8 image batches and makes its own views, so adding SRCL or SWCL later means
adding a class here, not changing the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from medcl.card import PreprocessSpec
from training.augment import AugmentSpec, standardise, strong_view, weak_view
from training.config import MethodConfig
from training.losses import positives_from_labels, positives_from_views, s5cl_pseudo_positives, supcon
from training.models import EncoderClassifier


@dataclass
class Batch:
    labelled: torch.Tensor  # uint8 (B_l, H, W, 3)
    labels: torch.Tensor  # int64 (B_l,)
    unlabelled: torch.Tensor | None  # uint8 (B_u, H, W, 3)


@dataclass
class StepContext:
    step: int
    generator: torch.Generator
    augment: AugmentSpec
    preprocess: PreprocessSpec


class Method(Protocol):
    name: str
    uses_unlabelled: bool

    def loss_terms(self, model: EncoderClassifier, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]: ...


def _views(images: torch.Tensor, ctx: StepContext, kinds: tuple[str, ...]) -> list[torch.Tensor]:
    make = {"weak": weak_view, "strong": strong_view}
    return [standardise(make[k](images, ctx.augment, ctx.generator), ctx.preprocess.mean, ctx.preprocess.std)
            for k in kinds]


class CrossEntropy:
    """The baseline: cross-entropy of the classifier on a weak view of the labelled images."""

    name = "cross_entropy"
    uses_unlabelled = False

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    def loss_terms(self, model: EncoderClassifier, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        (weak,) = _views(batch.labelled, ctx, ("weak",))
        logits, _ = model(weak)
        return {"ce": F.cross_entropy(logits, batch.labels)}


class SupCon:
    """Supervised contrastive baseline: L_l (same class, tau_l) on two views + cross-entropy."""

    name = "supcon"
    uses_unlabelled = False

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    def loss_terms(self, model: EncoderClassifier, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        weak, strong = _views(batch.labelled, ctx, ("weak", "strong"))
        logits, emb = model(torch.cat([weak, strong]))
        b = batch.labels.shape[0]
        labels2 = batch.labels.repeat(2)
        return {
            "ce": F.cross_entropy(logits[:b], batch.labels),
            "supcon_labelled": supcon(emb, positives_from_labels(labels2), self.config.tau_labelled),
        }


class S5CL:
    """S5CL (Tran et al., MICCAI 2022): L = L_l + (L_u, then L_p after warm-up) + L_c.

    One forward pass over [labelled weak, labelled strong, unlabelled weak, unlabelled strong]
    so batch-norm statistics see all streams, as in a single-stage method.
    """

    name = "s5cl"
    uses_unlabelled = True

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    def loss_terms(self, model: EncoderClassifier, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        if batch.unlabelled is None:
            raise ValueError("S5CL needs an unlabelled stream")
        cfg = self.config
        bl, bu = batch.labels.shape[0], batch.unlabelled.shape[0]
        views = _views(batch.labelled, ctx, ("weak", "strong")) + _views(batch.unlabelled, ctx, ("weak", "strong"))
        logits, emb = model(torch.cat(views))
        emb_l, emb_u = emb[: 2 * bl], emb[2 * bl:]
        terms = {
            "ce": F.cross_entropy(logits[:bl], batch.labels),
            "supcon_labelled": supcon(emb_l, positives_from_labels(batch.labels.repeat(2)), cfg.tau_labelled),
        }
        if ctx.step < cfg.pseudo_warmup_steps:
            terms["supcon_unlabelled"] = supcon(emb_u, positives_from_views(bu, 2, emb.device), cfg.tau_unlabelled)
        else:
            with torch.no_grad():
                probs = logits[2 * bl: 2 * bl + bu].detach().softmax(dim=1)
                confidence, pseudo = probs.max(dim=1)
                confident = (confidence >= cfg.pseudo_threshold) if cfg.pseudo_threshold is not None \
                    else torch.ones_like(pseudo, dtype=torch.bool)
            terms["supcon_pseudo"] = supcon(emb_u, s5cl_pseudo_positives(pseudo, confident, 2), cfg.tau_pseudo)
        return terms


METHODS: dict[str, type] = {"cross_entropy": CrossEntropy, "supcon": SupCon, "s5cl": S5CL}


def create_method(config: MethodConfig) -> Method:
    return METHODS[config.name](config)
