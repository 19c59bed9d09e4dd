"""`cifarbench predict` and the safe image opener: any-size PNG/JPEG in, top-k out; bad files are one-line errors."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarbench.cli import main
from cifarbench.data import load_dataset
from cifarbench.data.images import MAX_PIXELS, ImageFileError, open_image
from cifarbench.image_files import prepare_image
from cifarbench.inference import predict_images, predict_test_set
from cifarbench.running import train_run
from cifarbench.training.recipes import make_config


@pytest.fixture
def trained(tiny_py: Path, tmp_path: Path) -> dict:
    config = make_config("fnn", "seed", epochs=1, batch_size=10, device="cpu", data_dir=str(tiny_py), verify=False)
    return train_run(config, runs_dir=tmp_path / "runs", progress=False).to_dict()


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature + IHDR (+ empty IDAT, IEND) that claims width×height RGB pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    paths = {"big.jpg": (480, 640, 3), "wide.png": (20, 90, 4), "small.png": (8, 8, 3), "grey.png": (40, 30)}
    out = {}
    for name, shape in paths.items():
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / name)
        out[name] = folder / name
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).convert("P").save(folder / "palette.png")
    out["palette.png"] = folder / "palette.png"
    return out


def test_open_image_accepts_png_and_jpeg_of_any_size_and_mode(images: dict[str, Path]) -> None:
    for name, path in images.items():
        img = open_image(path)
        assert img.mode == "RGB", name
    assert open_image(images["big.jpg"]).size == (640, 480)
    assert open_image(images["grey.png"], mode="L").mode == "L"


def test_prepare_image_resizes_to_the_models_input() -> None:
    rgb = Image.fromarray(np.full((300, 200, 3), 200, dtype=np.uint8))
    assert prepare_image(rgb, (3, 32, 32)).shape == (3, 32, 32)
    grey = prepare_image(rgb, (1, 28, 28))
    assert grey.shape == (1, 28, 28) and grey.dtype == np.uint8 and int(grey[0, 5, 5]) == 200


def bad_files(tmp_path: Path, images: dict[str, Path]) -> dict[str, tuple[Path, str]]:
    jpeg = images["big.jpg"].read_bytes()
    png = images["wide.png"].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "notes.png").write_text("not an image at all\n")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "anim.gif")
    return {
        "non-image": (tmp_path / "notes.png", "not a PNG or JPEG image"),
        "gif": (tmp_path / "anim.gif", "not a PNG or JPEG image"),
        "truncated jpeg": (tmp_path / "cut.jpg", "truncated"),
        "truncated png": (tmp_path / "cut.png", "truncated"),
        "bomb": (png_header_only(tmp_path / "huge.png", 20000, 20000), "decompression bomb"),
        "just over the limit": (png_header_only(tmp_path / "over.png", 10000, 10000), "decompression bomb"),
        "missing": (tmp_path / "nope.png", "does not exist"),
    }


def test_bad_images_are_refused_with_one_line_naming_the_file(tmp_path: Path, images: dict[str, Path]) -> None:
    assert 10000 * 10000 > MAX_PIXELS
    for case, (path, reason) in bad_files(tmp_path, images).items():
        with pytest.raises(ImageFileError) as err:
            open_image(path)
        message = str(err.value)
        assert reason in message and str(path) in message and "\n" not in message, (case, message)


def test_predict_prints_top_k_and_json(trained: dict, images: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    runs = str(tmp_path / "runs")
    files = [str(p) for p in images.values()]
    assert main(["predict", trained["run_id"], *files, "--top", "3", "--runs-dir", runs, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "fnn" and out["run_id"] == trained["run_id"]
    assert [p["image"] for p in out["predictions"]] == files
    for p in out["predictions"]:
        probs = [t["probability"] for t in p["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(t["class"] == out["classes"][t["index"]] for t in p["top"])
    checkpoint = str(Path(trained["run_dir"]) / "checkpoint.pt")
    assert main(["predict", checkpoint, files[0], "--top", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{files[0]}: ") and line.count("%") == 2


def test_a_test_image_saved_as_png_gets_the_test_sets_probabilities(trained: dict, tiny_py: Path,
                                                                    tmp_path: Path) -> None:
    # Same pixels, same normalisation: the file path and the test-set path must agree exactly.
    ref = str(Path(trained["run_dir"]) / "checkpoint.pt")
    expected = predict_test_set(ref, device="cpu")
    expected = {"probabilities": expected.probabilities, "labels": expected.labels}
    test_set = load_dataset(make_config("fnn", data_dir=str(tiny_py), verify=False).data).test
    Image.fromarray(np.moveaxis(test_set.images[3], 0, -1)).save(tmp_path / "test3.png")
    got = predict_images(ref, [tmp_path / "test3.png"], top=10, device="cpu")["predictions"][0]["top"]
    by_index = {t["index"]: t["probability"] for t in got}
    assert [by_index[i] for i in range(10)] == pytest.approx(expected["probabilities"][3].tolist(), abs=1e-6)
    assert expected["probabilities"].shape == (20, 10) and expected["labels"].shape == (20,)


def test_predict_cli_errors_are_one_line_and_exit_1(trained: dict, images: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    runs = str(tmp_path / "runs")
    for case, (path, reason) in bad_files(tmp_path, images).items():
        assert main(["predict", trained["run_id"], str(images["small.png"]), str(path), "--runs-dir", runs]) == 1, case
        captured = capsys.readouterr()
        lines = [ln for ln in captured.err.splitlines() if ln.strip()]
        assert captured.out == "" and len(lines) == 1 and reason in lines[0], (case, captured.err)
    assert main(["predict", trained["run_id"], str(images["small.png"]), "--top", "0", "--runs-dir", runs]) == 1
    assert "--top" in capsys.readouterr().err
