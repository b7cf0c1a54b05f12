"""Nuclei segmenter -> ONNX package with dynamic batch, height and width, proven equal to PyTorch.

The graph outputs only the nuclei map (``nuclei``, (N, 1, H, W), probabilities): which of the
network's confidence maps is the nuclei one was decided at training (label-free) and is baked in,
so the service needs no knowledge of the method. Parity is measured on real H&E images at more than
one size, since a graph exported with a fixed spatial size would still pass at that size alone.
fp16/int8 variants and TensorRT engines are built for classifiers only; a segmenter package is fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from medcl.card import Card, OnnxSpec
from medcl.errors import MedclError

PARITY_SIZES = ((256, 256), (301, 347))  # square and odd, non-square


class NucleiOutput(nn.Module):
    def __init__(self, network: nn.Module, channel: int) -> None:
        super().__init__()
        self.network, self.channel = network, channel

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(image)[:, self.channel:self.channel + 1]


def parity_tiles(card: Card, parity_data: str | Path | None, limit: int = 4) -> tuple[list[np.ndarray], str]:
    """Real H&E images, crops at each parity size as the network reads them (``network_input``)."""
    from medcl.segmentation import network_input
    from training.nuclei import image_files, read_rgb

    root = Path(parity_data) if parity_data is not None else Path(card.data.path)
    if not root.is_dir():
        raise FileNotFoundError(f"no H&E images at {root} for the segmenter's parity check: pass --parity-data DIR")
    tiles = []
    for f in image_files(root)[:limit]:
        rgb = read_rgb(f)
        for h, w in PARITY_SIZES:
            crop = np.pad(rgb, ((0, max(0, h - rgb.shape[0])), (0, max(0, w - rgb.shape[1])), (0, 0)), mode="reflect")
            tiles.append(network_input(np.ascontiguousarray(crop[:h, :w]), card.segmentation.inputs))
    return tiles, str(root)


def export_segmenter(run_dir: str | Path, out_dir: str | Path, parity_data: str | Path | None = None,
                     opset: int = 17, tolerance: float = 1e-4, variants: list[str] | None = None,
                     tensorrt: str = "off") -> Path:
    import onnx
    import onnxruntime as ort

    from export.onnx_export import ParityError, staged_package
    from training.nuclei import load_segmenter

    if variants:
        raise SegmenterExportError(f"variants {', '.join(variants)} are built for classifiers only; "
                                   "export the segmenter without --variants")
    if tensorrt == "require":
        raise SegmenterExportError("TensorRT engines are built for classifiers only (--tensorrt require)")
    network, card = load_segmenter(run_dir)
    wrapper = NucleiOutput(network, card.segmentation.nuclei_channel).eval()
    tiles, source = parity_tiles(card, parity_data)

    with staged_package(out_dir) as staging:
        onnx_path = staging / "model.onnx"
        torch.onnx.export(wrapper, (torch.from_numpy(np.stack([tiles[0], tiles[0]])),), str(onnx_path), dynamo=False,
                          opset_version=opset, input_names=["image"], output_names=["nuclei"],
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                        "nuclei": {0: "batch", 2: "height", 3: "width"}})
        onnx.checker.check_model(str(onnx_path))
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        worst, by_size = 0.0, {}
        for h, w in PARITY_SIZES:
            batch = np.stack([t for t in tiles if t.shape[1:] == (h, w)])
            with torch.no_grad():
                ref = wrapper(torch.from_numpy(batch)).numpy()
            got = session.run(["nuclei"], {"image": batch})[0]
            diff = float(np.abs(got - ref).max())
            by_size[f"max_abs_diff_{h}x{w}"] = diff
            worst = max(worst, diff)
        parity = {"images": len(tiles) // len(PARITY_SIZES), "source": source, **by_size,
                  "mask_agreement_at_threshold": _mask_agreement(session, wrapper, tiles, card.segmentation.threshold),
                  "tolerance": tolerance, "onnxruntime": ort.__version__, "torch": torch.__version__.split("+")[0]}
        if not worst <= tolerance:
            raise ParityError(f"ONNX differs from PyTorch by {worst:.3g} (> {tolerance:g}); no package written")
        card.onnx = OnnxSpec(file="model.onnx", opset=opset, exporter=f"torch.onnx (TorchScript) {torch.__version__}",
                             output_names=["nuclei"], parity=parity)
        card.save(staging)
    return Path(out_dir)


def _mask_agreement(session, wrapper: nn.Module, tiles: list[np.ndarray], threshold: float) -> float:
    """Share of pixels on the same side of the threshold in ONNX and PyTorch."""
    agree, total = 0, 0
    for t in tiles:
        with torch.no_grad():
            ref = wrapper(torch.from_numpy(t[None])).numpy() >= threshold
        got = session.run(["nuclei"], {"image": t[None]})[0] >= threshold
        agree += int((ref == got).sum())
        total += ref.size
    return agree / total


class SegmenterExportError(MedclError, ValueError):
    """An export option that does not apply to segmenters."""
