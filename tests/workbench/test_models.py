"""Tests for sdelip.workbench.models: Table 1 / Table 2 architectures and Sec 8.2 initialisation."""

import math

import pytest
import torch
from torch import nn

from sdelip.workbench.models import ConvNet, MLP, build_model, init_weights


def _named(model, kind):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]


# --------------------------------------------------------------------------- ConvNet


def test_convnet_plain_matches_table1():
    net = ConvNet()
    names = [n for n, _ in net.named_modules() if n and "." in n]
    assert names == [
        "features.conv1", "features.relu1", "features.pool1",
        "features.conv2", "features.relu2", "features.pool2",
        "features.conv3", "features.relu3",
        "classifier.flatten", "classifier.fc1", "classifier.relu4", "classifier.fc2",
    ]
    convs = dict(_named(net, nn.Conv2d))
    assert [tuple(c.weight.shape) for c in convs.values()] == [(32, 3, 3, 3), (64, 32, 3, 3), (128, 64, 3, 3)]
    assert [c.padding for c in convs.values()] == [(1, 1)] * 3
    assert [c.stride for c in convs.values()] == [(1, 1), (1, 1), (2, 2)]
    lins = dict(_named(net, nn.Linear))
    assert [tuple(l.weight.shape) for l in lins.values()] == [(256, 128 * 4 * 4), (10, 256)]
    pools = _named(net, nn.MaxPool2d)
    assert all(p.kernel_size == 2 and p.stride == 2 for _, p in pools)
    # five parameterised layers (#1, #4, #8, #12, #15)
    assert len(_named(net, (nn.Conv2d, nn.Linear))) == 5
    assert not _named(net, nn.Dropout) and not _named(net, nn.BatchNorm2d)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_convnet_optional_layers_in_table1_positions():
    net = ConvNet(num_classes=100, dropout=True, batchnorm=True)
    feat = [n for n, _ in net.features.named_children()]
    assert feat == ["conv1", "relu1", "pool1", "conv2", "drop2", "relu2", "pool2", "conv3", "drop3", "bn3", "relu3"]
    cls = [n for n, _ in net.classifier.named_children()]
    assert cls == ["flatten", "fc1", "relu4", "drop4", "fc2"]
    assert [m.p for _, m in _named(net, nn.Dropout)] == [0.2, 0.2, 0.3]
    bn = net.features.bn3
    assert bn.num_features == 128 and bn.track_running_stats is False and bn.running_mean is None
    assert net(torch.randn(3, 3, 32, 32)).shape == (3, 100)
    only_bn = ConvNet(batchnorm=True)
    assert not _named(only_bn, nn.Dropout) and len(_named(only_bn, nn.BatchNorm2d)) == 1


def test_convnet_dropout_is_active_in_train_mode_only():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    net = ConvNet(dropout=True)
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))
    plain = ConvNet()
    assert torch.equal(plain(x), plain(x))


def test_convnet_batchnorm_uses_batch_statistics_even_in_eval():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 32, 32)
    net = ConvNet(batchnorm=True).eval()
    # track_running_stats=False: the output of sample 0 depends on the rest of the batch
    assert not torch.allclose(net(x)[:1], net(x[:3])[:1])
    plain = ConvNet().eval()
    torch.testing.assert_close(plain(x)[:1], plain(x[:3])[:1])


def test_convnet_accepts_mnist_shaped_inputs():
    net = ConvNet(in_channels=1)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_convnet_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_classes"):
        ConvNet(num_classes=0)


# --------------------------------------------------------------------------- MLP


def test_mlp_matches_table2_and_flattens():
    mlp = MLP()
    assert [n for n, _ in mlp.named_children()] == ["flatten", "fc1", "relu1", "fc2", "relu2", "fc3"]
    assert [tuple(l.weight.shape) for _, l in _named(mlp, nn.Linear)] == [(512, 784), (256, 512), (10, 256)]
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(mlp(x), mlp(x.reshape(5, 784)), rtol=0, atol=0)
    assert mlp(x).shape == (5, 10)
    with pytest.raises(ValueError, match="784"):
        mlp(torch.randn(5, 3, 32, 32))
    with pytest.raises(ValueError, match="sizes"):
        MLP((784,))


# --------------------------------------------------------------------------- init


