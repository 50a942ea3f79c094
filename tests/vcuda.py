"""Virtual CUDA on a CPU-only machine: real CPU arithmetic, CUDA device semantics.

Every tensor that would live on a CUDA device is a `VT` wrapper (it reports device cuda:i and carries a real CPU
tensor). Each aten op checks what real CUDA would refuse:
  - a non-scalar CPU tensor mixed with CUDA tensors in one op (except ops that take CPU indices / copies),
  - tensors of two different CUDA devices in one op,
  - a CPU torch.Generator used for a CUDA draw, or a CUDA generator for a CPU draw,
  - .numpy() / np.asarray of a CUDA tensor,
  - torch.distributed collectives given CPU tensors while the backend is (emulated) NCCL.
It also counts host synchronisations (item/bool/int/float, .tolist(), D2H copies, data-dependent output shapes,
blocking H2D copies) by the project call site that caused them.

Usage, from the repository root:
       python tests/vcuda.py run CONFIG --smoke --out DIR                         (one process)
       torchrun --nproc_per_node=2 tests/vcuda.py run CONFIG --smoke --out DIR    (gloo underneath, NCCL rules enforced)
Set VCUDA_REPORT=path.json to write the counters; VCUDA_STRICT=1 raises at the first violation; VCUDA_ROOTS
(default: the current folder) says which files count as the project's. In a test process: `install()` first, then
build tensors on "cuda" (tests/test_simulated_cuda.py runs each check in a subprocess).
It cannot check real kernels, memory or numerics.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import json
import os
import sys
import threading
import traceback

import torch
import torch.distributed as tdist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

STRICT = os.environ.get("VCUDA_STRICT", "0") == "1"
PROJECT_ROOTS = tuple(p for p in os.environ.get("VCUDA_ROOTS", os.getcwd()).split(":") if p)
_state = {"current": int(os.environ.get("LOCAL_RANK", 0)), "stage": "start"}
SYNCS: collections.Counter = collections.Counter()
H2D: collections.Counter = collections.Counter()
VIOLATIONS: list[dict] = []
OPS: collections.Counter = collections.Counter()
FT_SYNC_STACKS: dict = {}
META_SOURCES: list = []
_local = threading.local()


def _site(skip_torch=True) -> str:
    frames = traceback.extract_stack()[:-2]
    proj = [f for f in frames if f.filename.startswith(PROJECT_ROOTS) and not f.filename.endswith("vcuda.py")]
    if proj:
        f = proj[-1]
        root = next(r for r in PROJECT_ROOTS if f.filename.startswith(r))
        return f"{os.path.relpath(f.filename, root)}:{f.lineno} ({f.name})"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}"


def _violation(kind: str, detail: str):
    site = _site()
    stack = "".join(traceback.format_list([f for f in traceback.extract_stack()[:-2]
                                           if f.filename.startswith(PROJECT_ROOTS)][-6:]))
    VIOLATIONS.append({"kind": kind, "site": site, "detail": detail, "stage": _state["stage"], "stack": stack})
    if STRICT:
        raise RuntimeError(f"[vcuda] {kind} at {site}: {detail}")


def cuda_device(index=None) -> torch.device:
    return torch.device("cuda", _state["current"] if index is None else index)


def _is_cuda(dev) -> bool:
    if dev is None:
        return False
    if isinstance(dev, int):
        return True   # an int device means a CUDA ordinal in most torch APIs
    return torch.device(dev).type == "cuda"


def _norm_cuda(dev) -> torch.device:
    if isinstance(dev, int):
        return cuda_device(dev)
    dev = torch.device(dev)
    return cuda_device(dev.index)


class VT(torch.Tensor):
    """A tensor on a virtual CUDA device: Python sees device cuda:i; C++ sees a meta tensor (so autograd never
    touches CUDA streams); the data is the real CPU tensor `elem`."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor, device: torch.device, requires_grad: bool = False):
        assert not isinstance(elem, VT)
        if elem.device.type != "cpu" and os.environ.get("VCUDA_METADEBUG"):
            print("VT WITH", elem.device, tuple(elem.shape), file=sys.stderr)
            traceback.print_stack(limit=12)
        elem = elem.detach() if elem.requires_grad else elem
        _local.explicit_meta = getattr(_local, "explicit_meta", 0) + 1
        try:
            meta = torch.empty_strided(elem.size(), elem.stride(), dtype=elem.dtype, device="meta")
        finally:
            _local.explicit_meta -= 1
        r = torch.Tensor._make_subclass(cls, meta, requires_grad)
        r.elem = elem
        r._vdev = device
        return r

    @property
    def device(self):
        return self._vdev

    @property
    def is_cuda(self):
        return True

    @property
    def is_cpu(self):
        return False

    @property
    def is_meta(self):
        return False

    def get_device(self):
        return self._vdev.index

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        new = VT(self.elem.clone(), self._vdev, self.requires_grad)
        if getattr(self, "_is_param", False):
            new._is_param = True
        memo[id(self)] = new
        return new

    def __reduce_ex__(self, proto):
        raise TypeError("vcuda: pickling a CUDA tensor wrapper (torch.save is patched to copy to CPU)")

    def __repr__(self, *, tensor_contents=None):
        return f"VT(device={self._vdev}, {self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        return _dispatch(func, args, kwargs)


