"""The supervised-contrastive core against hand-computed cases and an independent implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.losses import positives_from_labels, positives_from_views, s5cl_pseudo_positives, supcon


def reference_supcon(z: np.ndarray, pos: np.ndarray, tau: float) -> float:
    """Written from the formula with plain loops, in float64, sharing no code with training.losses."""
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z)
    per_anchor = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and pos[i, p]]
        if not positives:
            continue
        denom = sum(math.exp(z[i] @ z[a] / tau) for a in range(n) if a != i)
        per_anchor.append(-sum(math.log(math.exp(z[i] @ z[p] / tau) / denom) for p in positives) / len(positives))
    return float(np.mean(per_anchor))


def test_two_orthogonal_pairs_by_hand() -> None:
    # Anchors 0,1 share a class, 2,3 share another. z0 = z1 = e1, z2 = z3 = e2, tau = 1.
    # For anchor 0: positive similarity 1, denominator e^1 + e^0 + e^0 -> loss = log(e + 2) - 1.
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    mask = positives_from_labels(torch.tensor([0, 0, 1, 1]))
    expected = math.log(math.e + 2) - 1
    assert supcon(z, mask, 1.0).item() == pytest.approx(expected, abs=1e-6)


def test_diagonal_is_ignored_and_anchors_without_positives_are_skipped() -> None:
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    only_self = torch.eye(3, dtype=torch.bool)
    assert supcon(z, only_self, 0.5).item() == 0.0
    # Only anchor 0 has a positive (1): the mean is over that one anchor.
    mask = only_self.clone()
    mask[0, 1] = True
    assert supcon(z, mask, 0.5).item() == pytest.approx(reference_supcon(z.numpy(), mask.numpy(), 0.5), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("tau", [0.1, 0.2, 0.7])
def test_matches_independent_implementation_on_random_inputs(seed: int, tau: float) -> None:
    rng = np.random.default_rng(seed)
    n, d = 12, 5
    z = rng.normal(size=(n, d))
    labels = rng.integers(0, 4, size=n)
    mask = labels[:, None] == labels[None, :]
    mask[0, :] = False  # an anchor with no positive at all
    ours = supcon(torch.from_numpy(z), torch.from_numpy(mask), tau).item()
    assert ours == pytest.approx(reference_supcon(z, mask, tau), rel=1e-9, abs=1e-9)


def test_embeddings_are_normalised_inside() -> None:
    rng = np.random.default_rng(7)
    z = torch.from_numpy(rng.normal(size=(8, 4)))
    mask = positives_from_views(4, 2)
    assert supcon(z * 17.0, mask, 0.3).item() == pytest.approx(supcon(z, mask, 0.3).item(), rel=1e-12)


def test_gradient_check() -> None:
    torch.manual_seed(0)
    z = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    mask = positives_from_labels(torch.tensor([0, 1, 0, 1, 2, 2]))
    assert torch.autograd.gradcheck(lambda e: supcon(e, mask, 0.2), (z,))


def test_simclr_is_the_two_view_special_case() -> None:
    mask = positives_from_views(3, 2)
    expected = np.zeros((6, 6), dtype=bool)
    for i in range(3):
        expected[i, i + 3] = expected[i + 3, i] = True
        expected[i, i] = expected[i + 3, i + 3] = True
    assert np.array_equal(mask.numpy(), expected)


def test_pseudo_positives_with_and_without_threshold() -> None:
    pseudo = torch.tensor([0, 0, 1])
    everyone = s5cl_pseudo_positives(pseudo, torch.ones(3, dtype=torch.bool), n_views=2)
    assert torch.equal(everyone, positives_from_labels(pseudo.repeat(2)))
    # Image 1 unconfident: it keeps only its own other view as positive.
    partial = s5cl_pseudo_positives(pseudo, torch.tensor([True, False, True]), n_views=2)
    assert not partial[0, 1] and not partial[1, 0] and partial[1, 4] and partial[0, 3]


@pytest.mark.parametrize(
    "embeddings, mask, tau, message",
    [
        (torch.zeros(4), torch.zeros(4, 4, dtype=torch.bool), 0.1, "embeddings must be"),
        (torch.zeros(4, 2), torch.zeros(3, 3, dtype=torch.bool), 0.1, "positive_mask must be \\[4, 4\\]"),
        (torch.zeros(4, 2), torch.zeros(4, 4), 0.1, "must be bool"),
        (torch.zeros(4, 2), torch.zeros(4, 4, dtype=torch.bool), 0.0, "temperature must be > 0"),
    ],
)
def test_clear_errors_for_wrong_inputs(embeddings, mask, tau, message) -> None:
    with pytest.raises(ValueError, match=message):
        supcon(embeddings, mask, tau)
