"""Run the classroom notebook's own training code, as faithfully as we can.

This is a reference point for comparing accuracy and wall time against the
``cifarbench`` package. It deliberately does NOT use ``cifarbench``: it copies
the notebook (``shared/seed/notebook-cifar10-nn-vs-cnn.txt``) -- its FNNModel
and CNNModel, CrossEntropyLoss, plain SGD lr 0.01, batch 100, FNN 5 epochs,
CNN 10 epochs, its ``accuracy`` function and its evaluation loop.

The notebook reads data through torchvision (``datasets.CIFAR10`` with
``transforms.ToTensor()`` and ``transforms.Normalize((0.5,)*3, (0.5,)*3)``,
fed one PIL image at a time through a ``DataLoader``). torchvision is not a
dependency here, so ``TorchvisionLikeCIFAR10`` below is a minimal stand-in
that does the same per-sample work: ``PIL.Image.fromarray`` on an HWC uint8
array, ToTensor (CHW float in [0, 1]) and Normalize (to [-1, 1]). The
per-sample Python/PIL overhead is kept on purpose, since it is part of the
notebook's wall time.

Usage::

    python benchmarks/notebook_reference.py [--data-dir DIR] [--models fnn cnn]
        [--seed 0] [--epochs-fnn 5] [--epochs-cnn 10]

``DIR`` (default ``$CIFARBENCH_DATA``) holds CIFAR-10 in either official layout; the
arrays are read (untimed) with cifarbench's safe loader, without md5 verification. One JSON object is printed on stdout;
per-epoch progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset


def load_split(data_dir: str | None, train: bool) -> tuple[np.ndarray, list[int]]:
    """Arrays from cifarbench's safe loader (untimed); the notebook's per-sample pipeline starts after."""
    from cifarbench.data.cifar10 import load_cifar10

    ds = load_cifar10(data_dir, verify=False, download=False)
    split = ds.train if train else ds.test
    # N x 3 x 32 x 32 -> N x 32 x 32 x 3 (HWC), exactly as torchvision.datasets.CIFAR10 stores them.
    return np.ascontiguousarray(split.images.transpose(0, 2, 3, 1)), split.labels.tolist()


# --------------------------------------------------------------------------
# torchvision stand-in: per-sample PIL -> ToTensor -> Normalize
# --------------------------------------------------------------------------


class TorchvisionLikeCIFAR10(Dataset):
    """Behaves like ``datasets.CIFAR10(..., transform=Compose([ToTensor(), Normalize(.5, .5)]))``."""

    def __init__(self, images: np.ndarray, targets: list[int],
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        self.data = images  # N x 32 x 32 x 3 uint8
        self.targets = targets
        self._mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        img, target = self.data[index], self.targets[index]
        # torchvision: "doing this so that it is consistent with all other datasets
        # to return a PIL Image"
        pil = Image.fromarray(img)
        # transforms.ToTensor
        # (torchvision copies the PIL buffer: np.array(pic, copy=True); np.asarray
        # would hand torch a read-only view and trigger a warning.)
        tensor = torch.from_numpy(np.array(pil, copy=True)).permute(2, 0, 1).float().div(255)
        # transforms.Normalize (not in place)
        tensor = (tensor - self._mean) / self._std
        return tensor, target


# --------------------------------------------------------------------------
# The notebook's models, loss, optimiser, accuracy, training and evaluation
# --------------------------------------------------------------------------


def _notebook_models():
    """The notebook's two classes, verbatim, from examples/notebook_models.py (one copy in the repository)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "notebook_models.py"
    spec = importlib.util.spec_from_file_location("notebook_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FNNModel, module.CNNModel


FNNModel, CNNModel = _notebook_models()
MODELS = {"fnn": FNNModel, "cnn": CNNModel}


def accuracy(outputs, labels):
    _, preds = torch.max(outputs, dim=1)
    return torch.tensor(torch.sum(preds == labels).item() / len(preds))


def run_model(name: str, epochs: int, seed: int, train_set: Dataset, test_set: Dataset) -> dict:
    torch.manual_seed(seed)
    model = MODELS[name]()

    # The notebook builds its loaders without a generator, so shuffling draws
    # from torch's global RNG, which the seed above fixes.
    train_loader = DataLoader(train_set, batch_size=100, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=100, shuffle=False)

    loss_fn = nn.CrossEntropyLoss()
    learning_rate = 0.01
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)

    # Train (timed: the training loop only)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        for images, labels in train_loader:
            outputs = model(images)
            loss = loss_fn(outputs, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        # The notebook prints the last batch's loss; its FNN cell says "/10" while
        # running 5 epochs -- we print the real epoch count.
        print(f"[{name}] Epoch [{epoch + 1}/{epochs}], Loss: {loss.item():.4f}",
              file=sys.stderr, flush=True)
    train_seconds = time.perf_counter() - t0

    # Evaluate (timed separately): the notebook's loop, plus whole-test-set totals.
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        accum_acc = 0
        total_correct = 0
        total_loss = 0.0
        total_n = 0
        for images, labels in test_loader:
            outputs = model(images)
            loss = loss_fn(outputs, labels)
            acc = accuracy(outputs, labels)
            accum_acc += acc
            n = len(labels)
            total_correct += int((outputs.argmax(dim=1) == labels).sum().item())
            total_loss += loss.item() * n
            total_n += n
        notebook_accuracy = float(accum_acc / len(test_loader))
        last_batch_loss = float(loss.item())
    eval_seconds = time.perf_counter() - t0

    print(f"[{name}] Test loss: {last_batch_loss:.4f}, Test accuracy: {notebook_accuracy:.4f}", file=sys.stderr,
          flush=True)

    return {
        "model": name,
        "epochs": epochs,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        # Mean of per-batch accuracies, as the notebook prints it.
        "notebook_accuracy": notebook_accuracy,
        # Whole test set: correct / N, and mean per-sample cross-entropy.
        "test_accuracy": total_correct / total_n,
        "test_loss": total_loss / total_n,
        # What the notebook labels "Test loss": the last test batch's loss.
        "notebook_test_loss": last_batch_loss,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("CIFARBENCH_DATA"),
                        help="folder containing cifar-10-batches-py/ (default: $CIFARBENCH_DATA)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["fnn", "cnn"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs-fnn", type=int, default=5)
    parser.add_argument("--epochs-cnn", type=int, default=10)
    args = parser.parse_args(argv)

    from cifarbench import runtime
    from cifarbench.errors import CifarbenchError

    runtime.configure()  # the same reproducibility settings as cifarbench's own runs

    try:
        train_images, train_labels = load_split(args.data_dir, train=True)
        test_images, test_labels = load_split(args.data_dir, train=False)
    except CifarbenchError as exc:
        print(f"notebook_reference: {exc}", file=sys.stderr)
        return 1

    train_set = TorchvisionLikeCIFAR10(train_images, train_labels)
    test_set = TorchvisionLikeCIFAR10(test_images, test_labels)

    epochs = {"fnn": args.epochs_fnn, "cnn": args.epochs_cnn}
    results = [run_model(name, epochs[name], args.seed, train_set, test_set) for name in args.models]

    print(json.dumps({
        "benchmark": "notebook_reference",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "results": results,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