# ops allowed to mix CPU (non-scalar) tensors with CUDA ones
_MIXED_OK = {"aten::_to_copy", "aten::copy_", "aten::index.Tensor", "aten::index_put_", "aten::index_put",
             "aten::_index_put_impl_", "aten::set_", "aten::lift_fresh", "aten::detach", "aten::alias",
             "aten::_has_compatible_shallow_copy_type", "aten::to"}
_SYNC_OPS = {"aten::_local_scalar_dense": "item/bool/int/float", "aten::is_nonzero": "bool()",
             "aten::equal": "torch.equal", "aten::nonzero": "nonzero (data-dependent shape)",
             "aten::unique": "unique", "aten::_unique2": "unique", "aten::masked_select": "masked_select",
             "aten::nonzero_static": None, "aten::repeat_interleave.Tensor": "repeat_interleave(tensor)",
             "aten::allclose": "allclose", "aten::_assert_async.msg": None}
_LOWP = (torch.float16, torch.bfloat16)
_AUTOCAST_LOW = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::convolution",
                 "aten::_convolution", "aten::addmv", "aten::mv", "aten::matmul", "aten::linear",
                 "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                 "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention",
                 "aten::scaled_dot_product_attention", "aten::prelu", "aten::conv2d", "aten::conv_transpose2d"}
_AUTOCAST_FP32 = {"aten::_softmax", "aten::_log_softmax", "aten::native_layer_norm", "aten::native_group_norm",
                  "aten::mse_loss", "aten::nll_loss_forward", "aten::exp", "aten::log", "aten::pow", "aten::rsqrt",
                  "aten::logsumexp", "aten::cumsum", "aten::sum", "aten::prod", "aten::softplus", "aten::cdist",
                  "aten::_cdist_forward", "aten::cross_entropy_loss", "aten::reciprocal", "aten::acos",
                  "aten::asin", "aten::expm1", "aten::log1p", "aten::erfinv", "aten::norm",
                  "aten::linalg_vector_norm", "aten::binary_cross_entropy_with_logits", "aten::layer_norm",
                  "aten::group_norm"}


def _name(func) -> str:
    n = func._schema.name
    ov = func._overloadname
    return n if ov == "default" else f"{n}.{ov}"


