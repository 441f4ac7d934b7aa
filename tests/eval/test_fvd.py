"""FVD: Frechet distance, streaming statistics, preprocessing, and the I3D network + loader checked
against a small PyTorch re-statement of the pytorch-i3d conventions (Unit3D, MaxPool3dSamePadding,
InceptionModule, InceptionI3d key layout) written here."""
import time
import warnings

import numpy as np
import pytest
import scipy.linalg

import jax
import jax.numpy as jnp
from flax import nnx

from vans_jax.convert.safetensors_io import CheckpointError, save_file
from vans_jax.eval import fvd as F
from vans_jax.convert import i3d as I3DC
from vans_jax.models import i3d as I
from tests.utils import rel_err as _rel

torch = pytest.importorskip("torch")
nn, tF = torch.nn, torch.nn.functional


# ----------------------------------------------------------------------------- Frechet distance

def _fd_reference(mu1, s1, mu2, s2):
    """Independent float64 value: Tr sqrtm(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)) (symmetric PSD)."""
    w, v = scipy.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = scipy.linalg.eigvalsh(r1 @ s2 @ r1)
    d = mu1 - mu2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(lam, 0, None)).sum()


def _gauss_stats(rng, n, d, shift=0.0, scale=1.0):
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    x = rng.normal(size=(n, d)) @ a * scale + shift
    return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_known_values():
    rng = np.random.default_rng(0)
    mu, s = _gauss_stats(rng, 500, 20)
    assert abs(F.frechet_distance(mu, s, mu, s)) < 1e-8 * np.trace(s)
    d = rng.normal(size=20)
    assert F.frechet_distance(mu, s, mu + d, s) == pytest.approx(d @ d, rel=1e-7, abs=1e-8 * np.trace(s))
    # diagonal covariances: sum (sqrt a - sqrt b)^2
    a, b = rng.uniform(0.5, 2, 10), rng.uniform(0.5, 2, 10)
    want = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum() + 4.0
    got = F.frechet_distance(np.zeros(10), np.diag(a), np.r_[2.0, np.zeros(9)], np.diag(b))
    assert got == pytest.approx(want, rel=1e-10)
    with pytest.raises(ValueError):
        F.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.parametrize("n,d", [(400, 32), (30, 48)])  # full rank; rank-deficient (n < d)
def test_frechet_vs_independent_reference(n, d):
    rng = np.random.default_rng(d)
    mu1, s1 = _gauss_stats(rng, n, d)
    mu2, s2 = _gauss_stats(rng, n, d, shift=0.3, scale=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = F.frechet_distance(mu1, s1, mu2, s2)
    want = _fd_reference(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-6 if n > d else 1e-4)


def test_frechet_near_singular_offset():
    rng = np.random.default_rng(3)
    d = 16
    mu1, s1 = _gauss_stats(rng, 200, d)
    s1[:, 0] = s1[0, :] = 0.0            # an exactly degenerate direction in both
    mu2, s2 = _gauss_stats(rng, 200, d, shift=1.0)
    s2[:, 0] = s2[0, :] = 0.0
    got = F.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got)
    assert got == pytest.approx(_fd_reference(mu1, s1, mu2, s2), rel=1e-5)


def test_frechet_offset_and_imaginary_handling(monkeypatch):
    """A non-finite sqrtm retries with eps * I added to both covariances; a complex one keeps its real
    part (warning when the imaginary diagonal exceeds 1e-3)."""
    rng = np.random.default_rng(4)
    mu1, s1 = _gauss_stats(rng, 100, 6)
    mu2, s2 = _gauss_stats(rng, 100, 6, shift=0.5)
    want = _fd_reference(mu1, s1, mu2, s2)
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def nan_first(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(F.scipy.linalg, "sqrtm", nan_first)
    assert F.frechet_distance(mu1, s1, mu2, s2, eps=1e-6) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(6)) @ (s2 + 1e-6 * np.eye(6)))
    monkeypatch.setattr(F.scipy.linalg, "sqrtm", lambda a: real_sqrtm(a) + 0.01j * np.eye(len(a)))
    with pytest.warns(RuntimeWarning, match="imaginary"):
        assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)


