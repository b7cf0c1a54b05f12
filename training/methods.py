"""Training methods: each turns one batch into named loss terms; the engine sums and logs them.

A method sees uint8 image batches and makes its own views, so adding SRCL or SWCL later means
adding a class here, not changing the engine.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from medcl.card import PreprocessSpec
from training.augment import AugmentSpec, standardise, strong_view, to_float, weak_view
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
    total_steps: int = 0


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


class MeanTeacherRelations:
    """SRCL (arXiv 2304.05047) and its building blocks, one class for three methods:

    - ``srcl`` (joint): L = CE(labelled) + lambda_c * NT-Xent(all images) + w(t) * (L_con + L_rel);
    - ``srcl_pretrain``: NT-Xent + w(t) * L_rel, no labels used (fine-tune afterwards with
      ``cross_entropy`` and ``pretrained`` set to the pretraining run: the pretrain-then-fine-tune variant);
    - ``mean_teacher``: CE + w(t) * L_con (the mean-teacher baseline, Tarvainen & Valpola 2017).

    Sample relation consistency as SRC-MT (Liu et al., TMI 2020) defines it (docs/methods.md):
    - the teacher's weights are an EMA of the student's, alpha = min(1 - 1/(step+1), ema_decay); it sees
      another draw of the student's (weak) augmentation, without gradient;
    - relations on the pooled backbone features A of the batch: G = A A^T, not normalised, then each row
      divided by its L2 norm (``relation``); L_rel = sum_ij (R_student - R_teacher)^2 / B;
    - L_con = sum_i sum_c w_c (p_student - p_teacher)^2 / B with class weights w_c = 10000 / count_c;
      count_c is the class's count in the training set, estimated from the labelled images' class shares
      (the unlabelled images' labels are not used);
    - w(t) = exp(-5 (1 - t/T)^2) for t < T, then 1.
    NT-Xent acts on a projection head of its own (Linear-ReLU-Linear to 128, trained with the model and
    discarded after), on the student's weak and strong views. The class-weighted cross-entropy of the
    paper is realised by the m-per-class labelled sampler, which shows every class equally often.

    The teacher and the projection head live in the method, not in the checkpoint: a resumed run
    restarts the teacher from the student and the head from a fresh initialisation.
    """

    uses_unlabelled = True
    projection_dim = 128

    def __init__(self, config: MethodConfig) -> None:
        self.config = config
        self.name = config.name
        self.teacher: EncoderClassifier | None = None
        self.head: torch.nn.Module | None = None
        self.class_weights: torch.Tensor | None = None

    def prepare(self, model: EncoderClassifier, labelled_labels: torch.Tensor, num_classes: int,
                training_images: int) -> list[torch.nn.Parameter]:
        """Before the optimiser is made: the class weights, and the projection head whose parameters
        the optimiser must also train (returned)."""
        counts = torch.bincount(torch.as_tensor(labelled_labels), minlength=num_classes).double()
        share = (counts + 1.0) / (counts.sum() + num_classes)  # +1: a class absent from the labels keeps a weight
        self.class_weights = (10000.0 / (share * training_images)).float()
        if self.name == "mean_teacher":
            return []
        dim = model.embedder.out_features
        self.head = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(),
                                        torch.nn.Linear(dim, self.projection_dim))
        return list(self.head.parameters())

    def _update_teacher(self, student: EncoderClassifier, step: int) -> EncoderClassifier:
        if self.teacher is None:
            self.teacher = copy.deepcopy(student)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            return self.teacher
        alpha = min(1.0 - 1.0 / (step + 1), self.config.ema_decay)
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), student.parameters()):
                t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
            for t, s in zip(self.teacher.buffers(), student.buffers()):
                t.copy_(s)
        return self.teacher

    def ramp(self, ctx: StepContext) -> float:
        length = self.config.rampup_steps or max(1, int(0.4 * ctx.total_steps))
        t = min(ctx.step / length, 1.0)
        return math.exp(-5.0 * (1.0 - t) ** 2)

    @staticmethod
    def relation(features: torch.Tensor) -> torch.Tensor:
        """SRC-MT's sample relation matrix: the Gram matrix of the raw features, each row L2-normalised."""
        gram = features @ features.T
        return F.normalize(gram, p=2, dim=1)

    def consistency(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        gap = student_logits.softmax(dim=1) - teacher_logits.softmax(dim=1)
        weights = self.class_weights if self.class_weights is not None else torch.ones(gap.shape[1])
        return (weights.to(gap.device)[None, :] * gap ** 2).sum() / gap.shape[0]

    def loss_terms(self, model: EncoderClassifier, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        if batch.unlabelled is None:
            raise ValueError(f"{self.name} needs an unlabelled stream")
        cfg = self.config
        teacher = self._update_teacher(model, ctx.step)
        bl = batch.labels.shape[0]
        images = torch.cat([batch.labelled, batch.unlabelled])
        n = images.shape[0]
        # the student's weak and strong views; the teacher's own draw of the weak augmentation
        weak, strong, teacher_view = _views(images, ctx, ("weak", "strong", "weak"))
        logits, emb, pooled = model(torch.cat([weak, strong]), features=True)
        with torch.no_grad():
            teacher_logits, _, teacher_pooled = teacher(teacher_view, features=True)
        student_logits, student_pooled = logits[:n], pooled[:n]
        w = self.ramp(ctx)
        terms: dict[str, torch.Tensor] = {}
        if self.name != "srcl_pretrain":
            terms["ce"] = F.cross_entropy(student_logits[:bl], batch.labels)
        if self.name in ("srcl", "srcl_pretrain"):
            if self.head is None:
                raise ValueError(f"{self.name}: prepare() must run before training (it makes the projection head)")
            projected = self.head(emb)
            terms["ntxent"] = cfg.lambda_contrastive * supcon(projected, positives_from_views(n, 2, emb.device),
                                                              cfg.tau_ntxent)
            difference = self.relation(student_pooled) - self.relation(teacher_pooled)
            terms["relation"] = w * cfg.relation_weight * (difference ** 2).sum() / n
        if self.name in ("srcl", "mean_teacher"):
            terms["consistency"] = w * self.consistency(student_logits, teacher_logits)
        return terms


class SWCL:
    """SWCL stage 3 (docs/methods.md): multi-label supervised contrastive pretraining on patches.

    Every image (labelled, and unlabelled with the stage-1 teacher's pseudo-label) is cut at five fixed
    positions (four corners and the centre) before any augmentation, and each patch then gets two
    augmented views of its own (flips, rotations and crops of a patch still show its region); a
    patch's label set is its position
    and its abnormality (its image is abnormal and the teacher scores the patch at or above the
    threshold). Positives share the label set; a patch's other view is always a positive. Unlabelled
    images below ``pseudo_threshold`` confidence keep only that view positive.
    Deviation (docs/methods.md): the patch score is the teacher's abnormal probability on the patch
    itself, not a class-activation map (our classifier sits on a projection, so a CAM is not linear
    in the feature map); RetinaMNIST has no eye side or fellow-eye pairing, so no mirroring and no
    fellow-eye positives.
    """

    name = "swcl"
    uses_unlabelled = True
    positions = 5

    def __init__(self, config: MethodConfig) -> None:
        from medcl.errors import MedclError
        from training.engine import load_trained

        if not config.teacher:
            raise MedclError("method swcl needs method.teacher: the folder of the stage-1 label-propagation run")
        self.config = config
        self.teacher, card = load_trained(config.teacher)
        self.teacher.requires_grad_(False)
        bad = [c for c in config.normal_classes if not 0 <= c < card.num_classes]
        if bad:
            raise MedclError(f"method.normal_classes {bad} are not classes of the teacher ({card.num_classes})")

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (5N, 3, H, W), position-major, each patch resized back to the input size."""
        h, w = x.shape[-2:]
        ph, pw = max(2, round(h * self.config.patch_fraction)), max(2, round(w * self.config.patch_fraction))
        corners = [(0, 0), (0, w - pw), (h - ph, 0), (h - ph, w - pw), ((h - ph) // 2, (w - pw) // 2)]
        crops = [x[:, :, r:r + ph, c:c + pw] for r, c in corners]
        return F.interpolate(torch.cat(crops), size=(h, w), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def patch_labels(self, images: torch.Tensor, labels: torch.Tensor, ctx: StepContext
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Label id (position * 2 + abnormal) and kept flag of each of the 5N patches, from the teacher
        on the plain (unaugmented) images; the first len(labels) images are the labelled ones."""
        cfg = self.config
        clean = standardise(to_float(images), ctx.preprocess.mean, ctx.preprocess.std)
        n, bl = images.shape[0], labels.shape[0]
        image_probs = self.teacher(clean)[0].softmax(dim=1)
        patch_probs = self.teacher(self.patches(clean))[0].softmax(dim=1)
        normal = torch.tensor(cfg.normal_classes, device=images.device)
        image_label = torch.cat([labels, image_probs[bl:].argmax(dim=1)])
        confidence = torch.cat([torch.ones(bl), image_probs[bl:].max(dim=1).values])
        image_abnormal = ~torch.isin(image_label, normal)
        patch_score = 1.0 - patch_probs[:, normal].sum(dim=1)
        abnormal = (patch_score >= cfg.abnormal_threshold) & image_abnormal.repeat(self.positions)
        position = torch.arange(self.positions).repeat_interleave(n)
        kept = (confidence >= (cfg.pseudo_threshold or 0.0)).repeat(self.positions)
        return position * 2 + abnormal.long(), kept

    def patch_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> uint8 (5N, H, W, 3): the patches cut from the images as they are,
        position-major, each resized back to the input size (the pixels the views are made from)."""
        cut = self.patches(to_float(images)).mul_(255.0).round_().clamp_(0, 255)
        return cut.to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    def loss_terms(self, model: EncoderClassifier, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        images = batch.labelled if batch.unlabelled is None else torch.cat([batch.labelled, batch.unlabelled])
        label_id, kept = self.patch_labels(images, batch.labels, ctx)
        # Patches are cut from the untransformed image first and each patch is augmented on its own:
        # cut after a flip or rotation, a "top-left" patch would show another region than the one its
        # label (computed on the clean image) names, and its two views would show different regions.
        views = _views(self.patch_pixels(images), ctx, ("weak", "strong"))
        _, emb = model(torch.cat(views))
        ids, keep = label_id.repeat(2), kept.repeat(2)
        mask = (positives_from_labels(ids) & keep[:, None] & keep[None, :]) | \
            positives_from_views(label_id.shape[0], 2, emb.device)
        return {"supcon_patch": supcon(emb, mask, self.config.tau_patch)}


# A method's revision is bumped when a change to its code changes what it trains (a fix, not a new
# setting): experiments then neither reuse its earlier runs nor keep its earlier result rows.
# SWCL 2: patches cut before augmentation (revision 1 cut them from already flipped/rotated views).
# SRCL / mean teacher 2: SRC-MT's relation (raw Gram, rows normalised) on pooled features, class-weighted
# consistency, the teacher on a draw of the student's augmentation, a projection head for NT-Xent.
REVISIONS: dict[str, int] = {"swcl": 2, "srcl": 2, "srcl_pretrain": 2, "mean_teacher": 2}


def method_revision(name: str) -> int:
    return REVISIONS.get(name, 1)


METHODS: dict[str, type] = {"cross_entropy": CrossEntropy, "supcon": SupCon, "s5cl": S5CL,
                            "srcl": MeanTeacherRelations, "srcl_pretrain": MeanTeacherRelations,
                            "mean_teacher": MeanTeacherRelations, "swcl": SWCL}


def create_method(config: MethodConfig) -> Method:
    return METHODS[config.name](config)
