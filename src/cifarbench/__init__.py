"""cifarbench: train, compare and understand image classifiers on CIFAR-10."""

import os

# MKL's strict reproducibility mode makes its matrix products give the same bits whatever the thread count
# (measured here: no slower), so a seed trained in a 1-thread `compare --jobs` worker matches the same seed
# trained with every core. MKL reads this at its first call, so setting it here, before any work, is enough.
# oneDNN's convolution gradients have no such mode: conv nets still differ in the last bits across thread
# counts. A user's own setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
