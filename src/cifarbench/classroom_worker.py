"""The grader's child process: rebuild one submitted run (its own code trusted) and return the class it gives
each image, nothing else. It never sees a label, so the scores are the grader's; it runs inside
`sandbox.run_boxed`, and whatever the student's code does here ends this process only.

`python -m cifarbench.classroom_worker REQUEST_JSON` writes one JSON object on stdout: `SPLIT_TTA` -> the class
of each image, for each image file and test-time augmentation asked for (`own`: the run's own setting). Plain
JSON, so that the grader reads back nothing but numbers, in a size it bounds.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    request = json.loads((argv if argv is not None else sys.argv[1:])[0])
    out = os.dup(1)
    os.dup2(2, 1)  # whatever the model code prints goes to stderr, not into the result

    from cifarbench.inference import load_trained_model

    loaded = load_trained_model(request["checkpoint"], device=request["device"], trust_code=True)
    predictions = {}
    for split, path in request["images"].items():
        images = np.load(path, allow_pickle=False)
        for tta in request["ttas"]:
            predicted = loaded.predicted_classes(images, tta=None if tta == "own" else int(tta))
            predictions[f"{split}_{tta}"] = predicted.tolist()
    view = memoryview(json.dumps(predictions).encode())
    while view:
        view = view[os.write(out, view):]
    return 0


if __name__ == "__main__":
    sys.exit(main())
