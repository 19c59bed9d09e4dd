"""Write the example notebooks from the cells below, without outputs: `python examples/build_notebooks.py`.

The notebooks are kept as source here so a change to one is a readable diff; the tests check that the stored
.ipynb files match what this script writes, and execute them in a real kernel.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

SETUP = '''\
import os

import cifarbench as cb

# Where CIFAR-10 is: a folder holding cifar-10-batches-py/ (None: $CIFARBENCH_DATA, then ./data). cifarbench
# downloads it there the first time if it is missing (and checks every file against the official md5).
DATA = {
    "data_dir": os.environ.get("CIFARBENCH_DATA"),
    # A copy that is not byte-identical to the official files (a JPEG-compressed one, say) needs verify=False.
    "verify": os.environ.get("CIFARBENCH_VERIFY", "1") != "0",
    "download": os.environ.get("CIFARBENCH_OFFLINE") != "1",
}
# How many times each model is trained (with seeds 0, 1, ...): 1 is quick; 3 shows how much results vary.
SEEDS = 1
# Training as the classroom notebook did (5 epochs for the FNN, 10 for the CNN) takes minutes per model on a
# laptop. The tests run this notebook in seconds: CIFARBENCH_EXAMPLE_QUICK=1 trains one epoch per model,
# CIFARBENCH_EXAMPLE_BUDGET=S about S seconds per model, and CIFARBENCH_EXAMPLE_SEEDS=N sets SEEDS.
SHORT = {}
if os.environ.get("CIFARBENCH_EXAMPLE_QUICK") == "1":
    SHORT = {"epochs": 1}
if os.environ.get("CIFARBENCH_EXAMPLE_BUDGET"):
    SHORT = {"budget": float(os.environ["CIFARBENCH_EXAMPLE_BUDGET"])}
if os.environ.get("CIFARBENCH_EXAMPLE_SEEDS"):
    SEEDS = int(os.environ["CIFARBENCH_EXAMPLE_SEEDS"])'''

IMPROVED = '''\
from torch import nn


class ImprovedCNN(nn.Module):
    """The notebook's CNN with padding and batch normalisation."""

    def __init__(self, num_classes=10, in_shape=(3, 32, 32), width=32):
        super().__init__()
        channels, rows, cols = in_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * (rows // 4) * (cols // 4), 128), nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))'''

CELLS_01: list[tuple[str, str]] = [
    ("markdown", """\
# The classroom notebook, reproduced with cifarbench

The notebook *CIFAR10 comparison for regular Neural Network vs CNN* (Mastering AI Bootcamp) looks at the
CIFAR-10 images, trains a fully connected network (FNN) and a small convolutional network (CNN) on them, and gets
46% and 55% test accuracy. It recalls that on MNIST, handwritten digits, the same two models score 91% and 97%,
and concludes that a CNN is far superior to a regular network on images. It ends with an exercise: improve the
CNN's accuracy.

This notebook tells the same story with `cifarbench`, a few lines per step. The models and their training are
the notebook's own (the `seed` recipe: plain SGD with learning rate 0.01, batches of 100, no augmentation). What
changes is the evidence: accuracy and loss are measured over the whole test set, every run is recorded with its
settings and data, and a comparison can repeat each training with several seeds to show how much a result
varies.

Run the cells from top to bottom. The first one says where the data is and how long to train."""),
    ("code", SETUP),
    ("markdown", """\
## 1. Look at the data

CIFAR-10 has 60,000 colour images of 32×32 pixels in 10 classes: 50,000 for training and 10,000 for testing,
with the same number of images in every class. `cb.explore` loads the data set and shows how many images each
class has, and a row of random training images per class, like the notebook's grids."""),
    ("code", """\
data = cb.explore(per_class=10, **DATA)
data"""),
    ("markdown", """\
Look closely: at 32×32 pixels a cat is a few blotches of colour, and a truck and a car can look alike. Telling
them apart needs the shapes that neighbouring pixels make together, which is what a convolution looks at."""),
    ("markdown", """\
## 2. A regular network against a CNN

The FNN flattens each image into one long list of 3,072 numbers (32 × 32 pixels × 3 colours) and feeds it to
one hidden layer of 128 units: it has no idea which pixels are neighbours. The CNN slides small 3×3 filters
over the image, so the same pattern is recognised wherever it appears.

`cb.compare` trains both, one after the other, on the same data. While it trains it prints one line per epoch
(training loss, test loss and accuracy, seconds); when it is done the result shows a table and the learning
curves."""),
    ("code", """\
nn_vs_cnn = cb.compare(["fnn", "cnn"], recipe="seed", seeds=SEEDS, **DATA, **SHORT)
nn_vs_cnn"""),
    ("markdown", """\
The notebook printed the loss of the last batch only; here the test loss and accuracy are over all 10,000 test
images. With one seed the table says the spread is unknown: a single training can be lucky or unlucky, so set
`SEEDS = 3` in the first cell to see the mean ± standard deviation.

The loss curves show how training went: a training loss that is still falling at the end means the model
could learn more with more epochs."""),
    ("code", """\
nn_vs_cnn.plot(kind="loss")"""),
    ("markdown", """\
## 3. The MNIST contrast

The notebook says that on MNIST the gap is small: 91% against 97%. The same two models and the same training
can check that with `dataset="mnist"` (28×28 grey images of digits). cifarbench downloads MNIST the first time;
if it is not on this machine and there is no internet, the cell says so and moves on."""),
    ("code", """\
try:
    mnist = cb.compare(["fnn", "cnn"], recipe="seed", dataset="mnist", seeds=SEEDS, **DATA, **SHORT)
except cb.DataError as error:
    mnist = None
    print(f"MNIST is not available here, so this comparison is skipped ({error})")
mnist"""),
    ("markdown", """\
Digits are centred, grey and drawn on a plain background, so even a network that ignores which pixels are
neighbours gets most of them right. CIFAR-10's objects sit anywhere in the picture, in any colour, on any
background: that is where the CNN's filters pay off, and why the gap widens."""),
    ("markdown", """\
## 4. The exercise: improve the CNN

A model of your own is an ordinary PyTorch class, written in a cell. Pass the class itself to cifarbench.
This one keeps the notebook CNN's two convolutions and adds two common improvements:

- **padding**, so each convolution also looks at the pixels at the border of the image;
- **batch normalisation**, which keeps the numbers flowing through each layer in a steady range, so plain SGD
  can take useful steps from the very first batches.

cifarbench records the class's source code with every run, so a result can be checked and reproduced later,
even after you have edited the class."""),
    ("code", IMPROVED),
    ("markdown", """\
Now train it with the notebook's recipe and compare it with the notebook's CNN, trained the same way (and with
the same seeds)."""),
    ("code", """\
exercise = cb.compare(["cnn", ImprovedCNN], recipe="seed", seeds=SEEDS, **DATA, **SHORT)
exercise"""),
    ("markdown", """\
## 5. Change it and train again

Experimenting means editing the class and running its cell again. Does the network need all those filters?
Here it has half as many (`width=16`), so it is about four times cheaper to run. Run this cell as often as you
like, with other changes too: each training is recorded with the exact code it used."""),
    ("code", IMPROVED.replace("width=32", "width=16").replace(
        '"""The notebook\'s CNN with padding and batch normalisation."""',
        '"""The notebook\'s CNN with padding and batch normalisation, half as wide."""') + """


narrow = cb.train(ImprovedCNN, recipe="seed", **DATA, **SHORT)
narrow"""),
    ("markdown", """\
## 6. Where does it go wrong?

`cb.evaluate` scores a trained run on the whole test set again and shows its accuracy on each class; the
confusion matrix shows which classes it mistakes for which."""),
    ("code", """\
scores = cb.evaluate(narrow.run_id, **DATA)
scores"""),
    ("code", """\
scores.plot(kind="confusion")"""),
    ("markdown", """\
## 7. A report to hand in

`cb.report` writes one self-contained HTML file of stored runs: the comparison table, learning curves,
per-class accuracy, confusion matrices, the most confidently wrong test images, and every run's settings."""),
    ("code", """\
handed_in = cb.report([run.run_id for run in exercise.runs], "exercise-report.html", **DATA)
accuracy = exercise.results[1].test_accuracy_mean  # ImprovedCNN's, the mean over the seeds
print(f"The accuracy is {100 * accuracy:.2f}%; the report is in {handed_in.report}")"""),
    ("markdown", """\
## What this shows

With the same training, the CNN beats the fully connected network on CIFAR-10 by a wide margin, and the gap is
much smaller on MNIST: the notebook's point holds. Its 55% is far from what a CNN can do, though. Small changes
to the architecture (section 4) already help, and the training matters as much as the model:
`cb.train("speedrun", budget=120)` trains a network built for speed with a modern recipe (augmentation, a
learning-rate schedule, weight averaging) for two minutes; the README lists what such budgets reached on a
2-core CPU (about 87% in 120 seconds). Every result above is stored: `cb.run_history()` lists them."""),
]


SETUP_02 = SETUP.replace(
    "# How many times each model is trained (with seeds 0, 1, ...): 1 is quick; 3 shows how much results vary.\n"
    "SEEDS = 1",
    "# How many times each model is trained (with seeds 0, 1, ...). Whether a difference is real needs at least 2;\n"
    "# 3 gives a usable interval. Run the notebook before class: with 3 seeds its trainings took about 45 minutes\n"
    "# on a 2-core CPU (the CNN's ten epochs, about 7 minutes a seed, twice: plain and scrambled pixels).\n"
    "SEEDS = 3")
assert SETUP_02 != SETUP

CELLS_02: list[tuple[str, str]] = [
    ("markdown", """\
# Why a CNN wins on images

The classroom notebook trains a fully connected network (FNN) and a small convolutional network (CNN) on
CIFAR-10, gets about 46% and 55% test accuracy, and concludes that a CNN is far superior
(`01_notebook_reproduced.ipynb` reproduces that). This notebook is for the lesson after it. It asks two
questions with the same two models and the notebook's own training:

1. **Is the difference real**, or could another random seed have reversed it?
2. **Why does it happen?** What did each model learn, how do they cope with shifted, noisy or blurred images, and
   what is left of the CNN's advantage when the pixels are scrambled?

Every table and figure comes from the runs this notebook trains. `docs/why-cnn.md` in the project has the same
steps measured on the whole data set with three seeds, with the figures quoted below.

Run the cells from top to bottom; the first one says where the data is and how long to train."""),
    ("code", SETUP_02),
    ("markdown", """\
## 1. Is the difference real?

`cb.compare` trains both models with seeds 0, 1, 2 (each seed changes the initial weights and the order of the
batches) and compares them. Below its table of accuracies is the table that answers the question:

- **± is the spread over seeds** (sample standard deviation): how much training the same model again moves
  its accuracy.
- **accuracy B - A** is the difference of the means with a 95% interval, pairing seed 0 with seed 0 and so on.
  If the interval lies far from zero, seed noise does not explain the gap.
- **McNemar's test** looks at the test images one by one: how many only the FNN got right, and how many only
  the CNN. If both models were equally good, those two counts would be about equal; the p-value says how
  unlikely a split this lopsided would be if they were."""),
    ("code", """\
nn_vs_cnn = cb.compare(["fnn", "cnn"], recipe="seed", seeds=SEEDS, **DATA, **SHORT)
nn_vs_cnn"""),
    ("code", """\
pair = nn_vs_cnn.pairs[0]
print(f"{pair.b} minus {pair.a}: {pair.difference.format_percent()}")
for seed, test in pair.mcnemar.items():
    print(f"seed {seed}: only {pair.a} right on {test.b} test images, only {pair.b} right on {test.c}; "
          f"McNemar p = {test.p_value:.3g}")"""),
    ("markdown", """\
On the whole data set with three seeds, `docs/why-cnn.md` measured 46.14% ± 0.20 for the FNN and 55.89% ± 0.11
for the CNN: +9.74 points with a 95% interval of [+9.46, +10.03], and p = 3e-77. The notebook's conclusion
holds. The rest of this notebook is about *why*."""),
    ("markdown", """\
## 2. What the models learnt

`cb.explain` draws, for each run, the pictures that fit its architecture (here for seed 0 of each model):

- **FNN: class templates.** The FNN multiplies every pixel by its own weight. Multiplying its two weight
  matrices gives, for each class, one image-sized template that an input is compared with, pixel by pixel
  (the ReLU and the biases left out). Expect blurry colour blobs fixed to positions: a car in a corner matches
  none of them.
- **CNN: first-layer filters and feature maps.** Small 3×3 colour patterns that slide over *every* position of
  the image, and where each one responded to a test image, layer by layer. What is learnt once works
  everywhere.
- **Saliency** (both models, with the optional Captum package: `pip install -e '.[interpret]'`): for
  right and wrong predictions, the pixels the predicted class's score is most sensitive to, and for the CNN
  Grad-CAM, the regions its last convolution used.

The figures are also written to the folder `why-cnn/`, one subfolder per run."""),
    ("code", """\
learnt = cb.explain([run for run in nn_vs_cnn.runs if run.seed == 0], "why-cnn", **DATA)
learnt"""),
    ("markdown", """\
## 3. Shifted and mirrored images

If the CNN recognises a pattern wherever it is, does it still recognise an object that moved?
`cb.experiment("translation", ...)` scores every run again on test images shifted right and down by 0 to 4
pixels (the uncovered border filled by reflection), and mirrored. Each result is kept with its run."""),
    ("code", """\
shifted = cb.experiment("translation", nn_vs_cnn, **DATA)
shifted"""),
    ("markdown", """\
A fair lesson: on the whole data set both models lost about the same number of points at a 4-pixel shift (13.6
for the FNN, 13.3 for the CNN), and the CNN stayed about 10 points ahead at every shift. The notebook's CNN is
*not* shift-invariant: after two small pooling steps it ends in a large fully connected layer that is tied to
positions. Convolutions share what they learn across positions, which is why the CNN learns more from the same
images; invariance to large shifts has to be built in (more pooling, global pooling) or taught (shifted
training images, as the `fast` recipe's augmentation does)."""),
    ("markdown", """\
## 4. Noise, blur, contrast, JPEG

`cb.experiment("corruption", ...)` applies CIFAR-10-C style corruptions (Hendrycks and Dietterich's
parameters) at severities 1, 3 and 5, generated on the fly."""),
    ("code", """\
corrupted = cb.experiment("corruption", nn_vs_cnn, **DATA)
corrupted"""),
    ("markdown", """\
This one surprises students. On the whole data set the FNN hardly noticed noise, blur or JPEG, while the CNN
lost up to 12 points under strong blur and ended *below* the FNN there and at strong contrast loss. The FNN only
uses coarse colour blobs (its templates above), which blur and noise leave alone; the CNN's advantage comes from
fine local detail, edges and textures, which is exactly what blur and noise destroy. Winning on clean test
images and being robust are different questions."""),
    ("markdown", """\
## 5. Scrambled pixels: the experiment that shows why

`cb.permutation` trains both models again, with the same seeds and the same training, on images whose pixels
were moved by one fixed random permutation: the same for every training and test image. The plain runs above
have the same settings, so they are reused rather than trained again."""),
    ("code", """\
scrambled = cb.permutation(["fnn", "cnn"], recipe="seed", seeds=SEEDS, **DATA, **SHORT)
scrambled"""),
    ("markdown", """\
- **The FNN does not care.** It starts by flattening the image into a list of 3,072 numbers and gives every
  position its own weight, so a fixed reordering of the list is just a different labelling of its inputs.
  On the whole data set its accuracy on scrambled images was within seed noise of the plain one (-0.09 points,
  interval [-0.79, +0.61]).
- **The CNN loses its advantage, and more.** A convolution assumes that neighbouring pixels belong together and
  that a pattern means the same wherever it is. After the scramble, neighbours are unrelated pixels from all
  over the image. On the whole data set it dropped 15.3 points and ended 5.5 points *below* the FNN.

That is the answer to "why". The CNN is not better because it is bigger: it has fewer parameters than the FNN
(315,722 against 394,634), although it does about ten times as much arithmetic per image. It is better because
its architecture builds in what is true of photographs: nearby pixels go together, and the same pattern can
appear anywhere. Take that structure away and the advantage goes with it."""),
    ("markdown", """\
## 6. One file for the class

`cb.report` puts all of it into one self-contained HTML file: the comparison with its intervals and McNemar
tests, learning curves, per-class accuracy, confusion matrices, the stored translation and corruption results,
and the capacity figure."""),
    ("code", """\
handout = cb.report(scrambled.runs, "why-cnn.html", **DATA)
print(f"The report is in {handout.report}")"""),
]


def notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A notebook of `cells` ((kind, source) pairs) with no outputs, for a Python 3 kernel."""
    make = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    nb = nbformat.v4.new_notebook(cells=[make[kind](source) for kind, source in cells])
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: rewriting the notebook changes nothing that did not change
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    return nb


NOTEBOOKS = {"01_notebook_reproduced.ipynb": CELLS_01, "02_why_cnn.ipynb": CELLS_02}


def write_all(folder: Path = HERE) -> list[Path]:
    """Write every example notebook into `folder`."""
    paths = []
    for name, cells in NOTEBOOKS.items():
        path = folder / name
        path.write_text(nbformat.writes(notebook(cells)) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(f"wrote {written}")
