"""Architectures, the factory, and safe loading of local weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medcl.card import ArchitectureSpec
from training.augment import AugmentSpec, hed_jitter, strong_view, weak_view
from training.models import create_model, load_pretrained, resnet18, resnet50


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_resnet_parameter_counts_match_the_published_architectures() -> None:
    # torchvision's resnet18/50 have 11,689,512 / 25,557,032 parameters including the
    # 1000-class fc layer (512*1000+1000 / 2048*1000+1000).
    assert n_params(resnet18()) + 512 * 1000 + 1000 == 11_689_512
    assert n_params(resnet50()) + 2048 * 1000 + 1000 == 25_557_032


@pytest.mark.parametrize("stem, size", [("small", 28), ("small", 64), ("imagenet", 224)])
def test_backbone_shapes(stem: str, size: int) -> None:
    model = create_model(ArchitectureSpec(backbone="resnet18", stem=stem, embedding_dim=64), num_classes=8).eval()
    logits, emb = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 8) and emb.shape == (2, 64)


def test_unknown_backbone_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        create_model(ArchitectureSpec(backbone="vgg"), 2)


def test_pretrained_weights_from_safetensors_and_torch_files(tmp_path: Path) -> None:
    source = resnet18(stem="small", width=16)
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "w.pt")
    spec = ArchitectureSpec(backbone="resnet18", stem="small", width=16)
    for f in ("w.safetensors", "w.pt"):
        model = create_model(spec, 3, pretrained=tmp_path / f)
        assert torch.equal(model.backbone.conv1.weight, source.conv1.weight)


def test_pretrained_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    save_file(resnet18(width=32).state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="fewer than 90%"):
        load_pretrained(resnet18(width=16), tmp_path / "w.safetensors")


def test_torch_files_are_loaded_without_executing_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported"):
        load_pretrained(resnet18(width=16), tmp_path / "evil.pt")


def test_views_are_in_range_and_drawn_per_image() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.full((16, 28, 28, 3), 128, dtype=torch.uint8)
    images[:, 10:18, 10:18] = torch.tensor([120, 40, 160], dtype=torch.uint8)
    spec = AugmentSpec()
    for view in (weak_view(images, spec, g), strong_view(images, spec, g)):
        assert view.shape == (16, 3, 28, 28) and view.min() >= 0 and view.max() <= 1
    # HED jitter: every image gets its own factors (the reference drew them once per run).
    x = images.permute(0, 3, 1, 2).float() / 255
    jittered = hed_jitter(x, 0.05, g)
    per_image_means = jittered.mean(dim=(1, 2, 3))
    assert per_image_means.unique().numel() == 16
    assert torch.allclose(hed_jitter(x, 0.0, g), x)


def test_d4_test_time_augmentation_is_the_mean_over_flips_and_turns() -> None:
    """In eval mode the answer is the mean of the 8 plain answers, so a turned or mirrored tile gets the
    same answer; training mode is untouched."""
    torch.manual_seed(0)
    spec = ArchitectureSpec(backbone="resnet18", stem="small", width=8, embedding_dim=16, test_time_augmentation="d4")
    model = create_model(spec, num_classes=2).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, embedding = model(x)
        views = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
        views += [v.flip(-1) for v in views]
        plain = [model._forward(v) for v in views]
        assert torch.allclose(logits, torch.stack([p[0] for p in plain]).mean(0), atol=1e-5)
        assert torch.allclose(embedding, torch.stack([p[1] for p in plain]).mean(0), atol=1e-5)
        turned, _ = model(torch.rot90(x, 1, dims=(-2, -1)).flip(-2))
        assert torch.allclose(turned, logits, atol=1e-4)
    model.train()
    assert model(x)[0].shape == (3, 2)  # one plain pass per tile while training
