"""Controlled experiments: translation, corruptions and pixel permutation on tiny models and tiny data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cifarbench.data.dataset import Split
from cifarbench.data.loader import DeviceSplit
from cifarbench.errors import CifarbenchError
from cifarbench.evaluation import experiments
from cifarbench.evaluation.experiments import (
    CorruptedCopies,
    CorruptionResult,
    TranslationResult,
    corrupt_images,
    corruption_accuracy,
    inverse_permutation,
    permute_pixels,
    pixel_permutation,
    shift_images,
    translation_accuracy,
)
from cifarbench.evaluation.metrics import evaluate
from cifarbench.models import create_model
from cifarbench.reporting.plots import capacity_figure, loss_curves_figure, png_bytes, robustness_figure
from conftest import make_batch

MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.2, 0.3)  # not the notebook's 0.5s: a wrong normalisation must show


@pytest.fixture(scope="module")
def band_split() -> Split:
    images, labels = make_batch(np.random.default_rng(1), 100)
    return Split(images.reshape(-1, 3, 32, 32), labels.astype(np.int64))


def _trained(name: str, split: Split, channels_last: bool) -> torch.nn.Module:
    """A model fitted on the band images, so its accuracy is far from chance and sensitive to its inputs.

    Only the last two Linear layers are trained, on features computed once: a conv net's backward pass is
    too slow for a unit test on a shared CPU, and a random-feature head separates the bands well enough."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    data = DeviceSplit(split, torch.device("cpu"), MEAN, STD, channels_last=channels_last)
    x, y = data.normalise(data.images), data.labels
    features: list[torch.Tensor] = []
    hook = model.fc1.register_forward_hook(lambda m, inputs, out: features.append(inputs[0].detach()) and None)
    with torch.no_grad():
        model(x)
    hook.remove()
    params = [*model.fc1.parameters(), *model.fc2.parameters()]
    for _ in range(60):  # plain gradient descent: torch.optim's first import costs seconds
        logits = model.fc2(torch.relu(model.fc1(features[0])))
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=False):
                p -= 0.05 * g
    return model


@pytest.fixture(scope="module")
def fnn(band_split: Split) -> torch.nn.Module:
    return _trained("fnn", band_split, channels_last=False)


@pytest.fixture(scope="module")
def cnn_cl(band_split: Split) -> torch.nn.Module:
    return _trained("cnn", band_split, channels_last=True)


def _plain_accuracy(model, split, channels_last):
    return evaluate(model, DeviceSplit(split, torch.device("cpu"), MEAN, STD, channels_last=channels_last),
                    num_classes=10).accuracy


@pytest.mark.parametrize("model_name, channels_last", [("fnn", False), ("cnn_cl", True)])
def test_translation_by_zero_pixels_equals_plain_accuracy(request, band_split, model_name, channels_last):
    model = request.getfixturevalue(model_name)
    data = DeviceSplit(band_split, torch.device("cpu"), MEAN, STD, channels_last=channels_last)
    plain = _plain_accuracy(model, band_split, channels_last)
    assert plain > 0.5  # the fit worked, so a wrong normalisation would change the count
    result = translation_accuracy(model, data, mean=MEAN, std=STD, shifts=[0, 2], flip=True, batch_size=64,
                                  channels_last=channels_last)
    assert result.shifts == [0, 2]
    assert result.accuracy[0] == plain
    assert result.flip_accuracy is not None
    assert result.to_dict()["fill"] == "reflect"


def test_fnn_loses_the_bands_when_they_move(band_split, fnn):
    data = DeviceSplit(band_split, torch.device("cpu"), MEAN, STD)
    result = translation_accuracy(fnn, data, mean=MEAN, std=STD, shifts=[0, 6], flip=False, fill="zero")
    # Class k is a band at rows 3k..3k+2: six rows down is where class k+2's band was.
    assert result.accuracy[1] < result.accuracy[0] - 0.3
    assert result.flip_accuracy is None


def test_shift_images_moves_content_right_and_down_with_either_fill():
    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).view(2, 3, 5, 5)
    zero = shift_images(images, 2, "zero")
    assert zero.dtype == torch.uint8
    assert torch.equal(zero[..., 2:, 2:], images[..., :3, :3])
    assert zero[..., :2, :].eq(0).all() and zero[..., :, :2].eq(0).all()
    reflect = shift_images(images, 2, "reflect")
    assert torch.equal(reflect[..., 2:, 2:], images[..., :3, :3])
    assert torch.equal(reflect[..., 2, 0], images[..., 0, 2])  # column 2 mirrored into column 0
    assert torch.equal(shift_images(images, 0), images)
    with pytest.raises(CifarbenchError):
        shift_images(images, 5)


def test_corruption_severity_zero_is_the_plain_accuracy(band_split, fnn):
    data = DeviceSplit(band_split, torch.device("cpu"), MEAN, STD)
    result = corruption_accuracy(fnn, data, mean=MEAN, std=STD, severities=(0,))
    plain = _plain_accuracy(fnn, band_split, False)
    assert plain > 0.5
    assert result.clean_accuracy == plain
    assert set(result.accuracy) == {"gaussian_noise", "gaussian_blur", "contrast", "jpeg"}
    assert all(acc == [plain] for acc in result.accuracy.values())


