"""TorchServe handler for a medcl package: the card's preprocessing, onnxruntime, the service's answer.

Packed into the ``.mar`` by ``medcl export --format mar``. It runs the same ``model.onnx`` with the
same preprocessing (``medcl.preprocess``) as the BentoML service and answers each image with the
same fields as ``/classify``: label, score, top_k, model_version. Needs ``medcl`` (its ``serve``
extra; no torch is used) installed in TorchServe's Python environment. An undecodable image gets
HTTP 400 with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_handler = None


class MedclHandler:
    def __init__(self, model_dir: str) -> None:
        import onnxruntime as ort

        from medcl.card import Card

        self.card = Card.load(Path(model_dir))
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(Path(model_dir) / "model.onnx"), providers=providers)

    def handle(self, rows: list[dict], context) -> list:
        from medcl.preprocess import ImageDecodeError, decode_image, normalise, to_model_pixels

        answers: list = [None] * len(rows)
        pixels, positions = [], []
        for i, row in enumerate(rows):
            payload = row.get("data") or row.get("body") or row.get("images")
            try:
                if not isinstance(payload, (bytes, bytearray)):
                    raise ImageDecodeError("send the image as the request body or as a file field")
                pixels.append(to_model_pixels(decode_image(bytes(payload)), self.card.preprocess))
                positions.append(i)
            except ImageDecodeError as e:
                context.set_response_status(400, str(e), idx=i)
                answers[i] = {"error": str(e)}
        if pixels:
            logits = self.session.run(["logits"], {"image": normalise(np.stack(pixels), self.card.preprocess)})[0]
            for i, row in zip(positions, logits):
                answers[i] = self._answer(row)
        return answers

    def _answer(self, logits: np.ndarray) -> dict:
        z = np.exp(logits - logits.max())
        probs = z / z.sum()
        order = np.argsort(-probs)[:5]
        names = self.card.class_names
        return {"label": names[order[0]], "score": float(probs[order[0]]),
                "top_k": [{"label": names[j], "probability": float(probs[j])} for j in order],
                "model_version": self.card.version}


def handle(data: list[dict] | None, context) -> list | None:
    """TorchServe's module-level entry point: initialise once, then answer each batch."""
    global _handler
    if data is None:
        return None
    if _handler is None:
        _handler = MedclHandler(context.system_properties["model_dir"])
    return _handler.handle(data, context)
