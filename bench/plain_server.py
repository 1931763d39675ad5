"""The plain alternative users write (the spec's serving.py): FastAPI + eager PyTorch, one image per request.

Loads the same registered model from MLflow (``models:/NAME/VERSION``, the pickled torch module) and
uses torchvision transforms like the spec. Run by bench/serve.py; not part of the product.
    python bench/plain_server.py --model-uri models:/product-classifier/1 --port 8000
"""

from __future__ import annotations

import argparse
import io

import mlflow
import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from torchvision import transforms

from ml.config import get_settings

CLASSES = get_settings().classes


class ModelHandler:
    def __init__(self, model_uri: str) -> None:
        self.model = mlflow.pytorch.load_model(model_uri)
        self.model.eval()
        self.transform = transforms.Compose(
            [
                transforms.Resize((224, 224)),
                transforms.ToTensor(),
                transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
            ]
        )

    def predict(self, image_bytes: bytes) -> dict:
        image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
        with torch.no_grad():
            outputs = self.model(self.transform(image).unsqueeze(0))
            probabilities = torch.nn.functional.softmax(outputs[0], dim=0)
        best = int(torch.argmax(probabilities).item())
        return {
            "predicted_class": CLASSES[best],
            "confidence": float(probabilities[best].item()),
            "all_probabilities": {
                name: float(p.item()) for name, p in zip(CLASSES, probabilities, strict=True)
            },
        }


def create_app(model_uri: str) -> FastAPI:
    handler = ModelHandler(model_uri)
    app = FastAPI()

    @app.post("/predict")
    async def predict(image: UploadFile = File(...)) -> dict:  # noqa: B008 - FastAPI's idiom
        return handler.predict(await image.read())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "healthy"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    mlflow.set_tracking_uri(args.tracking_uri)
    uvicorn.run(create_app(args.model_uri), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
