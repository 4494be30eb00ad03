"""Write the example inputs the curl commands of docs/serving.md send: the first Fashion-MNIST
test images as PNG files and as one .npy batch [4, 1, 28, 28] in [0, 1].

    python docs/examples/make_examples.py
"""
from pathlib import Path

import numpy as np
from PIL import Image

from advmoe.data import load_dataset

HERE = Path(__file__).parent

if __name__ == "__main__":
    test = load_dataset("fashion_mnist", "test")
    images = np.stack([test[i][0].numpy() for i in range(4)])
    labels = [int(test[i][1]) for i in range(4)]
    for i in range(2):
        Image.fromarray((images[i, 0] * 255).round().astype(np.uint8)).save(HERE / f"fmnist-test-{i}.png")
    np.save(HERE / "fmnist-test-0-3.npy", images.astype(np.float32))
    print("labels", labels)