def _dispatch(func, args, kwargs):
    name = func._schema.name
    full = _name(func)
    flat, _ = tree_flatten((args, kwargs))
    vts = [t for t in flat if isinstance(t, VT)]
    cpus = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, VT)]
    devs = {t.device for t in vts}
    if len(devs) > 1:
        _violation("two CUDA devices in one op", f"{full}: {sorted(map(str, devs))}")
    if vts and cpus and name not in _MIXED_OK and full not in _MIXED_OK:
        bad = [t for t in cpus if t.dim() > 0]
        if bad:
            _violation("CPU tensor mixed with CUDA tensors",
                       f"{full}: CPU shapes {[tuple(t.shape) for t in bad][:4]} "
                       f"with cuda {[tuple(t.shape) for t in vts][:3]}")
    target_dev = next(iter(devs)) if vts else None
    # device kwarg
    kw = dict(kwargs)
    wrap_out = bool(vts)
    if "device" in kw and kw["device"] is not None and not isinstance(kw["device"], int) and \
            torch.device(kw["device"]).type == "meta" and vts:
        kw["device"] = torch.device("cpu")   # C++ options() of a VT: its virtual CUDA device
        wrap_out = True
    elif "device" in kw and kw["device"] is not None:
        if _is_cuda(kw["device"]):
            target_dev = _norm_cuda(kw["device"])
            kw["device"] = torch.device("cpu")
            wrap_out = True
        elif torch.device(kw["device"]).type == "cpu":
            wrap_out = False
    if name in _SYNC_OPS and vts:
        label = _SYNC_OPS[name]
        if label:
            SYNCS[(_state["stage"], label, _site())] += 1
            if _state["stage"] == "finetune" and name == "aten::_local_scalar_dense":
                FT_SYNC_STACKS.setdefault(_site(), "".join(traceback.format_stack(limit=12)[:-3]))
    if name in ("aten::_to_copy", "aten::copy_"):
        if name == "aten::_to_copy" and vts and not wrap_out:
            SYNCS[(_state["stage"], "D2H copy (.cpu()/.to(cpu))", _site())] += 1
        if name == "aten::copy_" and vts and isinstance(args[0], torch.Tensor) and not isinstance(args[0], VT):
            SYNCS[(_state["stage"], "D2H copy_", _site())] += 1
        if name == "aten::copy_" and isinstance(args[0], VT) and isinstance(args[1], torch.Tensor) \
                and not isinstance(args[1], VT) and args[1].dim() > 0:
            H2D[(_state["stage"], "H2D copy_ (blocking unless non_blocking+pinned)", _site())] += 1
    if name in ("aten::index.Tensor", "aten::index_put_", "aten::_index_put_impl_") and vts:
        idx = args[1] if len(args) > 1 else []
        for i in (idx or []):
            if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                SYNCS[(_state["stage"], "boolean-mask indexing (data-dependent shape)", _site())] += 1
                break
    OPS[full] += 1
    metas = [t for t in cpus if t.device.type == "meta"]
    if metas and os.environ.get("VCUDA_METADEBUG"):
        print("META IN", full, [(type(t).__name__, str(t.device), tuple(t.shape), t.dtype) for t in flat
                                if isinstance(t, torch.Tensor)], file=sys.stderr)
    if metas:
        _violation("meta tensor leaked into an op (harness limitation or real device mix)", f"{full}")
    uargs = tree_map(lambda t: t.elem if isinstance(t, VT) else t, args)
    ukw = tree_map(lambda t: t.elem if isinstance(t, VT) else t, kw)
    if vts and torch.is_autocast_enabled("cuda"):
        low = torch.get_autocast_dtype("cuda")
        if name in _AUTOCAST_LOW:
            cast = lambda t: t.to(low) if isinstance(t, torch.Tensor) and t.is_floating_point() \
                and t.dtype != torch.float64 else t
            uargs, ukw = tree_map(cast, uargs), tree_map(cast, ukw)
        elif name in _AUTOCAST_FP32:
            cast = lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype in _LOWP else t
            uargs, ukw = tree_map(cast, uargs), tree_map(cast, ukw)
    try:
        out = func(*uargs, **ukw)
    except (RuntimeError, NotImplementedError) as e:
        msg = str(e)
        if "not implemented for 'Half'" in msg or "not implemented for 'BFloat16'" in msg or "Half" in msg:
            low = next((t.dtype for t in tree_flatten((uargs, ukw))[0] if isinstance(t, torch.Tensor)
                        and t.dtype in _LOWP), None)
            up = lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype in _LOWP else t
            out = func(*tree_map(up, uargs), **tree_map(up, ukw))
            out = tree_map(lambda t: t.to(low) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, out)
        else:
            raise
    if func._schema.is_mutable and name.endswith("_") and args and isinstance(args[0], VT):
        return args[0]
    if not wrap_out:
        return out
    dev = target_dev or cuda_device()

    def wrap(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, VT):
            return VT(t, dev)
        return t
    return tree_map(wrap, out)


def to_vt(t: torch.Tensor, device) -> torch.Tensor:
    if isinstance(t, VT):
        return t
    with torch.no_grad():
        elem = t.detach().clone()
    return VT(elem, _norm_cuda(device), t.requires_grad and torch.is_grad_enabled())


# C++ composites that build helper tensors from self.options() (meta here): run them on the CPU data when no
# gradient flows through them (a harness limitation, not a project finding)
_ON_ELEM = {"one_hot", "affine_grid", "grid_sample", "cdist", "searchsorted", "histc", "bincount", "multinomial",
            "nonzero", "argwhere", "unique", "topk", "kthvalue", "sort", "argsort", "interpolate",
            "embedding_bag", "tril_indices", "triu_indices"}
