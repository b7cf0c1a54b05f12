"""SWCL (training/methods.py): fixed patch positions, position x abnormality label sets from a real
teacher run, the patch SupCon loss, and the experiment runner's teacher hand-over."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medcl.card import PreprocessSpec
from training.augment import AugmentSpec
from training.config import MethodConfig
from training.methods import SWCL, Batch, StepContext

from tests.conftest import shared


def _ctx(size: int) -> StepContext:
    return StepContext(step=0, generator=torch.Generator().manual_seed(0), augment=AugmentSpec(),
                       preprocess=PreprocessSpec(input_size=size), total_steps=10)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    path = shared("retinamnist", "retinamnist.npz")
    if path.is_file():  # real fundus images when the shared data is here
        with np.load(path) as archive:
            return torch.from_numpy(archive["train_images"][seed * n:(seed + 1) * n].copy())
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 255, (n, size, size, 3), dtype=np.uint8))


def test_patches_sit_at_the_four_corners_and_the_centre(tiny_run: Path) -> None:
    method = SWCL(MethodConfig(name="swcl", teacher=str(tiny_run), patch_fraction=0.5))
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    p = method.patches(x)
    assert p.shape == (10, 3, 8, 8)
    down = torch.nn.functional.avg_pool2d(p, 2)  # undo the 2x upsampling of each 4x4 patch (nearly: bilinear)
    for position, (r, c) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]):
        crop = x[:, :, r:r + 4, c:c + 4]
        assert torch.allclose(down[position * 2:(position + 1) * 2], torch.nn.functional.avg_pool2d(
            torch.nn.functional.interpolate(crop, size=(8, 8), mode="bilinear", align_corners=False), 2))
    whole = SWCL(MethodConfig(name="swcl", teacher=str(tiny_run), patch_fraction=1.0)).patches(x)
    assert torch.equal(whole, x.repeat(5, 1, 1, 1))  # every position is the whole image


def test_label_sets_are_position_and_abnormality_from_the_teacher(tiny_run: Path) -> None:
    size = 28
    images = _images(6, size)
    labels = torch.tensor([0, 0, 3])  # three labelled images: two normal, one abnormal; three unlabelled
    every = SWCL(MethodConfig(name="swcl", teacher=str(tiny_run), abnormal_threshold=0.0))
    ids, kept = every.patch_labels(images, labels, _ctx(size))
    assert ids.shape == (30,) and kept.all()
    position, abnormal = ids // 2, ids % 2
    assert torch.equal(position, torch.arange(5).repeat_interleave(6))
    by_image = abnormal.view(5, 6)
    assert not by_image[:, :2].any()  # a normal image's patches are never abnormal
    assert by_image[:, 2].all()  # threshold 0: every patch of an abnormal image is
    none = SWCL(MethodConfig(name="swcl", teacher=str(tiny_run), abnormal_threshold=1.0))
    assert (none.patch_labels(images, labels, _ctx(size))[0] % 2 == 0).all()
    strict = SWCL(MethodConfig(name="swcl", teacher=str(tiny_run), pseudo_threshold=1.0))
    kept = strict.patch_labels(images, labels, _ctx(size))[1].view(5, 6)
    assert kept[:, :3].all() and not kept[:, 3:].any()  # unlabelled images below full confidence drop out


def test_patch_loss_trains_the_student_and_leaves_the_teacher(tiny_run: Path) -> None:
    from training.engine import load_trained

    method = SWCL(MethodConfig(name="swcl", teacher=str(tiny_run)))
    student, _ = load_trained(tiny_run)
    student.train()
    images = _images(8, 28, seed=1)
    batch = Batch(labelled=images[:4], labels=torch.tensor([0, 1, 2, 3]), unlabelled=images[4:])
    terms = method.loss_terms(student, batch, _ctx(28))
    assert set(terms) == {"supcon_patch"} and torch.isfinite(terms["supcon_patch"])
    terms["supcon_patch"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in method.teacher.parameters())


def test_swcl_without_a_teacher_or_with_foreign_classes_says_so(tiny_run: Path) -> None:
    from medcl.errors import MedclError

    with pytest.raises(MedclError, match="method.teacher"):
        SWCL(MethodConfig(name="swcl"))
    with pytest.raises(MedclError, match="normal_classes"):
        SWCL(MethodConfig(name="swcl", teacher=str(tiny_run), normal_classes=[99]))


def test_an_experiment_teacher_must_name_another_entry(tmp_path: Path) -> None:
    from training.experiment import ExperimentError, run_experiment

    config = tmp_path / "exp.yaml"
    config.write_text("name: x\ndataset: retinamnist\nbase_config: /nonexistent.yaml\nlabel_fractions: [0.1]\n"
                      "seeds: [0]\nmethods:\n  - {label: swcl, method: swcl, teacher: nobody}\n")
    with pytest.raises(ExperimentError, match="teacher 'nobody'"):
        run_experiment(config, progress=False)


def test_each_patch_shows_the_region_its_label_names_in_both_views(tiny_run: Path) -> None:
    """Four quadrants of four colours: at patch_fraction 0.5 each corner patch is one quadrant. Every
    view the model sees of a corner patch must be that quadrant's colour (flips, rotations and crops
    act on the patch, not on the image it was cut from), and the centre patch shows all four."""
    size = 32
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=torch.uint8)
    image = torch.zeros(size, size, 3, dtype=torch.uint8)
    half = size // 2
    for q, (r, c) in enumerate([(0, 0), (0, half), (half, 0), (half, half)]):
        image[r:r + half, c:c + half] = colours[q]
    images = image.repeat(4, 1, 1, 1)
    method = SWCL(MethodConfig(name="swcl", teacher=str(tiny_run), patch_fraction=0.5))
    seen: list[torch.Tensor] = []

    class Capture(torch.nn.Module):
        def forward(self, x: torch.Tensor):
            seen.append(x)
            emb = torch.nn.functional.normalize(x.flatten(1)[:, :16] + 1e-3, dim=1)
            return torch.zeros(x.shape[0], 2), emb

    ctx = StepContext(step=0, generator=torch.Generator().manual_seed(0),
                      augment=AugmentSpec(colour_jitter=0.0, hed_theta=0.0), preprocess=PreprocessSpec(input_size=size),
                      total_steps=10)
    method.loss_terms(Capture(), Batch(labelled=images, labels=torch.zeros(4, dtype=torch.long), unlabelled=None), ctx)
    pixels = seen[0] * torch.tensor(ctx.preprocess.std).view(1, 3, 1, 1) + torch.tensor(ctx.preprocess.mean).view(1, 3, 1, 1)
    n = images.shape[0]
    views = pixels.view(2, 5 * n, 3, size, size)
    for view in views:
        for position in range(4):  # the corners
            patches = view[position * n:(position + 1) * n]
            expected = colours[position].float().div(255).view(1, 3, 1, 1)
            inside = patches[:, :, 4:-4, 4:-4]  # away from the edges an affine's fill may reach
            assert torch.allclose(inside, expected.expand_as(inside), atol=0.02), position
        centre = view[4 * n:]
        assert len({tuple(c.tolist()) for c in centre[0, :, 2:-2:4, 2:-2:4].flatten(1).T.round(decimals=1)}) >= 3
