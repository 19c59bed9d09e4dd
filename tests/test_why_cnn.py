"""Why the CNN wins, shown and not only claimed: `explain`, the translation, corruption and permuted-pixels
experiments, pairwise differences with their interval and McNemar's test, and validation figures end to end."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from cifarbench.cli import main
from cifarbench.comparing import pairwise
from cifarbench.config import DataConfig, TrainConfig
from cifarbench.data import ImageDataset, Split, original, prepare
from cifarbench.data.dataset import permuted_fingerprint
from cifarbench.errors import CifarbenchError
from cifarbench.evaluation.experiments import pixel_permutation
from cifarbench.explaining import summarise_experiment
from cifarbench.models.reference import label
from cifarbench.runs import folders
from cifarbench.runs.records import RunRecord, group_runs
from conftest import write_python_layout

PNG = b"\x89PNG\r\n\x1a\n"


def cli_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def small_dataset() -> ImageDataset:
    rng = np.random.default_rng(0)
    split = lambda n: Split(rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8), np.arange(n) % 10)  # noqa: E731
    return ImageDataset(name="cifar10", classes=tuple("abcdefghij"), train=split(6), test=split(4), sha256="f" * 64,
                        verified=False, source="here", layout="python")


# --- Fast: the pieces -------------------------------------------------------------------------------------

def test_prepare_permutes_train_and_test_alike_and_undoes_it() -> None:
    ds = small_dataset()
    permuted = prepare(ds, DataConfig(permute_pixels=7))
    assert permuted.permute_pixels == 7 and permuted.sha256 == permuted_fingerprint(ds.sha256, 7) != ds.sha256
    assert permuted.info()["permute_pixels"] == 7 and permuted.info()["base_sha256"] == ds.sha256
    assert "permute_pixels" not in ds.info()
    # one fixed permutation of positions, the same for every image and channel: the pixel multiset is kept
    assert not np.array_equal(permuted.train.images, ds.train.images)
    assert np.array_equal(np.sort(permuted.train.images.reshape(6, 3, -1), -1),
                          np.sort(ds.train.images.reshape(6, 3, -1), -1))
    permutation = pixel_permutation(7, (3, 4, 4)).numpy()
    for split, before in ((permuted.train, ds.train), (permuted.test, ds.test)):
        n = len(before)
        assert np.array_equal(split.images.reshape(n, 3, 16), before.images.reshape(n, 3, 16)[:, :, permutation])
        assert np.array_equal(split.labels, before.labels)
    back = original(permuted)
    assert back.sha256 == ds.sha256 and back.permute_pixels is None
    assert np.array_equal(back.train.images, ds.train.images) and np.array_equal(back.test.images, ds.test.images)
    assert prepare(permuted, DataConfig(permute_pixels=7)) is permuted
    other = prepare(permuted, DataConfig(permute_pixels=8))  # from one permutation to another goes through the original
    assert np.array_equal(other.train.images, prepare(ds, DataConfig(permute_pixels=8)).train.images)


def test_permute_pixels_is_a_validated_config_field() -> None:
    assert TrainConfig("fnn").data.permute_pixels is None
    config = TrainConfig("fnn").with_changes({"data.permute_pixels": 3})
    assert config.data.permute_pixels == 3 and TrainConfig.from_dict(config.to_dict()).data.permute_pixels == 3
    with pytest.raises(CifarbenchError, match="data.permute_pixels"):
        TrainConfig("fnn").with_changes({"data.permute_pixels": -1})
    with pytest.raises(CifarbenchError, match="data.permute_pixels"):
        TrainConfig("fnn").with_changes({"data.permute_pixels": 2.5})


def record(model: str, seed: int, acc: float, permute: int | None = None, run_id: str | None = None) -> RunRecord:
    config = {"data": {"permute_pixels": permute}}
    return RunRecord(run_id=run_id or f"{model}-{seed}-{permute}", model=model, recipe="seed", seed=seed, epochs=1,
                     test_accuracy=acc, config=config)


def test_permuted_runs_are_their_own_group() -> None:
    runs = [record("fnn", 0, 0.4), record("fnn", 0, 0.41, permute=0), record("cnn", 0, 0.5)]
    assert {k: [r.run_id for r in v] for k, v in group_runs(runs).items()} == {
        "fnn": ["fnn-0-None"], "fnn (permuted)": ["fnn-0-0"], "cnn": ["cnn-0-None"]}


def test_a_class_edited_and_trained_again_is_its_own_group() -> None:
    runs = [record("__main__:Net", 0, 0.5, run_id="a"), record("__main__:Net", 1, 0.5, run_id="b"),
            record("__main__:Net", 0, 0.6, run_id="c"), record("cnn", 0, 0.5, run_id="d")]
    for run, code in zip(runs, ["1a2b3c4d5e", "1a2b3c4d5e", "9f8e7d6c5b", None], strict=True):
        run.config["model_sha256"] = code
    assert {k: [r.run_id for r in v] for k, v in group_runs(runs).items()} == {
        "__main__:Net (code 1a2b3c4d)": ["a", "b"], "__main__:Net (code 9f8e7d6c)": ["c"], "cnn": ["d"]}
    assert list(group_runs(runs[:2])) == ["__main__:Net"]  # one version: no code in the label
    # figures and tables show the short name with its qualifier (a leading "_" would drop it from a legend)
    assert [label(name) for name in group_runs(runs)] == ["Net (code 1a2b3c4d)", "Net (code 9f8e7d6c)", "cnn"]


def test_pairwise_pairs_seeds_and_counts_disagreements() -> None:
    runs = [record("fnn", 0, 0.50), record("fnn", 1, 0.60), record("cnn", 0, 0.70), record("cnn", 1, 0.75)]
    correct = {"fnn-0-None": np.array([1, 1, 0, 0, 1], bool), "cnn-0-None": np.array([1, 0, 1, 1, 1], bool)}
    (pair,) = pairwise(runs, correct)
    assert (pair.a, pair.b, pair.seeds) == ("fnn", "cnn", [0, 1])
    assert pair.difference.mean_difference == pytest.approx(((0.70 - 0.50) + (0.75 - 0.60)) / 2)
    assert list(pair.mcnemar) == [0]  # seed 1 has no per-example correctness
    test = pair.mcnemar[0]
    assert (test.b, test.c) == (1, 2) and test.p_value == pytest.approx(1.0)  # 2 * P(X <= 1), X ~ Bin(3, 1/2) = 1
    assert pairwise(runs)[0].mcnemar == {}


def test_experiment_summary_is_mean_and_sample_std_per_condition() -> None:
    seeds = [{"shifts": [0, 2], "accuracy": [0.5, 0.3], "flip_accuracy": 0.45, "fill": "reflect", "n": 10},
             {"shifts": [0, 2], "accuracy": [0.6, 0.2], "flip_accuracy": None, "fill": "reflect", "n": 10}]
    rows = summarise_experiment("translation", {"fnn": seeds})
    assert [r.condition for r in rows] == ["shift 0 px", "shift 2 px", "mirrored"]
    shift2 = rows[1].accuracy["fnn"]
    assert (shift2.n, shift2.mean, shift2.std) == (2, pytest.approx(0.25), pytest.approx(statistics.stdev([0.3, 0.2])))
    assert rows[2].accuracy["fnn"].n == 1 and rows[2].accuracy["fnn"].std is None  # one seed: spread unknown
    corruption = {"clean_accuracy": 0.9, "severities": [1, 5], "accuracy": {"jpeg": [0.8, 0.4]}, "seed": 0, "n": 10}
    assert [r.condition for r in summarise_experiment("corruption", {"cnn": [corruption]})] == [
        "clean", "jpeg 1", "jpeg 5"]


def test_experiments_are_kept_per_name_and_the_folder_stays_deletable(tmp_path: Path) -> None:
    folder = tmp_path / "r1"
    folder.mkdir()
    (folder / folders.CONFIG).write_text(json.dumps({"run_id": "r1"}))
    folders.store_experiment(folder, "translation", {"shifts": [0]})
    folders.store_experiment(folder, "corruption", {"clean_accuracy": 0.5})
    folders.store_experiment(folder, "translation", {"shifts": [0, 1]})
    kept = folders.read_experiments(folder)
    assert kept == {"translation": {"shifts": [0, 1]}, "corruption": {"clean_accuracy": 0.5}}
    (folder / folders.EXPERIMENTS).write_text("{not json")
    assert folders.read_experiments(folder) == {}
    assert sorted(Path(f).name for f in folders.delete_run_folder(folder, "r1")) == [folders.CONFIG,
                                                                                       folders.EXPERIMENTS]


# --- End to end on tiny data ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """fnn and cnn, 2 seeds each, 2 epochs on the tiny data: shared by the end-to-end tests below."""
    root = tmp_path_factory.mktemp("why")
    data = write_python_layout(root / "data")
    runs = str(root / "runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFARBENCH_CACHE", str(root / "cache"))
        mp.delenv("CIFARBENCH_DATA", raising=False)
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            assert main(["compare", "fnn", "cnn", "--recipe", "seed", "--seeds", "2", "--epochs", "2", "--batch-size",
                         "20", "--data-dir", str(data), "--no-verify", "--device", "cpu", "--runs-dir", runs,
                         "--plot", str(root / "curves.png"), "--json"]) == 0
    compared = json.loads(out.getvalue())
    ids = [i for r in compared["results"] for i in r["run_ids"]]
    return {"root": root, "data": str(data), "runs": runs, "compared": compared, "ids": ids}


def stored(trained: dict) -> list[str]:
    return ["--runs-dir", trained["runs"], "--data-dir", trained["data"], "--no-verify", "--device", "cpu"]


@pytest.mark.slow
def test_compare_json_has_each_pair_with_interval_and_mcnemar(trained: dict) -> None:
    (pair,) = trained["compared"]["pairs"]
    assert (pair["a"], pair["b"], pair["seeds"]) == ("fnn", "cnn", [0, 1])
    assert pair["difference"]["low"] is not None and pair["difference"]["confidence"] == 0.95
    assert set(pair["mcnemar"]) == {"0", "1"} and pair["p_value_max"] == max(
        m["p_value"] for m in pair["mcnemar"].values())


@pytest.mark.slow
def test_runs_compare_prints_the_pairwise_table_and_mcnemar_only_with_predictions(
        trained: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(["runs", "compare", *trained["ids"], "--runs-dir", trained["runs"]]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("| cnn vs fnn"))
    assert "(95%, 2 seeds)" in row and row.split("|")[4].strip() == "-" and "add --mcnemar" in text
    with_test = cli_json(capsys, "runs", "compare", *trained["ids"], "--mcnemar", *stored(trained))
    assert with_test["pairs"][0]["mcnemar"] == trained["compared"]["pairs"][0]["mcnemar"]


@pytest.mark.slow
def test_explain_writes_templates_for_the_fnn_and_filters_and_feature_maps_for_the_cnn(
        trained: dict, capsys: pytest.CaptureFixture) -> None:
    out = trained["root"] / "explain"
    result = cli_json(capsys, "explain", *trained["ids"], "--out", str(out), "--examples", "2", *stored(trained))
    by_model = {r["label"]: r for r in result["runs"] if r["seed"] == 0}
    names = {m: sorted(Path(f).name for f in r["files"]) for m, r in by_model.items()}
    assert names == {"fnn": ["saliency.png", "templates.png"],
                     "cnn": ["feature-maps.png", "filters.png", "saliency.png"]}
    assert len(result["runs"]) == 4 and (out / "capacity.png").read_bytes()[:8] == PNG
    for run in result["runs"]:
        assert all(Path(f).parent == out / run["run_id"] and Path(f).read_bytes()[:8] == PNG for f in run["files"])


@pytest.mark.slow
def test_translation_and_corruption_give_each_condition_for_both_models_over_seeds(
        trained: dict, capsys: pytest.CaptureFixture) -> None:
    out = trained["root"] / "exp"
    shifted = cli_json(capsys, "experiment", "translation", *trained["ids"], "--shifts", "2", "--out", str(out),
                       *stored(trained))
    assert shifted["models"] == ["fnn", "cnn"] and Path(shifted["figure"]).read_bytes()[:8] == PNG
    assert [r["condition"] for r in shifted["rows"]] == ["shift 0 px", "shift 1 px", "shift 2 px", "mirrored"]
    for row in shifted["rows"]:
        for model in ("fnn", "cnn"):
            spread = row["accuracy"][model]
            assert spread["n"] == 2 and spread["std"] is not None
    # shift 0 is the plain test set: each run's stored accuracy (the seed recipe has no test-time augmentation)
    accuracy = {r["run_id"]: r["test_accuracy"] for r in trained["compared"]["runs"]}
    for run_id, result in shifted["results"].items():
        assert result["accuracy"][0] == pytest.approx(accuracy[run_id])
        kept = folders.read_experiments(Path(trained["runs"]) / run_id)
        assert kept["translation"] == result
    damaged = cli_json(capsys, "experiment", "corruption", *trained["ids"][:2], "--severities", "1,5", "--kinds",
                       "gaussian_noise,contrast", *stored(trained))
    assert [r["condition"] for r in damaged["rows"]] == ["clean", "gaussian noise 1", "gaussian noise 5",
                                                        "contrast 1", "contrast 5"]
    assert all(r["accuracy"]["fnn"]["n"] == 2 for r in damaged["rows"])
    assert main(["experiment", "corruption", trained["ids"][0], "--severities", "0,9", *stored(trained)]) == 1
    assert "--severities" in capsys.readouterr().err
    # the report built from the store shows the stored experiments as tables and a figure
    report = trained["root"] / "r.html"
    assert main(["report", *trained["ids"], "--out", str(report), *stored(trained)]) == 0
    html = report.read_text()
    assert "Experiment: translation" in html and "Experiment: corruption" in html and "<h2>Robustness</h2>" in html


@pytest.mark.slow
def test_permutation_trains_plain_and_permuted_runs_and_reuses_them(trained: dict,
                                                                   capsys: pytest.CaptureFixture) -> None:
    args = ["experiment", "permutation", "fnn", "--recipe", "seed", "--seeds", "2", "--epochs", "2", "--batch-size",
            "20", "--permutation-seed", "5", *stored(trained)]
    first = cli_json(capsys, *args)
    (row,) = first["rows"]
    assert row["model"] == "fnn" and row["plain"]["n"] == 2 and row["permuted"]["n"] == 2
    assert row["change"]["n"] == 2 and row["change"]["low"] is not None
    assert set(row["plain_runs"]) <= set(trained["ids"])  # the compare's fnn runs have the same config: reused
    assert sorted(first["reused"]) == sorted(row["plain_runs"])
    for run_id in row["permuted_runs"]:
        shown = cli_json(capsys, "runs", "show", run_id, "--runs-dir", trained["runs"])
        assert shown["config"]["data"]["permute_pixels"] == 5 and shown["dataset"]["permute_pixels"] == 5
        assert shown["dataset"]["base_sha256"] == trained["compared"]["dataset"]["sha256"]
    again = cli_json(capsys, *args)
    assert sorted(again["reused"]) == sorted(row["plain_runs"] + row["permuted_runs"])
    assert main([*args, "--permute-pixels", "1"]) == 1
    assert "--permute-pixels" in capsys.readouterr().err
    # eval re-scores a permuted run on permuted images: the stored accuracy, and the fingerprint it trained on
    evaluated = cli_json(capsys, "eval", row["permuted_runs"][0], *stored(trained))
    assert evaluated["dataset_matches_training"] and evaluated["dataset"]["permute_pixels"] == 5
    assert evaluated["test_accuracy"] == pytest.approx(
        next(r["test_accuracy"] for r in again["runs"] if r["run_id"] == row["permuted_runs"][0]))


@pytest.mark.slow
def test_from_python_the_experiments_take_records_and_display_their_tables_and_figures(trained: dict) -> None:
    import cifarbench as cb

    where = {"runs_dir": trained["runs"], "data_dir": trained["data"], "verify": False, "device": "cpu"}
    records = cb.stored_runs(trained["ids"], runs_dir=trained["runs"])
    shifted = cb.experiment("corruption", records, kinds=["contrast"], severities=[5], **where)
    comparison = cb.Comparison(results=[], runs=records)  # a result's runs are taken as they are
    assert cb.experiment("corruption", comparison, kinds=["contrast"], severities=[5], **where).results == \
        shifted.results
    assert shifted.runs_by_model == {"fnn": trained["ids"][:2], "cnn": trained["ids"][2:]}
    html = shifted._repr_html_()
    assert "<table" in html and "contrast 5" in html and html.count('<img src="data:image/png;base64,') == 1
    assert len(repr(shifted)) < 200 and type(shifted.plot()).__name__ == "Figure"
    with pytest.raises(CifarbenchError, match="experiment\\(\\) has no keyword 'no_verify'; pass verify=False"):
        cb.experiment("translation", records, no_verify=True)
    with pytest.raises(CifarbenchError, match="did you mean examples"):
        cb.explain(records, trained["root"] / "x", example=2)
    with pytest.raises(CifarbenchError, match="runs: expected run ids, RunRecords or a Comparison, not int"):
        cb.report([records[0], 7], trained["root"] / "r.html")
    with pytest.raises(CifarbenchError, match="not int"):
        cb.experiment("translation", 7)

    scrambled = cb.permutation(["fnn"], seeds=2, recipe="seed", epochs=2, batch_size=20, permutation_seed=5,
                               progress=False, on_epoch=lambda *_: None, **where)
    html = scrambled._repr_html_()
    assert "permuted - plain (95% interval)" in html and f"{scrambled.rows[0].change.format_percent()}" in html
    assert html.count('<img src="data:image/png;base64,') == 1 and "fnn" in repr(scrambled)
    bars = scrambled.plot().axes[0]
    assert [round(b.get_height(), 6) for b in bars.patches] == [
        round(100 * scrambled.rows[0].plain.mean, 6), round(100 * scrambled.rows[0].permuted.mean, 6)]


@pytest.mark.slow
def test_one_seed_says_its_spread_and_interval_are_unknown(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_python_layout(tmp_path / "data")
    assert main(["compare", "fnn", "cnn", "--recipe", "seed", "--seeds", "1", "--epochs", "1", "--batch-size", "20",
                 "--data-dir", str(data), "--no-verify", "--device", "cpu", "--plot", str(tmp_path / "c.png")]) == 0
    text = capsys.readouterr().out
    assert "(1 seed: spread unknown)" in text and "± 0.00" not in text
    assert "(1 seed: no interval)" in text and "| cnn vs fnn" in text


@pytest.mark.slow
def test_validation_figures_in_runs_show_and_the_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_python_layout(tmp_path / "data")
    run = cli_json(capsys, "train", "fnn", "--val-split", "20", "--epochs", "2", "--batch-size", "20", "--data-dir",
                   str(data), "--no-verify", "--device", "cpu")
    assert main(["runs", "show", run["run_id"]]) == 0
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("| epoch"))
    assert "val loss" in header and "val acc" in header
    last = run["history"][-1]
    assert f"{last['val_loss']:.4f}" in table and f"{100 * last['val_accuracy']:.2f}%" in table
    report = tmp_path / "r.html"
    assert main(["report", run["run_id"], "--out", str(report), "--data-dir", str(data), "--no-verify",
                 "--device", "cpu"]) == 0
    html = report.read_text()
    assert "validation accuracy (last epoch)" in html and f"{100 * last['val_accuracy']:.2f}%" in html
    assert "Loss curves" in html


def test_learning_curves_draw_validation_when_runs_have_it() -> None:
    from cifarbench.reporting.plots import learning_curves_figure

    history = [{"epoch": 1, "seconds": 1.0, "test_accuracy": 0.3, "val_accuracy": 0.35},
               {"epoch": 2, "seconds": 2.0, "test_accuracy": 0.4, "val_accuracy": 0.42}]
    labels = learning_curves_figure({"fnn": [history]}).axes[0].get_legend_handles_labels()[1]
    assert labels == ["fnn", "fnn validation"]
    plain = [{k: v for k, v in h.items() if k != "val_accuracy"} for h in history]
    assert learning_curves_figure({"fnn": [plain]}).axes[0].get_legend_handles_labels()[1] == ["fnn"]
