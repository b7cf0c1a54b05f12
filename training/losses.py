"""One supervised-contrastive core and the losses built from it.

``supcon`` is the loss of Khosla et al. 2020 ("Supervised Contrastive Learning", the L_out form)
with the positives given as an explicit mask, so that one function covers
- SimCLR / NT-Xent: positives = the other view of the same image (``positives_from_views``),
- supervised contrastive: positives = same class (``positives_from_labels``),
- S5CL's pseudo-label term: positives = same pseudo-label,
- SWCL's multi-label term: positives = a shared position-specific label set (later issue).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supcon(embeddings: torch.Tensor, positive_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss.

    Args:
        embeddings: [N, D]; L2-normalised here.
        positive_mask: [N, N] bool; ``positive_mask[i, p]`` says p is a positive for anchor i.
            The diagonal is ignored (an anchor is never its own positive).
        temperature: tau > 0.

    Returns:
        The mean over anchors with at least one positive of
        ``-1/|P(i)| * sum_p log(exp(z_i.z_p/tau) / sum_{a != i} exp(z_i.z_a/tau))``;
        a zero that still carries a gradient when no anchor has a positive.
    """
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {tuple(embeddings.shape)}")
    n = embeddings.shape[0]
    if positive_mask.shape != (n, n):
        raise ValueError(f"positive_mask must be [{n}, {n}] for {n} embeddings, got {tuple(positive_mask.shape)}")
    if positive_mask.dtype != torch.bool:
        raise ValueError(f"positive_mask must be bool, got {positive_mask.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if n < 2:
        return embeddings.sum() * 0.0

    z = F.normalize(embeddings, dim=1)
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = (z @ z.T) / temperature
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)

    positives = positive_mask.to(z.device) & ~self_mask
    n_pos = positives.sum(dim=1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        return embeddings.sum() * 0.0
    pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1)
    return -(pos_log_prob[has_pos] / n_pos[has_pos]).mean()


def positives_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """[N] integer labels -> [N, N] mask of pairs with the same label."""
    if labels.ndim != 1:
        raise ValueError(f"labels must be [N], got shape {tuple(labels.shape)}")
    return labels[:, None] == labels[None, :]


def positives_from_views(n_images: int, n_views: int, device: torch.device | None = None) -> torch.Tensor:
    """Mask for embeddings stacked view-major ([view0 of all images; view1 of all images; ...]):
    positives are the other views of the same image."""
    image_id = torch.arange(n_images, device=device).repeat(n_views)
    return positives_from_labels(image_id)


def s5cl_pseudo_positives(pseudo_labels: torch.Tensor, confident: torch.Tensor, n_views: int) -> torch.Tensor:
    """S5CL's L_p mask over view-major stacked embeddings of B unlabelled images.

    Positives: the image's other views, plus any view of another image with the same pseudo-label
    when both images are confident. With every image confident (no threshold, as in the
    reference) this is exactly "same pseudo-label".
    """
    b = pseudo_labels.shape[0]
    labels = pseudo_labels.repeat(n_views)
    conf = confident.repeat(n_views)
    same_label = (labels[:, None] == labels[None, :]) & conf[:, None] & conf[None, :]
    return same_label | positives_from_views(b, n_views, device=pseudo_labels.device)
