"""Parameter counts against ALGORITHMS.md and against hand arithmetic.

Each count is ``weights + biases`` per layer written out, BatchNorm adding 2 per channel.
"About" figures of ALGORITHMS.md are checked within a stated relative tolerance.
"""

import pytest

from valleys import models


def count(name, shape=(3, 32, 32), classes=10, **kwargs):
    return models.param_count(models.get(name, shape, classes, **kwargs))


def conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def fc(n_in, n_out):
    return n_in * n_out + n_out


def bn(c):
    return 2 * c


def test_lenet_small_is_exactly_47658():
    expected = conv(1, 10, 5) + conv(10, 20, 5) + fc(20 * 4 * 4, 128) + fc(128, 10)
    assert expected == 47_658
    assert count("lenet_small", (1, 28, 28)) == 47_658


def test_sgn_architecture_1_on_fashion():
    # 28 → conv5 → 24 → pool → 12 → conv5 → 8 → pool → 4: 16·4·4 = 256 features
    expected = conv(1, 6, 5) + conv(6, 16, 5) + fc(256, 120) + fc(120, 84) + fc(84, 10)
    assert expected == 156 + 2_416 + 30_840 + 10_164 + 850 == 44_426
    assert count("sgn_conv_fashion", (1, 28, 28)) == expected


def test_sgn_architecture_4_on_cifar():
    # 32 → conv3 → 30 → pool → 15 → conv3 → 13 → pool → 6 → conv3 → 4: 64·4·4 = 1024 features
    expected = conv(3, 32, 3) + conv(32, 64, 3) + conv(64, 64, 3) + fc(1024, 64) + fc(64, 10)
    assert expected == 896 + 18_496 + 36_928 + 65_600 + 650 == 122_570
    assert count("sgn_conv_cifar") == expected


def test_sgn_sigmoid_mlps():
    assert count("mlp", (1,), 1, widths=[20, 20, 20], activation="sigmoid") == (
        fc(1, 20) + 2 * fc(20, 20) + fc(20, 1)
    )
    assert count("mlp", (13,), 1, widths=(10, 10), activation="sigmoid") == (
        fc(13, 10) + fc(10, 10) + fc(10, 1)
    )
    assert count("mlp", (1, 28, 28), 10, widths=(100, 100), activation="sigmoid") == (
        fc(784, 100) + fc(100, 100) + fc(100, 10)
    )


@pytest.mark.parametrize("variant", ["lua", "python"])
def test_mnistfc_about_1_86m(variant):
    # 784-1024-1024-10 with a BatchNorm after each hidden layer (both variants)
    expected = fc(784, 1024) + bn(1024) + fc(1024, 1024) + bn(1024) + fc(1024, 10)
    assert expected == 1_867_786
    n = count("mnistfc", (1, 28, 28), variant=variant)
    assert n == expected
    assert abs(n - 1.86e6) / 1.86e6 < 0.01  # "about 1.86 M weights", within 1 %


@pytest.mark.parametrize(("variant", "fc_bn"), [("lua", 0), ("python", bn(500))])
def test_lenet_about_131k(variant, fc_bn):
    # 28 → conv5 → 24 → pool3 → 8 → conv5 → 4 → pool2 → 2: 50·2·2 = 200 features; BN after
    # each conv block; only the python port has a BN on the 500-unit layer
    expected = (
        conv(1, 20, 5) + bn(20) + conv(20, 50, 5) + bn(50) + fc(200, 500) + fc_bn + fc(500, 10)
    )
    n = count("lenet", (1, 28, 28), variant=variant)
    assert n == expected == {"lua": 131_220, "python": 132_220}[variant]
    assert abs(n - 131e3) / 131e3 < 0.01  # "about 131 k weights", within 1 %


def test_allcnn_about_1_67m():
    # every conv with bias + BN; the eighth conv 3×3 as in Entropy-SGD's code (§1.7)
    expected = (
        conv(3, 96, 3)
        + 2 * conv(96, 96, 3)
        + conv(96, 192, 3)
        + 4 * conv(192, 192, 3)
        + conv(192, 10, 1)
        + 3 * bn(96)
        + 5 * bn(192)
        + bn(10)
    )
    assert expected == 1_667_166
    n = count("allcnn")
    assert n == expected
    assert abs(n - 1.67e6) / 1.67e6 < 0.01  # "about 1.67 M weights", within 1 %


def test_resnet18_standard_count():
    assert count("resnet18") == 11_173_962


def test_wrn_28_10_standard_count():
    assert count("wrn") == 36_479_194


def test_wrn_tf_port_adds_only_conv_biases():
    # biases of the stem (16), of the 2·4 block convs per group (160, 320, 640 channels) and of
    # the one projection per group
    biases = 16 + (8 + 1) * (160 + 320 + 640)
    assert count("wrn", block="tf_port") - count("wrn") == biases == 10_096


def test_vgg_counts():
    # convs with bias + BN per layer, GAP, Linear(512, 10)
    d = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256)] + [(256, 256)] * 2
    d += [(256, 512)] + [(512, 512)] * 5
    e = [*d[:7], (256, 256), *d[7:10], (512, 512), *d[10:], (512, 512)]
    for name, layers in (("vgg16_bn", d), ("vgg19_bn", e)):
        expected = sum(conv(i, o, 3) + bn(o) for i, o in layers) + fc(512, 10)
        assert count(name) == expected
    assert count("vgg16_bn") == 14_728_266
    assert count("vgg19_bn") == 20_040_522
    # the head does not depend on the image size (TinyImageNet: 64×64, 200 classes)
    assert count("vgg19_bn", (3, 64, 64), 200) == 20_040_522 - fc(512, 10) + fc(512, 200)


def test_convmixer_counts():
    def mixer(c, dim, depth, k, p, classes):
        block = conv(1, dim, k) + bn(dim) + conv(dim, dim, 1) + bn(dim)  # depthwise: 1 in/group
        return conv(c, dim, p) + bn(dim) + depth * block + fc(dim, classes)

    assert count("convmixer") == mixer(3, 256, 8, 5, 2, 10) == 594_186
    demo = {"dim": 16, "depth": 4, "kernel_size": 3, "patch_size": 2}
    assert count("convmixer", (1, 28, 28), **demo) == mixer(1, 16, 4, 3, 2, 10) == 2_266


def test_resnext18_count():
    def bottleneck(cin, cout, card=8, widen=4):
        inner = card * cout // widen
        body = conv(cin, inner, 1, False) + conv(inner // card, inner, 3, False)
        body += conv(inner, cout, 1, False) + bn(inner) * 2 + bn(cout)
        return body + conv(cin, cout, 1, False) + bn(cout)  # projection: width changes

    expected = conv(3, 64, 3, False) + bn(64)
    expected += bottleneck(64, 256) + bottleneck(256, 512) + bottleneck(512, 1024)
    expected += fc(1024, 10)
    assert count("resnext18") == expected == 10_994_506


def test_cnn1d_count():
    # (40,) → 19 → 10 → 5 positions: 25·5 = 125 features
    expected = 1 * 25 * 5 + 25 + 2 * (25 * 25 * 3 + 25) + fc(125, 10)
    assert count("cnn1d", (40,)) == expected == 5_210
    assert count("cnn1d", (1, 40)) == expected
