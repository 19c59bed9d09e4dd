"""cifarbench: train, compare and understand image classifiers on CIFAR-10."""

__version__ = "0.1.0"