def test_feature_stats_streaming_equals_one_shot():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(103, 12)) * 3 + 50.0          # large mean: no sum-of-squares cancellation
    st = F.FeatureStats()
    for lo, hi in [(0, 1), (1, 1), (1, 40), (40, 41), (41, 103)]:
        st.update(x[lo:hi])
    assert st.n == 103
    np.testing.assert_allclose(st.mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(st.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    a, b = F.FeatureStats().update(x[:50]), F.FeatureStats().update(x[50:])
    a.merge(b)
    np.testing.assert_allclose(a.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError):
        F.FeatureStats().update(x[:1]).cov
    with pytest.raises(ValueError):
        st.update(np.zeros((2, 5)))


# ----------------------------------------------------------------------------- preprocessing

def test_frame_indices():
    np.testing.assert_array_equal(F.frame_indices(31, 16), np.arange(0, 31, 2))
    idx = F.frame_indices(33, 16)
    assert idx[0] == 0 and idx[-1] == 32 and len(idx) == 16 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(F.frame_indices(5, 8), [0, 1, 2, 3, 4, 4, 4, 4])
    np.testing.assert_array_equal(F.frame_indices(40, 4, "first"), [0, 1, 2, 3])
    np.testing.assert_array_equal(F.frame_indices(16, 16), np.arange(16))
    with pytest.raises(ValueError):
        F.frame_indices(10, 4, "random")


def test_preprocess_shape_range_and_torch_resize():
    rng = np.random.default_rng(2)
    v = rng.integers(0, 256, size=(2, 20, 30, 41, 3), dtype=np.uint8)
    v[0, 0, 0, 0] = 0
    v[0, 0, 0, 1] = 255
    out = np.asarray(F.preprocess_for_i3d(v))
    assert out.shape == (2, 16, 224, 224, 3) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    sq = rng.integers(0, 256, size=(1, 4, 8, 8, 3), dtype=np.uint8)     # no resize, no resampling in time
    np.testing.assert_allclose(np.asarray(F.preprocess_for_i3d(sq, num_frames=4, size=8)),
                               sq.astype(np.float32) / 127.5 - 1, atol=1e-6)
    # resize == torch F.interpolate(bilinear, align_corners=False), up- and down-sampling
    for h, w, size in [(30, 41, 224), (256, 300, 224)]:
        x = rng.integers(0, 256, size=(1, 3, h, w, 3), dtype=np.uint8)
        got = np.asarray(F.preprocess_for_i3d(x, num_frames=3, size=size))
        t = torch.from_numpy(x[0].astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
        want = tF.interpolate(t, size=(size, size), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(got[0], want, atol=2e-5)
    # float input: [0, 1] by default, or an explicit range
    f = v.astype(np.float32) / 255.0
    np.testing.assert_allclose(np.asarray(F.preprocess_for_i3d(f)), out, atol=1e-5)
    np.testing.assert_allclose(np.asarray(F.preprocess_for_i3d(f * 2 - 1, value_range=(-1, 1))), out, atol=1e-5)
    with pytest.raises(ValueError):
        F.preprocess_for_i3d(v[0])


# ----------------------------------------------------------------------------- torch reference

def _same_pad_torch(x, kernel, stride):
    """pytorch-i3d's compute_pad, in F.pad order (w, h, t), zero padding."""
    pads = []
    for d in (2, 1, 0):
        s, k, t = x.shape[2 + d], kernel[d], stride[d]
        p = max(k - t, 0) if s % t == 0 else max(k - s % t, 0)
        pads += [p // 2, p - p // 2]
    return tF.pad(x, pads)


class TUnit3D(nn.Module):
    def __init__(self, cin, cout, k=(1, 1, 1), stride=(1, 1, 1), bn=True, act=True, bias=False):
        super().__init__()
        self.k, self.s, self.act = k, stride, act
        self.conv3d = nn.Conv3d(cin, cout, k, stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(cout, eps=1e-3, momentum=0.01) if bn else None

    def forward(self, x):
        x = self.conv3d(_same_pad_torch(x, self.k, self.s))
        if self.bn is not None:
            x = self.bn(x)
        return tF.relu(x) if self.act else x


class TMaxPool(nn.Module):
    def __init__(self, k, s):
        super().__init__()
        self.k, self.s = k, s

    def forward(self, x):
        return tF.max_pool3d(_same_pad_torch(x, self.k, self.s), self.k, self.s)


class TMixed(nn.Module):
    def __init__(self, cin, o):
        super().__init__()
        self.b0 = TUnit3D(cin, o[0])
        self.b1a, self.b1b = TUnit3D(cin, o[1]), TUnit3D(o[1], o[2], (3, 3, 3))
        self.b2a, self.b2b = TUnit3D(cin, o[3]), TUnit3D(o[3], o[4], (3, 3, 3))
        self.b3a, self.b3b = TMaxPool((3, 3, 3), (1, 1, 1)), TUnit3D(cin, o[5])

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


class TI3D(nn.Module):
    def __init__(self, num_classes=400):
        super().__init__()
        self.order = []
        for item in I.TRUNK:
            kind, name = item[0], item[1]
            if kind == "pool":
                mod = TMaxPool(item[2], item[3])
            elif kind == "mixed":
                mod = TMixed(*I.MIXED[name])
            else:
                mod = {"Conv3d_1a_7x7": lambda: TUnit3D(3, 64, (7, 7, 7), (2, 2, 2)),
                       "Conv3d_2b_1x1": lambda: TUnit3D(64, 64),
                       "Conv3d_2c_3x3": lambda: TUnit3D(64, 192, (3, 3, 3))}[name]()
            self.add_module(name, mod)
            self.order.append(name)
        self.avg_pool = nn.AvgPool3d((2, 7, 7), stride=(1, 1, 1))
        self.dropout = nn.Dropout(0.5)
        self.logits = TUnit3D(1024, num_classes, bn=False, act=False, bias=True)

    def forward(self, x):  # (B, 3, T, H, W) -> (B, classes, T')
        for name in self.order:
            x = getattr(self, name)(x)
        x = self.logits(self.dropout(self.avg_pool(x)))
        return x.squeeze(3).squeeze(3)


@pytest.fixture(scope="module")
def torch_ref():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = TI3D().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv3d):   # He init keeps the activation scale through ~20 layers
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            elif isinstance(m, nn.BatchNorm3d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(7)
    sd = I3DC.state_dict_to_numpy(model.state_dict())
    return model, sd


@pytest.fixture(scope="module")
def loaded(torch_ref):
    return I3DC.load_i3d(torch_ref[1])


def _to_torch(x):  # (B, T, H, W, C) -> (B, C, T, H, W)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 4, 1, 2, 3)))


def test_state_dict_layout_and_round_trip(torch_ref, loaded, tmp_path):
    _, sd = torch_ref
    for k in ("Conv3d_1a_7x7.conv3d.weight", "Conv3d_1a_7x7.bn.num_batches_tracked", "Mixed_3b.b1a.bn.running_var",
              "Mixed_5c.b3b.conv3d.weight", "logits.conv3d.weight", "logits.conv3d.bias"):
        assert k in sd
    assert sd["Conv3d_1a_7x7.conv3d.weight"].shape == (64, 3, 7, 7, 7)
    table = I3DC.key_table(loaded)
    assert set(table) == {k for k in sd if not k.endswith("num_batches_tracked")}
    np.testing.assert_array_equal(np.asarray(loaded.Mixed_4e.b2b.conv3d.kernel[...]),
                                  sd["Mixed_4e.b2b.conv3d.weight"].transpose(2, 3, 4, 1, 0))
    np.testing.assert_array_equal(np.asarray(loaded.Mixed_3c.b0.bn.var[...]), sd["Mixed_3c.b0.bn.running_var"])
    np.testing.assert_array_equal(np.asarray(loaded.logits.conv3d.bias[...]), sd["logits.conv3d.bias"])
    # safetensors file round trip, and a DataParallel "module." prefix
    small = {k: v for k, v in sd.items()}
    path = tmp_path / "i3d.safetensors"
    save_file(small, str(path))
    m2 = I3DC.load_i3d(str(path))
    np.testing.assert_array_equal(np.asarray(m2.Mixed_5b.b1b.bn.mean[...]), sd["Mixed_5b.b1b.bn.running_mean"])
    m3 = I3DC.load_i3d({"module." + k: v for k, v in sd.items()})
    assert m3.num_classes == 400


def test_loader_errors_name_the_key(torch_ref, tmp_path):
    _, sd = torch_ref
    bad = dict(sd)
    del bad["Mixed_4c.b2a.bn.running_mean"]
    with pytest.raises(CheckpointError, match=r"missing.*Mixed_4c\.b2a\.bn\.running_mean"):
        I3DC.load_i3d(bad)
    bad = dict(sd, **{"Mixed_6a.b0.conv3d.weight": np.zeros((1, 1, 1, 1, 1), np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected.*Mixed_6a\.b0\.conv3d\.weight"):
        I3DC.load_i3d(bad)
    bad = dict(sd, **{"Mixed_3b.b1b.conv3d.weight": np.zeros((128, 96, 1, 3, 3), np.float32)})
    with pytest.raises(CheckpointError, match=r"mis-shaped.*Mixed_3b\.b1b\.conv3d\.weight"):
        I3DC.load_i3d(bad)
    pt = tmp_path / "rgb_imagenet.pt"
    pt.write_bytes(b"\x80\x02not a safetensors file")
    with pytest.raises(CheckpointError, match="torch.load"):
        I3DC.load_i3d(str(pt))


def test_stem_and_mixed_block_match_torch(torch_ref, loaded):
    tm, _ = torch_ref
    rng = np.random.default_rng(4)
    # stem on odd sizes (asymmetric SAME pads for the stride-2 conv and pool)
    x = rng.uniform(-1, 1, size=(2, 7, 19, 22, 3)).astype(np.float32)
    got = loaded.Conv3d_2c_3x3(loaded.Conv3d_2b_1x1(I.max_pool_same(loaded.Conv3d_1a_7x7(jnp.asarray(x)),
                                                                    (1, 3, 3), (1, 2, 2))))
    with torch.no_grad():
        want = tm.Conv3d_2c_3x3(tm.Conv3d_2b_1x1(tm.MaxPool3d_2a_3x3(tm.Conv3d_1a_7x7(_to_torch(x)))))
    want = want.permute(0, 2, 3, 4, 1).numpy()
    assert got.shape == want.shape == (2, 4, 5, 6, 192)
    assert _rel(got, want) < 1e-4
    # one Inception block and the stride-2 3x3x3 pool on odd sizes
    x = np.abs(rng.normal(size=(2, 5, 9, 11, 192))).astype(np.float32)
    got = I.max_pool_same(loaded.Mixed_3b(jnp.asarray(x)), (3, 3, 3), (2, 2, 2))
    with torch.no_grad():
        want = tm.MaxPool3d_4a_3x3(tm.Mixed_3b(_to_torch(x))).permute(0, 2, 3, 4, 1).numpy()
    assert got.shape == want.shape == (2, 3, 5, 6, 256)
    assert _rel(got, want) < 1e-4


def test_i3d_feature_path_matches_torch(torch_ref, loaded):
    """Raw uint8 videos -> i3d_features (jitted preprocess + network) == torch on the same clip."""
    tm, _ = torch_ref
    rng = np.random.default_rng(5)
    videos = rng.integers(0, 256, size=(2, 20, 40, 48, 3), dtype=np.uint8)
    t0 = time.time()
    feats = F.i3d_features(loaded, videos, batch_size=2)
    print(f"\ni3d_features 2x16x224x224 (compile + run): {time.time() - t0:.1f}s")
    assert feats.shape == (2, 400) and np.isfinite(feats).all()
    clip = np.asarray(F.preprocess_for_i3d(videos))
    with torch.no_grad():
        want = tm(_to_torch(clip)).mean(2).numpy()
    assert _rel(feats, want) < 1e-4, _rel(feats, want)
    assert np.std(want) > 1e-3                           # a non-degenerate check


def test_i3d_shape_checks():
    m = I.I3D(num_classes=7)
    assert I.trunk_shape(16, 224, 224) == (2, 7, 7) and I.trunk_shape(9, 193, 193) == (2, 7, 7)
    with pytest.raises(ValueError, match="at least 9 frames"):
        m(jnp.zeros((1, 8, 224, 224, 3)))
    with pytest.raises(ValueError, match="at least 9 frames"):
        m(jnp.zeros((1, 16, 192, 224, 3)))
    out = jax.eval_shape(m, jax.ShapeDtypeStruct((3, 16, 224, 224, 3), jnp.float32))
    assert out.shape == (3, 7)


class _TinyFeatures(nnx.Module):
    """A cheap stand-in with I3D's feature interface, to test the FVD plumbing without the big network."""
    num_classes = 5

    def __init__(self):
        self.w = nnx.Param(jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.float32))

    def features(self, x):
        return jnp.tanh(x @ self.w[...]).mean(axis=(1, 2, 3)) + x.std(axis=(1, 2, 3)) @ self.w[...]


def test_fvd_plumbing():
    """fvd: identical sets -> ~0, different sets -> > 0, arrays == streaming ragged batches == manual stats."""
    m = _TinyFeatures()
    rng = np.random.default_rng(6)
    a = rng.integers(0, 256, size=(7, 12, 16, 20, 3), dtype=np.uint8)
    b = np.clip(a.astype(np.int32) + 60, 0, 255).astype(np.uint8)
    kw = dict(num_frames=4, size=8)
    assert F.fvd(m, a, a, batch_size=3, **kw) == pytest.approx(0.0, abs=1e-9)
    d = F.fvd(m, a, b, batch_size=3, **kw)
    assert d > 1e-3
    fa = F.i3d_features(m, a, batch_size=3, **kw)
    assert fa.shape == (7, 5)
    want_a = np.asarray(m.features(F.preprocess_for_i3d(a, **kw)))
    np.testing.assert_allclose(fa, want_a, rtol=1e-5, atol=1e-6)
    fb = F.i3d_features(m, b, batch_size=4, **kw)
    manual = F.frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    streamed = F.fvd(m, [a[:1], a[1:5], a[5:]], iter([b[:3], b[3:]]), batch_size=2, **kw)
    assert streamed == pytest.approx(d, rel=1e-5) and manual == pytest.approx(d, rel=1e-5)