def test_kaiming_init_std_zero_bias_and_sec82_top_singular_value():
    mlp = init_weights(MLP(), "kaiming", generator=0)
    w = mlp.fc1.weight.detach().double()
    s = math.sqrt(2.0 / 784)
    # 401,408 iid entries: the sample std is within 0.5% of s with overwhelming probability
    assert abs(w.std().item() / s - 1) < 5e-3
    assert abs(w.mean().item()) < 5 * s / math.sqrt(w.numel())
    assert all(torch.count_nonzero(l.bias) == 0 for _, l in _named(mlp, nn.Linear))
    # Sec 8.2: sigma_1 -> s (sqrt(m) + sqrt(n)); finite-size corrections are ~1% here
    sigma1 = torch.linalg.matrix_norm(w, ord=2).item()
    assert abs(sigma1 / (s * (math.sqrt(512) + math.sqrt(784))) - 1) < 0.03


def test_kaiming_conv_fan_in_includes_kernel():
    net = init_weights(ConvNet(), "kaiming", generator=1)
    w = net.features.conv3.weight.detach()
    fan_in = 64 * 3 * 3
    assert abs(w.std().item() / math.sqrt(2.0 / fan_in) - 1) < 0.01
    assert torch.count_nonzero(net.features.conv3.bias) == 0


def test_normal_init_uses_std_and_needs_it():
    mlp = init_weights(MLP(), "normal", std=0.05, generator=2)
    assert abs(mlp.fc1.weight.std().item() / 0.05 - 1) < 5e-3
    assert torch.count_nonzero(mlp.fc3.bias) == 0
    with pytest.raises(ValueError, match="std"):
        init_weights(MLP(), "normal")
    with pytest.raises(ValueError, match="-1"):
        init_weights(MLP(), "normal", std=-1)
    with pytest.raises(ValueError, match="valid schemes"):
        init_weights(MLP(), "xavier")


def test_default_init_is_pytorch_uniform_and_reproducible():
    mlp = init_weights(MLP(), "default", generator=3)
    w = mlp.fc1.weight.detach()
    bound = 1 / math.sqrt(784)
    assert w.abs().max().item() <= bound
    assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 5e-3  # U(-b, b): s = b/sqrt(3) = 1/sqrt(3n)
    assert torch.count_nonzero(mlp.fc1.bias) > 0  # PyTorch default biases are not zero
    again = init_weights(MLP(), "default", generator=3)
    assert all(torch.equal(a, b) for a, b in zip(mlp.parameters(), again.parameters()))


@pytest.mark.parametrize("scheme", ["default", "kaiming", "normal"])
def test_init_deterministic_per_seed_and_leaves_global_rng_alone(scheme):
    std = 0.1 if scheme == "normal" else None
    model = MLP((20, 7, 3))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = init_weights(model, scheme, std=std, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.random.get_rng_state(), before)
    b = init_weights(MLP((20, 7, 3)), scheme, std=std, generator=5)
    c = init_weights(MLP((20, 7, 3)), scheme, std=std, generator=6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


def test_init_leaves_batchnorm_alone():
    net = ConvNet(batchnorm=True)
    with torch.no_grad():
        net.features.bn3.weight.fill_(2.0)
    init_weights(net, "kaiming", generator=0)
    assert torch.all(net.features.bn3.weight == 2.0)


# --------------------------------------------------------------------------- build_model


def test_build_model_names_seed_and_options():
    a = build_model("convnet", num_classes=100, dropout=True, batchnorm=True, init="kaiming", seed=1)
    assert isinstance(a, ConvNet) and a.classifier.fc2.out_features == 100
    assert a.dropout and a.batchnorm
    b = build_model("ConvNet", num_classes=100, dropout=True, batchnorm=True, init="kaiming", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = build_model("convnet", num_classes=100, dropout=True, batchnorm=True, init="kaiming", seed=2)
    assert not torch.equal(a.features.conv1.weight, c.features.conv1.weight)

    m = build_model("mlp")
    assert isinstance(m, MLP) and m.sizes == (784, 512, 256, 10)
    assert build_model("mlp", input_shape=(3, 32, 32)).sizes[0] == 3072
    assert build_model("convnet", input_shape=(1, 28, 28)).features.conv1.in_channels == 1
    n = build_model("mlp", init="normal", init_std=0.01, seed=0)
    assert abs(n.fc1.weight.std().item() / 0.01 - 1) < 0.01


def test_build_model_errors():
    with pytest.raises(ValueError, match=r"valid names: mlp, convnet"):
        build_model("resnet")
    with pytest.raises(ValueError, match="Dropout or BatchNorm"):
        build_model("mlp", dropout=True)
    with pytest.raises(ValueError, match="contradicts"):
        build_model("convnet", in_channels=3, input_shape=(1, 28, 28))
