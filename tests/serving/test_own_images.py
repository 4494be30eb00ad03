"""Your own images end to end: a folder of photos trained on, evaluated, exported and served at
224 x 224 (the ImageNet stem), and /predict answering with the folder's class names."""
from __future__ import annotations

import io

import httpx
import numpy as np
from PIL import Image

from evaluation.robustness import evaluate_checkpoint
from export import export_checkpoint
from helpers import FOLDER_CLASSES, FOLDER_RUN, SERVER_ENV, write_image_folder
from serving.launch import Server
from training import trainer
from training.config import resolve


def test_a_folder_of_photos_is_trained_evaluated_exported_and_served_with_its_class_names(tmp_path):
    root = write_image_folder(tmp_path / "photos")
    cfg = resolve(data_dir=str(root), **{**FOLDER_RUN, "image_size": 224, "router_stride": 2})
    best = trainer.train(cfg, tmp_path / "run", log=lambda *a: None, max_steps=2, test_examples=6).best
    evaluated = evaluate_checkpoint(best, n_examples=4, attacks=("pgd",), out=tmp_path / "eval")
    assert evaluated["examples"] == 4 and evaluated["dataset"] == "folder"
    exported = export_checkpoint(best, tmp_path / "export", ["onnx", "bento"], time_runtimes=False, log=lambda *a: None)
    photo = io.BytesIO()  # any size and mode: the service converts and resizes it to the model's 3x224x224
    Image.fromarray(np.full((90, 130, 4), (40, 160, 60, 255), np.uint8), "RGBA").save(photo, "PNG")
    with Server({**SERVER_ENV, "ADVMOE_MODEL_TAG": exported.bento_tag}, log_path=tmp_path / "serve.log") as server:
        answer = httpx.post(f"{server.url}/predict", files={"images": ("leaf.png", photo.getvalue(), "image/png")},
                            data={"top_k": "3"}, timeout=60)
        info = httpx.get(f"{server.url}/model_info", timeout=60).json()
    assert answer.status_code == 200, answer.text
    top = answer.json()["predictions"][0]["top_k"]
    assert sorted(p["class"] for p in top) == sorted(FOLDER_CLASSES)
    assert info["classes"] == list(FOLDER_CLASSES) and info["dataset"] == "folder"
