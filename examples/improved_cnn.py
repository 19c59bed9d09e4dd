"""A student's first improvement of the notebook's CNN: what changed, and why.

Compared with `CNNModel` in notebook_models.py:
- BatchNorm after each convolution: activations stay well scaled, so plain SGD at the notebook's rate learns
  much faster in the same 10 epochs.
- Padding 1 on each 3x3 convolution, and a third conv block: the feature maps keep their borders and the net sees
  larger patterns (8x8 -> 4x4 maps before the classifier).
- Dropout 0.25 before the classifier: less overfitting of the 50,000 training images.
- `flatten` instead of `view`, which works on any memory layout.

Try it against the notebook's CNN, trained the notebook's way:

    cifarbench compare cnn examples/improved_cnn.py:ImprovedCNN --recipe seed --seeds 3
"""

import torch
from torch import nn


class ImprovedCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 128))  # 32 -> 16 -> 8 -> 4
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(128 * 4 * 4, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
