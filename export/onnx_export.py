"""Checkpoint -> ONNX package (model.onnx + card.json), proven equal to PyTorch on real images.

The package has a dynamic batch axis and two outputs: ``logits`` and the L2-normalised
``embedding``. Parity (max abs difference of both outputs, top-1 agreement) is measured with
onnxruntime on real held-out images and written into the card; if it fails the tolerance, nothing
is written. The legacy TorchScript exporter (opset 17) is used because onnxruntime's quantisation
tools failed on the graphs of the newer dynamo exporter in the torch version pinned here,
and int8 export builds on this.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from medcl.card import Card, OnnxSpec
from medcl.drift import REFERENCE_FILE
from medcl.errors import MedclError
from medcl.preprocess import IMAGE_SUFFIXES, load_model_pixels, normalise
from training.checkpoint import WEIGHTS_FILENAME

DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-4


class ParityError(MedclError, RuntimeError):
    """The exported graph does not reproduce PyTorch within tolerance; no package was written."""


def parity_images(card: Card, parity_data: str | Path | None, limit: int) -> tuple[np.ndarray, str]:
    """Real held-out images as uint8 model pixels: a given folder, else the run's own test split."""
    if parity_data is not None:
        root = Path(parity_data)
        if root.is_file() and root.suffix == ".npz":
            with np.load(root) as archive:
                return archive["test_images"][:limit].astype(np.uint8), f"{root} (test split)"
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        if not files:
            raise FileNotFoundError(f"no images under {root} for the parity check")
        return np.stack([load_model_pixels(f, card.preprocess) for f in files]), str(root)
    if card.data.kind == "npz" and Path(card.data.path).is_file():
        with np.load(card.data.path) as archive:
            return archive[f"{card.data.test_split}_images"][:limit].astype(np.uint8), \
                f"{card.data.path} ({card.data.test_split} split)"
    raise FileNotFoundError(
        f"no images for the parity check: pass --parity-data DIR with real held-out images (the run's own test "
        f"split is read only from npz data that is still here; this run's is {card.data.kind} at {card.data.path})")


def labelled_splits(card: Card, data: str | Path | None, n_held_out: int = 2000, n_calibration: int = 256,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gate images + labels and calibration images (training split) from an .npz. The gate decides
    whether a variant is written, so it reads the validation split where there is one; the test split
    only where the archive holds no other held-out images."""
    path = Path(data) if data is not None else Path(card.data.path)
    if path.suffix != ".npz" or not path.is_file():
        raise FileNotFoundError(f"fp16/int8 variants need an .npz with train and val (or test) splits (got {path}); "
                                "pass --parity-data DATA.npz")
    with np.load(path) as archive:
        split = "val" if "val_images" in archive.files else "test"
        test_x, test_y = archive[f"{split}_images"], archive[f"{split}_labels"].reshape(-1)
        train_x = archive["train_images"]
    rng = np.random.default_rng(seed)
    held = rng.permutation(len(test_x))[:n_held_out]
    calib = rng.permutation(len(train_x))[:n_calibration]
    return test_x[held].astype(np.uint8), test_y[held].astype(np.int64), train_x[calib].astype(np.uint8)


def export_onnx(run_dir: str | Path, out_dir: str | Path, parity_data: str | Path | None = None,
                opset: int = DEFAULT_OPSET, tolerance: float = DEFAULT_TOLERANCE, n_parity: int = 64,
                variants: list[str] | None = None, max_int8_drop: float = 0.01,
                tensorrt: str = "off") -> Path:
    """Write the package to ``out_dir`` (replacing an older one atomically); returns ``out_dir``.

    ``variants`` ("fp16", "int8") are built beside model.onnx and gated (export/variants.py);
    ``tensorrt`` "auto" builds a cached engine where TensorRT runs, "require" fails where it cannot.
    """
    import onnx
    import onnxruntime as ort

    from training.engine import load_trained
    from training.models import ExportWrapper

    if Card.load(run_dir).task == "segment":
        from export.segmenter_export import export_segmenter

        return export_segmenter(run_dir, out_dir, parity_data=parity_data, opset=opset, tolerance=tolerance,
                                variants=variants, tensorrt=tensorrt)
    model, card = load_trained(run_dir)
    wrapper = ExportWrapper(model).eval()
    pixels, parity_source = parity_images(card, parity_data, n_parity)
    inputs = normalise(pixels, card.preprocess)

    with staged_package(out_dir) as staging:
        onnx_path = staging / "model.onnx"
        dummy = torch.from_numpy(inputs[:2])
        torch.onnx.export(
            wrapper, (dummy,), str(onnx_path), dynamo=False, opset_version=opset,
            input_names=["image"], output_names=["logits", "embedding"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "embedding": {0: "batch"}},
        )
        onnx.checker.check_model(str(onnx_path))

        with torch.no_grad():
            ref_logits, ref_emb = (t.numpy() for t in wrapper(torch.from_numpy(inputs)))
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        # Whole batch and single images: the dynamic batch axis must give the same answers.
        got_logits, got_emb = session.run(["logits", "embedding"], {"image": inputs})
        single = [session.run(["logits"], {"image": inputs[i:i + 1]})[0] for i in range(min(4, len(inputs)))]
        parity = {
            "images": int(len(inputs)),
            "source": parity_source,
            "max_abs_diff_logits": float(np.abs(got_logits - ref_logits).max()),
            "max_abs_diff_embedding": float(np.abs(got_emb - ref_emb).max()),
            "max_abs_diff_logits_batch1": float(max(np.abs(s - ref_logits[i:i + 1]).max() for i, s in enumerate(single))),
            "top1_agreement": float((got_logits.argmax(1) == ref_logits.argmax(1)).mean()),
            "tolerance": tolerance,
            "onnxruntime": ort.__version__,
            "torch": torch.__version__.split("+")[0],
        }
        worst = max(parity["max_abs_diff_logits"], parity["max_abs_diff_embedding"], parity["max_abs_diff_logits_batch1"])
        if not worst <= tolerance:
            raise ParityError(f"ONNX differs from PyTorch by {worst:.3g} (> {tolerance:g}) on {len(inputs)} images; "
                              "no package written")
        card.onnx = OnnxSpec(file="model.onnx", opset=opset, exporter=f"torch.onnx (TorchScript) {torch.__version__}",
                             parity=parity)
        if variants:
            from export.variants import build_variants

            held_out, held_labels, calibration = labelled_splits(card, parity_data)
            card.onnx.variants = build_variants(staging, card, held_out, held_labels, calibration, variants,
                                                max_drop=max_int8_drop)
        if tensorrt != "off":
            from export.tensorrt import build_engine

            card.onnx.variants["tensorrt"] = build_engine(staging, card, pixels, mode=tensorrt)
        # The training weights travel with the package (safetensors: tensors only, no code), so that a
        # scheduled retrain can warm-start from whichever version is champion (TrainConfig.init_from).
        shutil.copy2(Path(run_dir) / WEIGHTS_FILENAME, staging / WEIGHTS_FILENAME)
        # The drift reference (medcl/drift.py) travels too; runs trained before it existed have none.
        if (Path(run_dir) / REFERENCE_FILE).is_file():
            shutil.copy2(Path(run_dir) / REFERENCE_FILE, staging / REFERENCE_FILE)
        card.save(staging)
    return Path(out_dir)


@contextmanager
def staged_package(out_dir: str | Path) -> Iterator[Path]:
    """A private folder beside ``out_dir`` to write a package into; on success it replaces ``out_dir``
    whole (a reader sees the old package or the new one, never a mixture); on any failure it is removed."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a service running as another user must read it
    try:
        yield staging
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