def test_corruption_accuracy_is_deterministic_given_the_seed(band_split, fnn):
    data = DeviceSplit(band_split, torch.device("cpu"), MEAN, STD)
    args = dict(mean=MEAN, std=STD, kinds=("gaussian_noise",), severities=(5,), batch_size=50)
    first = corruption_accuracy(fnn, data, seed=3, **args)
    assert corruption_accuracy(fnn, data, seed=3, **args).to_dict() == first.to_dict()
    a = corrupt_images(data.images[:20], "gaussian_noise", 3, seed=3)
    assert torch.equal(a, corrupt_images(data.images[:20], "gaussian_noise", 3, seed=3))
    assert not torch.equal(a, corrupt_images(data.images[:20], "gaussian_noise", 3, seed=4))


class _Recorder(torch.nn.Module):
    """A 'model' that keeps every input it is given and answers class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return torch.zeros(len(x), 10)


def test_the_noise_an_image_gets_does_not_depend_on_the_evaluation_batch(band_split, monkeypatch):
    monkeypatch.setattr(experiments, "CORRUPT_CHUNK", 30)  # several chunks in the 100 images
    data = DeviceSplit(band_split, torch.device("cpu"), MEAN, STD)
    inputs = []
    for batch in (7, 50, 100):
        recorder = _Recorder()
        corruption_accuracy(recorder, data, mean=MEAN, std=STD, kinds=("gaussian_noise",), severities=(5,),
                            batch_size=batch, seed=2)
        inputs.append(torch.cat(recorder.seen[-(100 // batch + (100 % batch > 0)):]))  # the noisy pass
    assert not torch.equal(inputs[0], data.normalise(data.images))
    assert torch.equal(inputs[0], inputs[1]) and torch.equal(inputs[1], inputs[2])


def test_runs_on_the_same_images_share_each_corrupted_copy(band_split, fnn, monkeypatch):
    data = DeviceSplit(band_split, torch.device("cpu"), MEAN, STD)
    args = dict(mean=MEAN, std=STD, kinds=("gaussian_noise", "jpeg"), severities=(1, 5), batch_size=40, seed=1)
    alone = corruption_accuracy(fnn, data, **args).to_dict()
    made = []
    real = experiments.corrupt_images
    monkeypatch.setattr(experiments, "corrupt_images",
                        lambda x, kind, s, **kw: made.append((kind, s)) or real(x, kind, s, **kw))
    copies = CorruptedCopies(data.images)
    again = DeviceSplit(band_split, torch.device("cpu"), MEAN, STD)  # another run's split of the same images
    assert corruption_accuracy(fnn, data, copies=copies, **args).to_dict() == alone
    assert corruption_accuracy(fnn, again, copies=copies, **args).to_dict() == alone
    assert sorted(m for m in made if m[1]) == [("gaussian_noise", 1), ("gaussian_noise", 5), ("jpeg", 1), ("jpeg", 5)]
    other = DeviceSplit(Split(band_split.images[::-1].copy(), band_split.labels), torch.device("cpu"), MEAN, STD)
    assert not copies.made_from(other.images)
    with pytest.raises(ValueError, match="copies"):
        corruption_accuracy(fnn, other, copies=copies, **args)


@pytest.mark.parametrize("kind", ["gaussian_noise", "gaussian_blur", "contrast"])
def test_higher_severities_change_the_images_more(band_split, kind):
    images = torch.from_numpy(band_split.images[:50])
    changes = [(corrupt_images(images, kind, s).float() - images.float()).abs().mean().item() for s in range(6)]
    assert changes[0] == 0
    assert all(later > earlier for earlier, later in zip(changes, changes[1:], strict=False)), changes


def test_more_noise_changes_more_pixels():
    grey = torch.full((20, 3, 32, 32), 128, dtype=torch.uint8)
    changed = [(corrupt_images(grey, "gaussian_noise", s) != grey).float().mean().item() for s in range(1, 6)]
    assert all(later >= earlier for earlier, later in zip(changed, changed[1:], strict=False)), changed
    assert changed[-1] > changed[0]


def test_jpeg_corruption_keeps_shape_and_type_and_alters_the_pixels(band_split):
    images = torch.from_numpy(band_split.images[:8])
    out = corrupt_images(images, "jpeg", 5)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)


def test_unknown_corruption_or_severity_is_a_user_error(band_split):
    images = torch.from_numpy(band_split.images[:2])
    with pytest.raises(CifarbenchError, match="unknown corruption 'fog'"):
        corrupt_images(images, "fog", 1)
    with pytest.raises(CifarbenchError, match="severity"):
        corrupt_images(images, "contrast", 6)


def test_pixel_permutation_is_fixed_by_its_seed_and_shared_by_channels():
    p = pixel_permutation(7, (3, 32, 32))
    assert torch.equal(p, pixel_permutation(7, (32, 32)))
    assert not torch.equal(p, pixel_permutation(8, (3, 32, 32)))
    assert torch.equal(p.sort().values, torch.arange(32 * 32))
    image = torch.arange(32 * 32).view(1, 1, 32, 32).repeat(1, 3, 1, 1)
    scrambled = permute_pixels(image, p)
    assert torch.equal(scrambled[0, 0], scrambled[0, 2])  # every channel moved the same way
    assert torch.equal(scrambled[0, 0].flatten(), p)


def test_permutation_of_a_permutation_composes_and_the_inverse_restores(band_split):
    images = band_split.images[:10]
    p, q = pixel_permutation(1, (32, 32)), pixel_permutation(2, (32, 32))
    twice = permute_pixels(permute_pixels(images, p), q)
    assert np.array_equal(twice, permute_pixels(images, p[q]))
    assert np.array_equal(permute_pixels(permute_pixels(images, p), inverse_permutation(p)), images)
    torch_images = torch.from_numpy(images).contiguous(memory_format=torch.channels_last)
    assert np.array_equal(permute_pixels(torch_images, p).numpy(), permute_pixels(images, p))


def test_an_fnn_is_indifferent_to_a_pixel_permutation():
    """Scrambling the inputs and the first layer's columns the same way gives the same function."""
    torch.manual_seed(0)
    model = create_model("fnn").eval()
    p = pixel_permutation(5, (3, 32, 32))
    scrambled = create_model("fnn").eval()
    scrambled.load_state_dict(model.state_dict())
    with torch.no_grad():
        w = model.fc1.weight.view(-1, 3, 32 * 32)
        scrambled.fc1.weight.copy_(w[..., p].reshape(-1, 3 * 32 * 32))
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(scrambled(permute_pixels(x, p)), model(x))


