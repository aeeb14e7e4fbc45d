import pytest
import torch

from alexdist.models import MODELS, build_model, count_params, describe_models, flops_per_image


@pytest.mark.parametrize(
    "name, expected, tolerance",
    [
        ("alexnet", 58.1e6, 0.3e6),  # the report's "about 58.1 M" at 227 px
        ("alexnet_3x3", 15.9e6, 0.3e6),  # the report's "about 15.9 M"
        ("alexnet_bn", 14.66e6, 0.05e6),  # VGG-BN widths, 12 convs, 512-512 classifier
    ],
)
def test_parameter_counts_match_the_students_report(name, expected, tolerance):
    assert abs(count_params(build_model(name)) - expected) <= tolerance


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("size", [32, 227])
def test_every_model_gives_ten_logits_at_32_and_227_px(name, size):
    model = build_model(name, size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_parameter_count_does_not_depend_on_input_size(name):
    # Weights move between 32 px and 227 px runs.
    assert count_params(build_model(name, 32)) == count_params(build_model(name, 227))


def test_alexnet_at_227px_has_the_original_feature_map_sizes():
    model = build_model("alexnet", 227)
    feats = model.features(torch.zeros(1, 3, 227, 227))
    assert feats.shape == (1, 256, 6, 6)  # 55 -> 27 -> 13 -> 6, as in Krizhevsky et al.


def test_flops_grow_with_input_size_and_width():
    m32, m227 = build_model("alexnet_bn", 32), build_model("alexnet_bn", 227)
    f32, f227 = flops_per_image(m32, 32), flops_per_image(m227, 227)
    assert 0.4e9 < f32 < 0.7e9
    assert f227 > 40 * f32  # ~ (227/32)^2 = 50x
    narrow = build_model("alexnet_bn", 32, width_mult=0.5)
    assert flops_per_image(narrow, 32) < 0.3 * f32


def test_model_listing_command_reports_params_and_flops(capsys):
    from alexdist.commands.models import main

    assert main([]) == 0
    out = capsys.readouterr().out
    for name in MODELS:
        assert name in out
    assert "58,322,314" in out
    rows = {r["name"]: r for r in describe_models()}
    assert rows["alexnet"]["input_size"] == 227 and rows["alexnet_bn"]["input_size"] == 32


def test_the_lars_papers_alexnet_bn_is_alexnet_with_batchnorm_after_every_conv_and_no_lrn():
    """You et al. 2017's AlexNet-BN: alexnet's five convs, each followed by BatchNorm (and a ReLU), no LRN; the
    convs lose their bias to BatchNorm's shift: 1,376 biases fewer, 2,752 BN weights more than alexnet."""
    model = build_model("alexnet_bn_lars2017", 227, num_classes=1000)
    layers = list(model.features)
    convs = [i for i, m in enumerate(layers) if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5 and all(isinstance(layers[i + 1], torch.nn.BatchNorm2d) for i in convs)
    assert all(isinstance(layers[i + 2], torch.nn.ReLU) and layers[i].bias is None for i in convs)
    assert not any(isinstance(m, torch.nn.LocalResponseNorm) for m in model.modules())
    assert [layers[i].out_channels for i in convs] == [96, 256, 384, 384, 256]
    assert count_params(model) == 62_379_720
    assert count_params(model) - count_params(build_model("alexnet", 227, num_classes=1000)) == 2 * 1376 - 1376
    assert model.features(torch.zeros(1, 3, 227, 227)).shape == (1, 256, 6, 6)  # alexnet's 55 -> 27 -> 13 -> 6
    assert sum(isinstance(m, torch.nn.LocalResponseNorm) for m in build_model("alexnet").modules()) == 2
