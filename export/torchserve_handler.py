"""TorchServe handler for a medcl package: the card's preprocessing, onnxruntime, the service's answer.

Packed into the ``.mar`` by ``medcl export --format mar``. It runs the same ``model.onnx`` with the
same preprocessing (``medcl.preprocess``) as the BentoML service and answers each image with the
same fields as ``/classify``: label, score, top_k, model_version. Needs ``medcl`` (its ``serve``
extra; no torch is used) installed in TorchServe's Python environment. An undecodable image gets
HTTP 400 with the reason.
"""

from __future__ import annotations

import numpy as np

_handler = None


class MedclHandler:
    def __init__(self, model_dir: str) -> None:
        from service.package import ModelPackage

        # The same session set-up as the service (provider choice TensorRT -> CUDA -> CPU, threads).
        self.package = ModelPackage(model_dir)
        self.card = self.package.card

    def handle(self, rows: list[dict], context) -> list:
        from medcl.answers import softmax, top_k
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
            probs = softmax(self.package.run(normalise(np.stack(pixels), self.card.preprocess), "logits"))
            for i, row in zip(positions, probs):
                best = top_k(row, self.card.class_names, 5)
                answers[i] = {"label": best[0][0], "score": best[0][1],
                              "top_k": [{"label": name, "probability": p} for name, p in best],
                              "model_version": self.card.version}
        return answers


def handle(data: list[dict] | None, context) -> list | None:
    """TorchServe's module-level entry point: initialise once, then answer each batch."""
    global _handler
    if data is None:
        return None
    if _handler is None:
        _handler = MedclHandler(context.system_properties["model_dir"])
    return _handler.handle(data, context)
