"""Tests of the model zoo (SPEC §1, §2, §11). Heavy architectures are checked on the meta device."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from simclrv2.models import (
    PAPER_ARCHITECTURES,
    ArchSpec,
    AvgPool2dSame,
    BasicBlock,
    BottleneckBlock,
    Conv2dFixedPadding,
    LinearClassifier,
    MaxPool2dSame,
    ProjectionHead,
    ResNet,
    SelectiveKernelConv,
    SimCLRNet,
    architecture_info,
    architecture_table,
    convert_sync_batchnorm,
    count_params_paper,
    count_trainable_params,
    create_encoder,
    create_model,
    list_architectures,
    parse_arch,
)
from simclrv2.models.layers import (
    TRUNC_NORMAL_STD_CORRECTION,
    make_resnet_d_avg_pool,
    same_padding_amounts,
)

META = torch.device("meta")

TABLE1_MILLIONS = [24, 35, 94, 140, 43, 65, 170, 257, 58, 89, 233, 354, 795]


def _meta_encoder(name: str, image_size: int = 224, **kw) -> ResNet:
    with META:
        return create_encoder(name, image_size=image_size, **kw)


# ----------------------------------------------------------------------------- params (SPEC §11)


def test_table1_param_counts_round_to_paper() -> None:
    rows = architecture_table(list(PAPER_ARCHITECTURES))
    assert [r["name"] for r in rows] == list(PAPER_ARCHITECTURES)
    assert [round(r["params"] / 1e6) for r in rows] == TABLE1_MILLIONS
    by_name = {r["name"]: r["params"] for r in rows}
    assert by_name["r50_1x_sk0"] == 23_561_152
    assert by_name["r152_2x_sk1"] == 353_752_896


def test_count_rule_matches_torchvision_resnet50() -> None:
    torchvision = pytest.importorskip("torchvision")
    with META:
        tv = torchvision.models.resnet50(weights=None)
    tv_trunk = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
    ours = _meta_encoder("r50_1x_sk0")
    assert count_trainable_params(ours) == tv_trunk == 23_508_032
    # Same multiset of conv kernels and BN widths, i.e. the same architecture.
    def shapes(m: nn.Module, kind: type) -> list:
        return sorted(tuple(x.weight.shape) for x in m.modules() if isinstance(x, kind))

    assert shapes(ours, nn.Conv2d) == shapes(tv, nn.Conv2d)
    assert shapes(ours, nn.BatchNorm2d) == shapes(tv, nn.BatchNorm2d)
    # Paper rule adds moving mean + variance: 2 numbers per BN channel.
    bn_channels = sum(m.num_features for m in ours.modules() if isinstance(m, _BatchNorm))
    assert count_params_paper(ours) == 23_508_032 + 2 * bn_channels


def test_architecture_info_and_head_params() -> None:
    info = architecture_info("r50_1x_sk0")
    for key in ("name", "depth", "width", "sk", "params", "feature_dim", "head_params"):
        assert key in info
    assert (info["depth"], info["width"], info["sk"], info["feature_dim"]) == (50, 1, False, 2048)
    # SPEC §11: 3-layer head adds 8.67M (1x), 34.11M (2x), 76.33M (3x).
    assert round(info["head_params"] / 1e6, 2) == 8.67
    assert round(architecture_info("r50_2x_sk1")["head_params"] / 1e6, 2) == 34.11
    big = architecture_info("r152_3x_sk1")
    assert round(big["head_params"] / 1e6, 2) == 76.33
    assert big["feature_dim"] == 6144 and big["sk"] is True


# ----------------------------------------------------------------------------- registry


def test_parse_arch_and_listing() -> None:
    spec = parse_arch("r152_3x_sk1")
    assert spec == ArchSpec(depth=152, width=3, sk_ratio=0.0625, name="r152_3x_sk1")
    assert spec.sk and parse_arch(spec) is spec
    assert parse_arch("r18_1x_sk0").sk_ratio == 0.0
    for bad in ("r51_1x_sk0", "r50_5x_sk0", "r50_1x_sk2", "resnet50", "r50-1x-sk0"):
        with pytest.raises(ValueError, match="r50_1x_sk0"):
            parse_arch(bad)
    assert len(PAPER_ARCHITECTURES) == 13
    names = list_architectures()
    assert names[:13] == list(PAPER_ARCHITECTURES)
    assert len(set(names)) == len(names)
    assert {"r18_1x_sk0", "r34_1x_sk1", "r200_1x_sk0"} <= set(names)
    for n in names:
        assert parse_arch(n).name == n


def test_create_encoder_stem_choice() -> None:
    assert _meta_encoder("r50_1x_sk1", image_size=32).cifar_stem
    enc = _meta_encoder("r50_1x_sk1", image_size=33)
    assert not enc.cifar_stem and enc.stem.num_convs == 3  # deep ResNet-D stem
    assert _meta_encoder("r50_1x_sk1", image_size=32).stem.num_convs == 1  # no deep stem for CIFAR
    assert _meta_encoder("r50_1x_sk0", image_size=224).stem.conv1.kernel_size == (7, 7)


# ----------------------------------------------------------------------------- shapes (SPEC §1.1)


def _expected_taps(size: int, cifar: bool, width: int, depth: int, batch: int = 2) -> dict[str, tuple[int, ...]]:
    """Tap shapes: TF strided ops give ceil(n / stride) (fixed padding convs, SAME pools)."""
    expansion = 4 if depth >= 50 else 1
    conv = size if cifar else -(-size // 2)
    spatial = conv if cifar else -(-conv // 2)
    taps = {
        "initial_conv": (batch, 64 * width, conv, conv),
        "initial_max_pool": (batch, 64 * width, spatial, spatial),
    }
    for g in range(1, 5):
        if g > 1:
            spatial = -(-spatial // 2)
        taps[f"block_group{g}"] = (batch, 64 * width * 2 ** (g - 1) * expansion, spatial, spatial)
    taps["final_avg_pool"] = (batch, 512 * width * expansion)
    return taps


_SHAPE_CASES = [
    (f"r{d}_{w}x_sk{k}", size) for d in (18, 34, 50, 101) for w in (1, 2) for k in (0, 1) for size in (32, 64)
]
# Deeper nets (slow even on meta) and odd input sizes: a few representative cases.
_SHAPE_CASES += [("r152_2x_sk1", 64), ("r152_1x_sk0", 32), ("r200_1x_sk1", 32), ("r50_1x_sk1", 65), ("r18_2x_sk0", 33)]


@pytest.mark.parametrize("name,size", _SHAPE_CASES)
def test_output_shapes_meta(name: str, size: int) -> None:
    spec = parse_arch(name)
    enc = _meta_encoder(name, image_size=size)
    assert enc.feature_dim == (512 if spec.depth < 50 else 2048) * spec.width
    taps = enc.forward_features(torch.empty(2, 3, size, size, device=META))
    expected = _expected_taps(size, size <= 32, spec.width, spec.depth)
    assert {k: tuple(v.shape) for k, v in taps.items()} == expected


def test_forward_returns_final_avg_pool_meta() -> None:
    enc = _meta_encoder("r50_2x_sk1", image_size=64)
    assert tuple(enc(torch.empty(2, 3, 64, 64, device=META)).shape) == (2, 4096)


def test_taps_224_standard() -> None:
    taps = _meta_encoder("r50_1x_sk0").forward_features(torch.empty(1, 3, 224, 224, device=META))
    assert tuple(taps["initial_conv"].shape) == (1, 64, 112, 112)
    assert tuple(taps["initial_max_pool"].shape) == (1, 64, 56, 56)
    assert tuple(taps["block_group4"].shape) == (1, 2048, 7, 7)
    assert tuple(taps["final_avg_pool"].shape) == (1, 2048)


@pytest.mark.parametrize(
    "name,size",
    [("r18_1x_sk0", 32), ("r18_1x_sk1", 64), ("r34_1x_sk0", 64), ("r50_1x_sk0", 64)],
)
def test_output_shapes_real(name: str, size: int) -> None:
    torch.manual_seed(0)
    enc = create_encoder(name, image_size=size)
    x = torch.rand(2, 3, size, size)
    taps = enc.forward_features(x)
    spec = parse_arch(name)
    assert {k: tuple(v.shape) for k, v in taps.items()} == _expected_taps(size, size <= 32, spec.width, spec.depth)
    out = enc(x)
    assert out.shape == (2, enc.feature_dim) and torch.isfinite(out).all()
    torch.testing.assert_close(out, taps["final_avg_pool"])
    torch.testing.assert_close(out, taps["block_group4"].mean(dim=(2, 3)))
    # initial_conv is the stem conv output *before* BN-ReLU (reference hub signature).
    assert (taps["initial_conv"] < 0).any()


# ----------------------------------------------------------------------------- padding (SPEC §1.7)


def _tf_same_pool_reference(x: torch.Tensor, k: int, s: int, op: str) -> torch.Tensor:
    """Brute-force TF 'SAME' pooling: windows start at i*s - pad_beg; only valid cells count."""
    h, w = x.shape[-2:]
    (pt, _), (pl, _) = same_padding_amounts(h, k, s), same_padding_amounts(w, k, s)
    oh, ow = -(-h // s), -(-w // s)
    out = torch.empty(*x.shape[:-2], oh, ow, dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * s - pt, j * s - pl
            win = x[..., max(r0, 0) : min(r0 + k, h), max(c0, 0) : min(c0 + k, w)]
            win = win.reshape(*x.shape[:-2], -1)
            out[..., i, j] = win.amax(-1) if op == "max" else win.mean(-1)
    return out


def test_same_padding_amounts() -> None:
    assert same_padding_amounts(112, 3, 2) == (0, 1)  # even: extra pixel at the end only
    assert same_padding_amounts(113, 3, 2) == (1, 1)
    assert same_padding_amounts(56, 2, 1) == (0, 1)
    assert same_padding_amounts(8, 2, 2) == (0, 0)
    assert same_padding_amounts(7, 1, 1) == (0, 0)


@pytest.mark.parametrize("hw", [(4, 4), (5, 5), (6, 7), (8, 8), (9, 6)])
def test_maxpool_same_matches_tf(hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    x = -torch.rand(2, 3, *hw) - 1.0  # all negative: zero padding would be visible
    got = MaxPool2dSame(3, 2)(x)
    torch.testing.assert_close(got, _tf_same_pool_reference(x, 3, 2, "max"))
    sym = nn.MaxPool2d(3, 2, padding=1)(x)
    if hw[0] % 2 and hw[1] % 2:
        torch.testing.assert_close(got, sym)  # odd sizes: TF pads symmetrically


def test_maxpool_same_hand_computed_even() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # TF pads only bottom/right: windows rows/cols {0,1,2} and {2,3}.
    assert MaxPool2dSame(3, 2)(x).flatten().tolist() == [10.0, 11.0, 14.0, 15.0]
    # PyTorch symmetric padding shifts the windows: {-1,0,1} and {1,2,3}.
    assert nn.MaxPool2d(3, 2, padding=1)(x).flatten().tolist() == [5.0, 7.0, 13.0, 15.0]
    neg = -x
    assert MaxPool2dSame(3, 2)(neg).flatten().tolist() == [0.0, -2.0, -8.0, -10.0]


@pytest.mark.parametrize("hw", [(4, 4), (5, 5), (6, 3)])
def test_avgpool_stride1_same_divides_by_valid_cells(hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, *hw) + 0.5
    got = make_resnet_d_avg_pool(1, reference_padding=True)(x)
    assert isinstance(make_resnet_d_avg_pool(1), AvgPool2dSame)
    assert got.shape == x.shape
    torch.testing.assert_close(got, _tf_same_pool_reference(x, 2, 1, "avg"))
    # Equivalent formulation from SPEC §12: replicate-pad (0,1,0,1) + AvgPool2d(2, 1).
    torch.testing.assert_close(got, F.avg_pool2d(F.pad(x, (0, 1, 0, 1), mode="replicate"), 2, 1))
    # Last row: mean of the two valid cells; bottom-right corner: the cell itself.
    torch.testing.assert_close(got[..., -1, 0], (x[..., -1, 0] + x[..., -1, 1]) / 2)
    torch.testing.assert_close(got[..., -1, -1], x[..., -1, -1])
    # PyTorch-port variant counts zero padding: same interior, smaller last row/col.
    port = make_resnet_d_avg_pool(1, reference_padding=False)(x)
    torch.testing.assert_close(port[..., :-1, :-1], got[..., :-1, :-1])
    torch.testing.assert_close(port[..., -1, -1], x[..., -1, -1] / 4)


@pytest.mark.parametrize("n", [4, 5])
def test_avgpool_stride2_resnet_d(n: int) -> None:
    x = torch.rand(1, 2, n, n)
    got = make_resnet_d_avg_pool(2, reference_padding=True)(x)
    # TF: fixed padding (0,1) with zeros, then VALID 2x2/s2 (zeros are averaged in).
    torch.testing.assert_close(got, F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), 2, 2))
    if n % 2 == 0:
        torch.testing.assert_close(got, F.avg_pool2d(x, 2, 2))
    else:
        torch.testing.assert_close(got[..., -1, -1], x[..., -1, -1] / 4)


def test_fixed_padding_convs() -> None:
    torch.manual_seed(0)
    for n in (6, 7):
        x = torch.rand(1, 2, n, n)
        for k in (1, 2, 3, 7):
            for s in (1, 2):
                conv = Conv2dFixedPadding(2, 3, k, s)
                y = conv(x)
                if s == 2 or k % 2:
                    beg = (k - 1) // 2
                    ref = F.conv2d(F.pad(x, (beg, k - 1 - beg, beg, k - 1 - beg)), conv.weight, stride=s)
                    torch.testing.assert_close(y, ref)
                assert y.shape[-1] == -(-n // s)
        conv = Conv2dFixedPadding(2, 3, 1, 2)  # 1x1/s2: no padding, picks even pixels
        torch.testing.assert_close(conv(x), F.conv2d(x[..., ::2, ::2], conv.weight))
    assert Conv2dFixedPadding(2, 3, 3, 2).padding == (1, 1)
    assert Conv2dFixedPadding(2, 3, 7, 2).padding == (3, 3)
    assert Conv2dFixedPadding(2, 3, 3).bias is None


def test_reference_padding_switch_changes_model() -> None:
    torch.manual_seed(0)
    tf_enc = create_encoder("r18_1x_sk1", image_size=64).eval()
    port = create_encoder("r18_1x_sk1", image_size=64, reference_padding=False).eval()
    port.load_state_dict(tf_enc.state_dict())
    assert isinstance(tf_enc.max_pool, MaxPool2dSame) and isinstance(port.max_pool, nn.MaxPool2d)
    assert isinstance(tf_enc.block_group1[0].shortcut.pool, AvgPool2dSame)
    x = torch.rand(2, 3, 64, 64)
    assert not torch.allclose(tf_enc(x), port(x))


# ----------------------------------------------------------------------------- blocks (SPEC §1.2-1.6)


def test_module_creation_order_and_block_structure() -> None:
    enc = _meta_encoder("r50_1x_sk1")
    convs = [tuple(m.weight.shape) for m in enc.modules() if isinstance(m, nn.Conv2d)]
    assert convs[:9] == [
        (32, 3, 3, 3), (32, 32, 3, 3), (64, 32, 3, 3),  # deep stem
        (256, 64, 1, 1),  # shortcut conv first (TF creation order)
        (64, 64, 1, 1), (128, 64, 3, 3), (32, 64, 1, 1), (128, 32, 1, 1),  # 1x1, SK conv, SK mixing
        (256, 64, 1, 1),  # final 1x1
    ]  # fmt: skip
    bns = [m.num_features for m in enc.modules() if isinstance(m, _BatchNorm)]
    assert bns[:8] == [32, 32, 64, 256, 64, 128, 32, 256]
    plain = _meta_encoder("r50_1x_sk0")
    assert sum(isinstance(m, nn.Conv2d) for m in plain.modules()) == 53
    assert sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules()) == 53
    # Every group's first block has a projection shortcut, also ResNet-18 group 1.
    r18 = _meta_encoder("r18_1x_sk0")
    assert all(g[0].shortcut is not None and all(b.shortcut is None for b in g[1:]) for g in r18.block_groups)
    assert isinstance(r18.block_group1[0], BasicBlock)
    # SK on basic blocks: ResNet-D shortcut only, no SK conv (TF2 ResidualBlock).
    r18sk = _meta_encoder("r18_1x_sk1")
    assert r18sk.block_group2[0].shortcut.pool is not None
    assert not any(isinstance(m, SelectiveKernelConv) for m in r18sk.modules())
    # Stride on the 3x3 (v1.5); ResNet-D shortcut conv has stride 1.
    blk = _meta_encoder("r50_1x_sk0").block_group2[0]
    assert isinstance(blk, BottleneckBlock) and blk.conv2.stride == (2, 2) and blk.conv1.stride == (1, 1)
    assert blk.shortcut.conv.stride == (2, 2)
    assert _meta_encoder("r50_1x_sk1").block_group2[0].shortcut.conv.stride == (1, 1)


def test_sk_mid_dims() -> None:
    enc3 = _meta_encoder("r152_3x_sk1")
    assert [g[0].sk.mid_dim for g in enc3.block_groups] == [32, 32, 48, 96]
    enc2 = _meta_encoder("r50_2x_sk1")
    assert [g[0].sk.mid_dim for g in enc2.block_groups] == [32, 32, 32, 64]


def test_selective_kernel_math() -> None:
    torch.manual_seed(0)
    sk = SelectiveKernelConv(8, 6, 2, sk_ratio=0.0625).eval()
    for bn in (sk.bn, sk.fc1_bn):  # non-trivial BN statistics
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(2, 8, 9, 9)
    y = F.relu(sk.bn(F.conv2d(x, sk.conv.weight, stride=2, padding=1)))
    a, b = y[:, :6], y[:, 6:]
    g = (a + b).mean(dim=(2, 3), keepdim=True)
    m = F.conv2d(F.relu(sk.fc1_bn(F.conv2d(g, sk.fc1.weight))), sk.fc2.weight)
    wa = torch.exp(m[:, :6]) / (torch.exp(m[:, :6]) + torch.exp(m[:, 6:]))
    torch.testing.assert_close(sk(x), a * wa + b * (1 - wa))
    assert sk.mid_dim == 32 and sk(x).shape == (2, 6, 5, 5)


def test_init_constants() -> None:
    torch.manual_seed(0)
    enc = create_encoder("r18_1x_sk0", image_size=32)
    conv = enc.block_group4[1].conv2  # 512x512x3x3
    fan_in = 512 * 9
    std = math.sqrt(1 / fan_in)
    assert abs(conv.weight.std().item() / std - 1) < 0.03
    assert conv.weight.abs().max().item() <= 2 * std / TRUNC_NORMAL_STD_CORRECTION + 1e-6
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.eps == 1e-5 and m.momentum == 0.1
        if isinstance(m, nn.Conv2d):
            assert m.bias is None
    for g in enc.block_groups:
        for blk in g:
            assert torch.all(blk.bn2.weight == 0) and torch.all(blk.bn1.weight == 1)
            if blk.shortcut is not None:
                assert torch.all(blk.shortcut.bn.weight == 1)
    big = _meta_encoder("r50_1x_sk1")  # bottleneck: last BN is bn3
    with torch.device("cpu"):
        blk = BottleneckBlock(64, 16, 1, True, sk_ratio=0.0625)
    assert torch.all(blk.bn3.weight == 0) and torch.all(blk.sk.bn.weight == 1)
    assert all(b.bn3 is not None for g in big.block_groups for b in g)


def test_se_option() -> None:
    enc = _meta_encoder("r50_1x_sk0", image_size=32, se_ratio=0.25)
    se = enc.block_group1[0].se
    assert se.reduce.out_channels == 16 and se.expand.out_channels == 256  # from f, back to 4f
    out = enc(torch.empty(2, 3, 32, 32, device=META))
    assert tuple(out.shape) == (2, 2048)
    torch.manual_seed(0)
    small = create_encoder("r18_1x_sk0", image_size=32, se_ratio=0.25)
    assert small.block_group1[0].se.expand.out_channels == 64
    assert small(torch.rand(2, 3, 32, 32)).shape == (2, 512)


# ----------------------------------------------------------------------------- heads (SPEC §2)


def test_projection_head_structure() -> None:
    torch.manual_seed(0)
    head = ProjectionHead(64, num_layers=3, out_dim=16)
    assert [head.out_dim_at(k) for k in range(4)] == [64, 64, 64, 16]
    assert head.out_dim_at(-1) == 16 and head.out_dim == 16
    for j, layer in enumerate(head.layers):
        assert layer.linear.bias is None
        assert abs(layer.linear.weight.std().item() - 0.01) < 0.002
        if j < 2:
            assert layer.relu and layer.bn.bias is not None
    last_bn = head.layers[-1].bn
    assert last_bn.bias is None and last_bn.weight is not None
    assert set(last_bn.state_dict()) == {"weight", "running_mean", "running_var", "num_batches_tracked"}
    h = torch.randn(5, 64)
    hid = head(h)
    assert len(hid) == 4 and hid[0] is h
    assert [t.shape[1] for t in hid] == [64, 64, 64, 16]
    assert (hid[1] >= 0).all() and (hid[2] >= 0).all() and (hid[3] < 0).any()
    for n in range(5):
        hh = ProjectionHead(32, num_layers=n, out_dim=8)
        assert len(hh(torch.randn(3, 32))) == n + 1
        assert hh.out_dim == (32 if n == 0 else 8)


def test_head_truncate_keeps_first_layers() -> None:
    torch.manual_seed(0)
    head = ProjectionHead(32, 3, 8).eval()
    h = torch.randn(4, 32)
    full = head(h)
    for k, n_kept in [(0, 0), (1, 1), (2, 2), (3, 3), (-1, 3)]:
        t = head.truncate(k)
        assert t.num_layers == n_kept and t.out_dim == full[n_kept].shape[1]
        torch.testing.assert_close(t(h)[-1], full[n_kept])
        assert all(a is b for a, b in zip(t.layers, head.layers))
    # Truncated head state dict is a subset of the full one (loads a full-head checkpoint).
    assert set(head.truncate(1).state_dict()) < set(head.state_dict())
    with pytest.raises(ValueError):
        head.truncate(4)


def test_linear_classifier_init() -> None:
    clf = LinearClassifier(16, 5)
    assert torch.all(clf.weight == 0) and torch.all(clf.bias == 0)
    torch.manual_seed(0)
    clf = LinearClassifier(2048, 100, zero_init=False)
    assert abs(clf.weight.std().item() - 0.01) < 0.001 and torch.all(clf.bias == 0)
    clf.reset_to_zero()
    assert torch.all(clf.weight == 0)
    assert set(clf.state_dict()) == {"weight", "bias"}


@pytest.fixture(scope="module")
def small_parts() -> tuple[ResNet, ProjectionHead]:
    torch.manual_seed(0)
    enc = create_encoder("r18_1x_sk0", image_size=32)
    head = ProjectionHead(enc.feature_dim, 3, 16)
    return enc, head


@pytest.mark.parametrize("selector", [0, 1, 2, 3, -1])
def test_ft_proj_selector_feeds_classifier(small_parts, selector: int) -> None:
    enc, head = small_parts
    clf = LinearClassifier(head.out_dim_at(selector), 7, zero_init=False)
    net = SimCLRNet(enc, head, clf, ft_proj_selector=selector).eval()
    x = torch.rand(2, 3, 32, 32)
    out = net(x)
    with torch.no_grad():
        h = enc(x)
        hid = head(h)
    torch.testing.assert_close(out["features"], h)
    assert len(out["hiddens"]) == 4
    torch.testing.assert_close(out["projection"], hid[-1])
    torch.testing.assert_close(out["logits"], clf(hid[selector]))
    assert out["logits"].shape == (2, 7)


def test_ft_proj_selector_validation(small_parts) -> None:
    enc, head = small_parts
    with pytest.raises(ValueError, match=r"ft_proj_selector=4.*3 layer"):
        SimCLRNet(enc, head, None, ft_proj_selector=4)
    with pytest.raises(ValueError, match="ft_proj_selector=1"):
        SimCLRNet(enc, None, None, ft_proj_selector=1)
    with pytest.raises(ValueError, match="width"):
        SimCLRNet(enc, head, LinearClassifier(16, 3), ft_proj_selector=1)  # wrong in_dim
    with pytest.raises(ValueError, match="ft_proj_selector=2"):
        create_model("r18_1x_sk0", image_size=32, num_proj_layers=1, num_classes=3, ft_proj_selector=2, device=META)


def test_create_model_variants() -> None:
    m = create_model("r50_2x_sk1", num_classes=1000, ft_proj_selector=1, device=META)
    assert m.head.num_layers == 3 and m.classifier.in_features == 4096 and m.selected_dim == 4096
    assert m.head.out_dim == 128 and m.encoder.feature_dim == 4096
    assert all(p.is_meta for p in m.parameters())
    m = create_model("r50_1x_sk0", num_classes=10, ft_proj_selector=-1, proj_out_dim=64, device=META)
    assert m.classifier.in_features == 64
    torch.manual_seed(0)
    m = create_model("r18_1x_sk0", image_size=32, num_proj_layers=0, num_classes=4)
    assert m.head is None
    out = m(torch.rand(2, 3, 32, 32))
    assert out["projection"] is None and len(out["hiddens"]) == 1
    assert torch.all(out["logits"] == 0)  # zero-init classifier
    m = create_model("r18_1x_sk0", image_size=32)
    out = m.train()(torch.rand(3, 3, 32, 32))
    assert out["logits"] is None and out["projection"].shape == (3, 128)


@pytest.mark.parametrize("stop_grad", [True, False])
def test_stop_grad_probe(stop_grad: bool) -> None:
    torch.manual_seed(0)
    net = create_model(
        "r18_1x_sk0", image_size=32, num_classes=5, ft_proj_selector=1,
        classifier_stop_grad=stop_grad, zero_init_classifier=False,
    ).train()  # fmt: skip
    out = net(torch.rand(4, 3, 32, 32))
    out["logits"].sum().backward()
    assert net.classifier.weight.grad is not None and net.classifier.weight.grad.abs().sum() > 0
    enc_grads = [p.grad for p in net.encoder.parameters()]
    head_l1 = [p.grad for p in net.head.layers[0].parameters()]
    if stop_grad:
        assert all(g is None for g in enc_grads + head_l1)
    else:
        assert any(g is not None and g.abs().sum() > 0 for g in enc_grads)
        assert all(g is not None for g in head_l1)


# ----------------------------------------------------------------------------- layouts, dtypes, SyncBN


def test_channels_last_and_bf16_autocast() -> None:
    torch.manual_seed(0)
    net = create_model("r50_1x_sk1", image_size=64, num_classes=3, ft_proj_selector=1).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = net(x)
    net = net.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        cl = net(xc)
    torch.testing.assert_close(cl["features"], ref["features"], rtol=1e-4, atol=1e-4)
    net.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(xc)
        taps = net.encoder.forward_features(xc)
    for key in ("features", "projection", "logits"):
        t = out[key]
        assert t.dtype in (torch.bfloat16, torch.float32) and torch.isfinite(t.float()).all()
    assert out["features"].shape == (2, 2048) and out["projection"].shape == (2, 128)
    assert taps["block_group4"].shape == (2, 2048, 2, 2)
    (out["projection"].float().sum() + out["logits"].float().sum()).backward()
    assert net.encoder.stem.conv1.weight.grad is not None


def test_sync_batchnorm_conversion() -> None:
    torch.manual_seed(0)
    net = create_model("r18_1x_sk1", image_size=32, num_classes=3, ft_proj_selector=1)
    n_bn = sum(isinstance(m, _BatchNorm) for m in net.modules())
    n_bn1d = sum(isinstance(m, nn.BatchNorm1d) for m in net.modules())
    keys = set(net.state_dict())
    gamma = net.head.layers[-1].bn.weight.detach().clone()
    synced = convert_sync_batchnorm(net)
    sync_bns = [m for m in synced.modules() if isinstance(m, _BatchNorm)]
    assert n_bn1d == 3 and len(sync_bns) == n_bn
    assert all(isinstance(m, nn.SyncBatchNorm) for m in sync_bns)
    last = synced.head.layers[-1].bn
    assert isinstance(last, nn.SyncBatchNorm) and last.bias is None
    torch.testing.assert_close(last.weight.detach(), gamma)
    assert set(synced.state_dict()) == keys
    synced.eval()
    assert synced(torch.rand(2, 3, 32, 32))["logits"].shape == (2, 3)


# ----------------------------------------------------------------------------- fractional widths


def test_fractional_widths_use_the_reference_channel_arithmetic() -> None:
    spec = parse_arch("r50_0.125x_sk1")
    assert (spec.depth, spec.width, spec.sk, spec.name) == (50, 0.125, True, "r50_0.125x_sk1")
    assert parse_arch("r18_0.25x_sk0").name == "r18_0.25x_sk0" and parse_arch("r50_1.0x_sk0").name == "r50_1x_sk0"
    for bad in ("r50_0.3x_sk0", "r50_0.01x_sk1"):
        with pytest.raises(ValueError, match="0.125"):
            parse_arch(bad)
    enc = _meta_encoder("r50_0.125x_sk1")
    # SK stem: int(64 * w // 2) = 4, 4, then int(64 * w) = 8; groups int(64 * 2**g * w) * 4
    assert [enc.stem.conv1.out_channels, enc.stem.conv2.out_channels, enc.stem.conv3.out_channels] == [4, 4, 8]
    assert [g[0].conv3.out_channels for g in enc.block_groups] == [32, 64, 128, 256]
    assert enc.block_group1[0].sk.mid_dim == 32  # max(int(8 * 0.0625), 32)
    assert enc.feature_dim == 256
    small = _meta_encoder("r18_0.25x_sk0", image_size=32)
    assert small.stem.conv1.out_channels == 16 and small.feature_dim == 128
    assert _meta_encoder("r50_0.5x_sk0").feature_dim == 1024
    with pytest.raises(ValueError, match="width_multiplier"):
        ResNet(50, width_multiplier=0.01)