_FN_LOW = {"linear", "matmul", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "mv", "conv1d", "conv2d",
           "conv3d", "conv_transpose1d", "conv_transpose2d", "scaled_dot_product_attention", "einsum", "prelu",
           "__matmul__", "__rmatmul__", "chain_matmul"}
_FN_FP32 = {"softmax", "log_softmax", "layer_norm", "group_norm", "cross_entropy", "mse_loss", "nll_loss", "exp",
            "log", "log2", "log10", "log1p", "expm1", "pow", "__pow__", "rsqrt", "reciprocal", "softplus", "cumsum",
            "cumprod", "prod", "sum", "norm", "logsumexp", "cdist", "binary_cross_entropy_with_logits", "l1_loss",
            "smooth_l1_loss", "kl_div", "cosine_similarity", "acos", "asin", "tan", "sinh", "cosh", "erfinv",
            "linalg_vector_norm", "vector_norm", "frobenius_norm", "nuclear_norm", "dist", "renorm"}
_FACTORIES = {"randn", "rand", "randint", "randperm", "zeros", "ones", "empty", "full", "arange", "linspace",
              "logspace", "eye", "tensor", "as_tensor", "zeros_like", "ones_like", "empty_like", "full_like",
              "rand_like", "randn_like", "randint_like", "normal", "empty_strided", "scalar_tensor", "tril_indices",
              "triu_indices", "from_numpy", "asarray"}


class VCudaMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and not isinstance(dev, int) and torch.device(dev).type == "meta":
            _local.explicit_meta = getattr(_local, "explicit_meta", 0) + 1
            try:
                return func(*args, **kwargs)
            finally:
                _local.explicit_meta -= 1
        return self._handle(func, types, args, kwargs)

    def _handle(self, func, types, args, kwargs):
        fname = getattr(func, "__name__", str(func))
        if fname in _FN_LOW or fname in _FN_FP32:
            flat = tree_flatten((args, kwargs))[0]
            if any(isinstance(t, VT) for t in flat) and torch.is_autocast_enabled("cuda"):
                if fname in _FN_LOW:
                    low = torch.get_autocast_dtype("cuda")
                    cast = lambda t: t.to(low) if isinstance(t, torch.Tensor) and t.is_floating_point() \
                        and t.dtype != torch.float64 and t.dtype != low else t
                else:
                    cast = lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype in _LOWP else t
                with torch.autocast("cuda", enabled=False):
                    args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
                    return self._handle2(func, types, args, kwargs, fname)
        return self._handle2(func, types, args, kwargs, fname)

    def _handle2(self, func, types, args, kwargs, fname):
        # generators: device agreement
        gen = kwargs.get("generator")
        if isinstance(gen, torch.Generator) and fname not in ("manual_seed",):
            gen_cuda = getattr(gen, "_vcuda", False)
            if "device" in kwargs and kwargs["device"] is not None:
                want_cuda = _is_cuda(kwargs["device"])
            elif args and isinstance(args[0], torch.Tensor) and fname.endswith("_"):
                want_cuda = isinstance(args[0], VT)
            elif fname.endswith("_like") and args and isinstance(args[0], torch.Tensor):
                want_cuda = isinstance(args[0], VT)
            else:
                want_cuda = False
            if want_cuda != gen_cuda:
                _violation("generator device mismatch",
                           f"{fname}: {'CUDA' if gen_cuda else 'CPU'} generator "
                           f"for a {'CUDA' if want_cuda else 'CPU'} draw")
        if fname == "numpy" or fname == "__array__":
            if args and isinstance(args[0], VT):
                _violation(".numpy() of a CUDA tensor", "TypeError on real CUDA")
                raise TypeError("can't convert cuda:0 device type tensor to numpy (vcuda)")
        if fname == "tolist" and args and isinstance(args[0], VT):
            SYNCS[(_state["stage"], ".tolist()", _site())] += 1
            return args[0].elem.tolist()
        if fname in _ON_ELEM:
            flat, _ = tree_flatten((args, kwargs))
            vts = [t for t in flat if isinstance(t, VT)]
            if vts and not any(t.requires_grad for t in vts) and not torch.is_grad_enabled() or \
                    vts and not any(t.requires_grad for t in vts):
                dev = vts[0].device
                ua = tree_map(lambda t: t.elem if isinstance(t, VT) else t, args)
                uk = tree_map(lambda t: t.elem if isinstance(t, VT) else t, kwargs)
                others = [t for t in tree_flatten((ua, uk))[0] if isinstance(t, torch.Tensor)
                          and t.dim() > 0 and not any(t is v.elem for v in vts)]
                if others:
                    _violation("CPU tensor mixed with CUDA tensors", f"{fname} (composite)")
                out = func(*ua, **uk)
                return tree_map(lambda t: VT(t, dev) if isinstance(t, torch.Tensor) else t, out)
        if fname in ("to", "cuda") and args and isinstance(args[0], torch.Tensor):
            t = args[0]
            dtype = memory_format = None
            non_blocking = bool(kwargs.get("non_blocking", False))
            if fname == "cuda":
                d = args[1] if len(args) > 1 else kwargs.get("device")
                dev = cuda_device(d if isinstance(d, int) else (torch.device(d).index if d is not None else None))
                memory_format = kwargs.get("memory_format")
            elif len(args) > 1 and isinstance(args[1], torch.Tensor):
                dev, dtype = args[1].device, args[1].dtype
                non_blocking = bool(args[2]) if len(args) > 2 else non_blocking
            else:
                kw = {k: v for k, v in kwargs.items() if k != "copy"}
                dev, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args[1:], **kw)
            if dev is not None and dev.type == "cuda" and not isinstance(t, VT):
                how = " non_blocking (pageable: no overlap)" if non_blocking else " (blocking)"
                H2D[(_state["stage"], "H2D .to(cuda)" + how, _site())] += 1
                base = t
                if dtype is not None or memory_format is not None:
                    with torch._C.DisableTorchFunctionSubclass():
                        base = t.to(dtype=dtype if dtype is not None else t.dtype,
                                    memory_format=memory_format or torch.preserve_format)
                return to_vt(base, dev)
            if dev is not None and dev.type == "cuda" and isinstance(t, VT):
                if dev.index is not None and dev.index != t.device.index:
                    _violation("cross-device .to", f"{t.device} -> {dev}")
                if dtype is None and memory_format is None:
                    return t
                return t.to(dtype=dtype if dtype is not None else t.dtype,
                            memory_format=memory_format or torch.preserve_format)
        if fname in ("as_tensor", "asarray") and args and isinstance(args[0], VT) and \
                (kwargs.get("device") is None or _is_cuda(kwargs["device"])):
            t = args[0]
            return t if kwargs.get("dtype") in (None, t.dtype) else t.to(kwargs["dtype"])
        if "device" in kwargs and kwargs["device"] is not None and _is_cuda(kwargs["device"]):
            dev = kwargs["device"]
            if True:
                kw = dict(kwargs)
                kw["device"] = "cpu"
                if isinstance(gen, torch.Generator):
                    pass
                if fname in ("tensor", "as_tensor", "from_numpy", "asarray"):
                    H2D[(_state["stage"], f"H2D torch.{fname}(..., device=cuda) (blocking)", _site())] += 1
                out = func(*args, **kw)
                return to_vt(out, dev) if isinstance(out, torch.Tensor) else out
        return func(*args, **kwargs)