def test_permutation_of_the_wrong_size_is_refused():
    with pytest.raises(CifarbenchError):
        permute_pixels(np.zeros((1, 3, 8, 8), dtype=np.uint8), pixel_permutation(0, (32, 32)))


# --- Their plots -------------------------------------------------------------------------------------------

def _translation(acc, flip):
    return TranslationResult(shifts=[0, 1, 2], accuracy=acc, flip_accuracy=flip, fill="reflect", n=100)


def _corruption(clean, noise):
    return CorruptionResult(clean_accuracy=clean, severities=[1, 2], accuracy={"gaussian_noise": noise, "jpeg": noise},
                            seed=0, n=100)


def test_robustness_figure_has_a_panel_per_experiment_and_whiskers_over_seeds():
    results = {
        "fnn": [{"translation": _translation([0.46, 0.30, 0.20], 0.45), "corruption": _corruption(0.46, [0.40, 0.30])},
                {"translation": _translation([0.47, 0.32, 0.21], 0.46).to_dict(),
                 "corruption": _corruption(0.47, [0.41, 0.33]).to_dict()}],
        "cnn": [{"translation": _translation([0.55, 0.53, 0.50], 0.55)}],
    }
    fig = robustness_figure(results)
    assert [ax.get_title() for ax in fig.axes] == ["Translation", "gaussian noise", "jpeg"]
    translation = fig.axes[0]
    fnn_line = translation.lines[0]
    np.testing.assert_allclose(fnn_line.get_ydata(), [46.5, 31.0, 20.5])  # the mean of the two seeds
    assert translation.containers  # error bars for the two-seed model
    assert [t.get_text() for t in translation.get_xticklabels()][-1] == "flip"
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), [46.5, 40.5, 31.5])  # clean first
    assert png_bytes(fig).startswith(b"\x89PNG")


def test_loss_curves_show_train_and_test_loss_with_seed_bands():
    seed = lambda shift: [{"epoch": e, "train_loss": 2.0 / e + shift, "test_loss": 1.5 + 0.1 * e + shift}  # noqa: E731
                          for e in (1, 2, 3)]
    fig = loss_curves_figure({"fnn": [seed(0.0), seed(0.2)], "cnn": [seed(0.1)]})
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["fnn train", "fnn test", "cnn train", "cnn test"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [2.1, 1.1, 2 / 3 + 0.1])
    assert len(ax.collections) == 2  # min-max bands for the two-seed model only
    assert ax.lines[1].get_linestyle() == "--"


def test_capacity_figure_plots_accuracy_against_params_and_flops_on_log_axes():
    rows = [{"model": "fnn", "params": 394_634, "flops_per_image": 788_480, "test_accuracy_mean": 0.46,
             "test_accuracy_std": 0.003},
            {"model": "cnn", "params": 315_722, "flops_per_image": 7_693_056, "test_accuracy_mean": 0.55,
             "test_accuracy_std": None}]
    fig = capacity_figure(rows)
    assert [ax.get_xscale() for ax in fig.axes] == ["log", "log"]
    assert [t.get_text() for t in fig.axes[1].texts] == ["fnn", "cnn"]
    assert fig.axes[1].lines[-1].get_xdata()[0] == 7_693_056
