"""Label-free checks of a nuclei map against the tile's own stain, and the answer /segment gives.

A self-supervised segmenter can fail in ways no label reveals at serving time: a map that follows
background instead of nuclei, or one that marks most of the tile. Both are visible without labels,
by comparing the map's region with the haematoxylin-rich region that colour deconvolution and Otsu
give (the classical method's region):

- ``coverage``: the share of the tile the map marks. A map marking most of a tile (over half) is not a
  nuclei map: the stain region covers 13-42% of the development tiles.
- ``stain_agreement``: Dice between the map's region and the stain region.

A tile whose map fails either bound is answered by the classical method instead (that stain region,
with the card's morphology and watershed), and the answer says so (``produced_by``). The bounds were chosen on the development images and the training tiles only
(docs/segmentation.md, "Which answer /segment gives"); they are loose on purpose: they catch broken
maps, not maps that are merely a little worse than the stain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from medcl.segmentation import (InstanceRules, otsu_or_max, dice, haematoxylin, instances_from_mask,
                                probability_foreground)

MAX_COVERAGE = 0.5
MIN_STAIN_AGREEMENT = 0.4
# The stain region is Otsu's cut of the haematoxylin density after a Gaussian of 2 px (at 0.25 µm/px):
# on the development images it scored Dice 0.769 / AJI 0.407 as a segmentation against 0.674 / 0.351
# unsmoothed (single pixels of dark stroma no longer cut nuclei apart or stand alone).
STAIN_SIGMA = 2.0

SERVE_RULES = ("network", "network-or-classical", "classical")


@dataclass(frozen=True)
class MapCheck:
    coverage: float
    stain_coverage: float
    stain_agreement: float

    @property
    def passed(self) -> bool:
        return self.coverage <= MAX_COVERAGE and self.stain_agreement >= MIN_STAIN_AGREEMENT

    def reason(self) -> str:
        if self.coverage > MAX_COVERAGE:
            return f"the map marks {self.coverage:.0%} of the tile (more than {MAX_COVERAGE:.0%})"
        if self.stain_agreement < MIN_STAIN_AGREEMENT:
            return (f"the map agrees with the haematoxylin region at Dice {self.stain_agreement:.2f} "
                    f"(below {MIN_STAIN_AGREEMENT})")
        return "passed"

    def as_dict(self) -> dict:
        return {"coverage": round(self.coverage, 4), "stain_coverage": round(self.stain_coverage, 4),
                "stain_agreement": round(self.stain_agreement, 4), "passed": self.passed}


def stain_density(rgb: np.ndarray, sigma: float = STAIN_SIGMA) -> tuple[np.ndarray, float]:
    """Haematoxylin density, smoothed by a Gaussian of ``sigma`` px, and its Otsu threshold."""
    density = haematoxylin(rgb)
    if sigma:
        from scipy import ndimage as ndi

        density = ndi.gaussian_filter(density, sigma)
    return density, otsu_or_max(density)


def check_map(foreground: np.ndarray, stain_region: np.ndarray) -> MapCheck:
    return MapCheck(coverage=float(foreground.mean()), stain_coverage=float(stain_region.mean()),
                    stain_agreement=float(dice(foreground, stain_region)))


@dataclass(frozen=True)
class TileAnswer:
    labels: np.ndarray  # int32 instances, 0 = background
    confidence: np.ndarray  # the map the nuclei came from, in [0, 1]: per-nucleus probability is its mean
    produced_by: str  # "network" or "classical"
    check: MapCheck | None  # None when the serve rule asks for no check


def answer_tile(probability: np.ndarray | None, rgb: np.ndarray, rules: InstanceRules,
                serve: str = "network-or-classical", scale: float = 1.0,
                between: Callable[[], None] | None = None) -> TileAnswer:
    """The nuclei /segment returns for one tile under the card's ``serve`` rule.

    "network": the network's map, unchecked. "classical": colour deconvolution + Otsu, with the
    card's morphology and watershed. "network-or-classical": the network's map unless ``check_map``
    fails it. For classical answers the confidence is the haematoxylin density divided by twice its
    Otsu threshold (0.5 = at the threshold), clipped to [0, 1]: comparable in meaning, not calibrated.
    ``scale``: the tile's pixel size over the model's (``rules`` already at the tile's scale).
    ``between`` is called between steps (the service stops an abandoned request there by raising)."""
    between = between or (lambda: None)
    if serve not in SERVE_RULES:
        raise ValueError(f"serve must be one of {', '.join(SERVE_RULES)}, not {serve!r}")
    if serve == "network":
        if probability is None:
            raise ValueError("the network's map is needed")
        return TileAnswer(instances_from_mask(probability_foreground(probability, rules), rules, probability, between),
                          probability, "network", None)
    density, cut = stain_density(rgb, STAIN_SIGMA / scale)
    between()
    stain_region = density > cut
    check = None
    if serve == "network-or-classical" and probability is not None:
        foreground = probability_foreground(probability, rules)
        check = check_map(foreground, stain_region)
        if check.passed:
            return TileAnswer(instances_from_mask(foreground, rules, probability, between), probability, "network",
                              check)
    confidence = np.clip(density / (2.0 * cut), 0.0, 1.0) if cut > 0 else np.zeros_like(density)
    return TileAnswer(instances_from_mask(stain_region, rules, density, between), confidence.astype(np.float32),
                      "classical", check)