class MetaFactoryMode(TorchDispatchMode):
    """C++ code that builds helper tensors from a VT's options() asks for meta tensors (the VT's C++ device):
    make those real CPU data on the virtual CUDA device instead. Explicit meta requests pass through."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not getattr(_local, "explicit_meta", 0):
            flat = tree_flatten((args, kwargs))[0]
            tensors = [t for t in flat if isinstance(t, torch.Tensor)]
            dev = kwargs.get("device")
            if not tensors and dev is not None and torch.device(dev).type == "meta":
                kw = dict(kwargs)
                kw["device"] = torch.device("cpu")
                out = func(*args, **kw)
                return tree_map(lambda t: VT(t, cuda_device()) if isinstance(t, torch.Tensor) else t, out)
        out = func(*args, **kwargs)
        if not getattr(_local, "explicit_meta", 0):
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and not isinstance(t, VT)
                    and t.device.type == "meta"]
            if outs:
                ins = [(type(t).__name__, str(t.device)) for t in tree_flatten((args, kwargs))[0]
                       if isinstance(t, torch.Tensor)]
                META_SOURCES.append((_name(func), str(ins)[:200], "".join(traceback.format_stack(limit=14)[:-2])))
                if os.environ.get("VCUDA_METADEBUG"):
                    print("META LEAK", _name(func), ins, file=sys.stderr)
                    traceback.print_stack(limit=25)
        return out


# ---------------------------------------------------------------------------------------------------------
# torch.cuda, Generator, save/load, distributed

_RealGenerator = torch.Generator


class VGenerator(torch.Generator):
    def __new__(cls, device="cpu"):
        is_cuda = _is_cuda(device) if device is not None else False
        g = _RealGenerator.__new__(cls, "cpu")
        g._vcuda = is_cuda
        g._vdev = _norm_cuda(device) if is_cuda else torch.device("cpu")
        return g

    @property
    def device(self):
        return self._vdev


def _patch_cuda():
    c = torch.cuda
    c.is_available = lambda: True
    c.device_count = lambda: int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))

    def set_device(d):
        _state["current"] = torch.device(d).index if not isinstance(d, int) else d
    c.set_device = set_device
    c.current_device = lambda: _state["current"]
    c.get_device_name = lambda *a, **k: "vcuda"
    c.get_device_capability = lambda *a, **k: (9, 0)
    c.is_bf16_supported = lambda *a, **k: True

    def synchronize(*a, **k):
        SYNCS[(_state["stage"], "torch.cuda.synchronize", _site())] += 1
    c.synchronize = synchronize
    c.get_rng_state = lambda device=None: torch.get_rng_state()
    c.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    c.max_memory_allocated = lambda *a, **k: 0
    c.memory_allocated = lambda *a, **k: 0
    c.max_memory_reserved = lambda *a, **k: 0
    import types as _types
    c.get_device_properties = lambda *a, **k: _types.SimpleNamespace(total_memory=80 * 2 ** 30, name="vcuda",
                                                                      multi_processor_count=132)
    c.reset_peak_memory_stats = lambda *a, **k: None
    c.empty_cache = lambda: None
    c.manual_seed_all = lambda seed: None
    c.manual_seed = lambda seed: None
    torch.Generator = VGenerator
    torch.optim.Optimizer._accelerator_graph_capture_health_check = lambda self: None
    _orig_save, _orig_load = torch.save, torch.load

    def save(obj, f, *a, **k):
        def cpu(t):
            if isinstance(t, VT):
                SYNCS[(_state["stage"], "torch.save of CUDA tensors (D2H)", _site())] += 1
                out = t.elem.detach().clone()
                return out
            return t
        return _orig_save(tree_map(cpu, obj), f, *a, **k)

    def load(f, *a, map_location=None, **k):
        cuda = map_location is not None and not callable(map_location) and not isinstance(map_location, dict) \
            and _is_cuda(map_location)
        obj = _orig_load(f, *a, map_location="cpu" if cuda else map_location, **k)
        if cuda:
            obj = tree_map(lambda t: to_vt(t, map_location) if isinstance(t, torch.Tensor) else t, obj)
        return obj
    torch.save, torch.load = save, load


_EMULATE_NCCL = {"on": False}


def _check_coll(name, tensors):
    if not _EMULATE_NCCL["on"]:
        return
    for t in tensors:
        if isinstance(t, torch.Tensor) and not isinstance(t, VT):
            _violation("NCCL collective on a CPU tensor", f"{name}: shape {tuple(t.shape)} {t.dtype}")


def _un(t):
    return t.elem if isinstance(t, VT) else t


def _patch_dist():
    real_init = tdist.init_process_group

    def init_process_group(backend=None, *a, **k):
        if backend == "nccl":
            _EMULATE_NCCL["on"] = True
            backend = "gloo"
        return real_init(backend, *a, **k)
    tdist.init_process_group = init_process_group
    real_get_backend = tdist.get_backend
    tdist.get_backend = lambda *a, **k: "nccl" if _EMULATE_NCCL["on"] else real_get_backend(*a, **k)
    real_all_reduce, real_all_gather, real_broadcast, real_barrier = (tdist.all_reduce, tdist.all_gather,
                                                                      tdist.broadcast, tdist.barrier)

    def all_reduce(t, *a, **k):
        _check_coll("all_reduce", [t])
        SYNCS[(_state["stage"], "collective all_reduce", _site())] += 0
        return real_all_reduce(_un(t), *a, **k)

    def all_gather(out, t, *a, **k):
        _check_coll("all_gather", list(out) + [t])
        return real_all_gather([_un(o) for o in out], _un(t), *a, **k)

    def broadcast(t, *a, **k):
        _check_coll("broadcast", [t])
        return real_broadcast(_un(t), *a, **k)

    def barrier(*a, **k):
        return real_barrier(*a, **k)
    tdist.all_reduce, tdist.all_gather, tdist.broadcast, tdist.barrier = all_reduce, all_gather, broadcast, barrier
    for name in ("all_gather_object", "broadcast_object_list", "gather", "scatter", "reduce", "all_to_all",
                 "reduce_scatter", "all_gather_into_tensor", "reduce_scatter_tensor", "send", "recv"):
        real = getattr(tdist, name)

        def wrapped(*a, _real=real, _name=name, **k):
            _violation("unemulated collective used", _name)
            return _real(*tree_map(_un, a), **tree_map(_un, k))
        setattr(tdist, name, wrapped)


def _patch_stage_markers():
    """Label counters with the neon stage running: each staged function is wrapped, and every loaded module that
    imported it by name gets the wrapper (a stage missing from this version of the project is left out)."""
    import importlib
    for name in ("neon.run", "neon.sweep", "neon.snapshot_sweep", "neon.baselines"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)

    def marked(real, label):
        def w(*a, **k):
            prev = _state["stage"]
            _state["stage"] = label
            try:
                return real(*a, **k)
            finally:
                _state["stage"] = prev
        return w
    staged = {("neon.sampling", "sample_to_npz"): "sample S", ("neon.selftrain", "encode_examples"): "encode",
              ("neon.selftrain", "finetune"): "finetune", ("neon.evaluate", "evaluate_images"): "evaluate_images"}
    for (mod_name, fn), label in staged.items():
        real = getattr(importlib.import_module(mod_name), fn, None)
        if real is None:
            continue
        w = marked(real, label)
        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith("neon") and getattr(mod, fn, None) is real:
                setattr(mod, fn, w)
    sweep = sys.modules.get("neon.sweep")
    if sweep is not None and hasattr(getattr(sweep, "Sweep", None), "evaluate"):
        sweep.Sweep.evaluate = marked(sweep.Sweep.evaluate, "sweep point")


def report(path: str | None = None) -> dict:
    rank = os.environ.get("RANK", "0")
    by_site = collections.defaultdict(int)
    for (stage, kind, site), n in SYNCS.items():
        by_site[(stage, kind, site)] += n
    doc = {"rank": rank,
           "violations": VIOLATIONS,
           "syncs": [{"stage": s, "kind": k, "site": site, "count": n}
                     for (s, k, site), n in sorted(by_site.items(), key=lambda kv: -kv[1])],
           "h2d": [{"stage": s, "kind": k, "site": site, "count": n}
                   for (s, k, site), n in sorted(H2D.items(), key=lambda kv: -kv[1])],
           "ops": OPS.most_common(40), "ft_sync_stacks": FT_SYNC_STACKS}
    if path:
        with open(path.replace("{rank}", rank), "w") as f:
            json.dump(doc, f, indent=1)
    return doc


_mode = None


def install():
    global _mode
    _patch_cuda()
    _patch_dist()
    _mode = VCudaMode()
    _mode.__enter__()
    MetaFactoryMode().__enter__()
    out = os.environ.get("VCUDA_REPORT")
    atexit.register(lambda: report(out))
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)

    def _term(signum, frame):
        report(out)
        os._exit(143)
    signal.signal(signal.SIGTERM, _term)
    delay = os.environ.get("VCUDA_DELAY_RANK1_IN")
    if delay and os.environ.get("RANK") == "1":
        import importlib
        mod_name, fn = delay.rsplit(".", 1)
        mod = importlib.import_module(mod_name)
        real = getattr(mod, fn)

        def delayed(*a, **k):
            import time
            time.sleep(float(os.environ.get("VCUDA_DELAY_S", "3")))
            return real(*a, **k)
        setattr(mod, fn, delayed)
        if mod_name == "neon.baselines":
            mod.BASELINES[fn] = delayed


if __name__ == "__main__":
    install()
    _patch_stage_markers()
    from neon.cli import main
    sys.argv = ["neon"] + sys.argv[1:]
    try:
        main()
    finally:
        report(os.environ.get("VCUDA_REPORT"))
