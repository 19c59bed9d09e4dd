"""The grader's child process: rebuild one submitted run (its own code trusted) and return the class it gives
each image, nothing else. It never sees a label, so the scores are the grader's; it runs inside
`sandbox.run_boxed`, and whatever the student's code does here ends this process only.

`python -m cifarbench.classroom_worker REQUEST_JSON` writes an .npz on stdout: `params`, then `SPLIT_TTA` arrays of
predicted classes for each image file and test-time augmentation asked for (`own`: the run's own setting).
"""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    request = json.loads((argv if argv is not None else sys.argv[1:])[0])
    out = os.dup(1)
    os.dup2(2, 1)  # whatever the model code prints goes to stderr, not into the result

    from cifarbench.inference import load_trained_model
    from cifarbench.models import count_parameters

    loaded = load_trained_model(request["checkpoint"], device=request["device"], trust_code=True)
    arrays = {"params": np.array([count_parameters(loaded.model)], dtype=np.int64)}
    for split, path in request["images"].items():
        images = np.load(path, allow_pickle=False)
        for tta in request["ttas"]:
            arrays[f"{split}_{tta}"] = loaded.predicted_classes(images, tta=None if tta == "own" else int(tta))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    view = memoryview(buffer.getvalue())
    while view:
        view = view[os.write(out, view):]
    return 0


if __name__ == "__main__":
    sys.exit(main())
