"""Self-training with low-rank adapters (LoRA), as diffusers' train_text_to_image_lora.py does it: PEFT adapters of
rank r on the target modules (to_q, to_k, to_v, to_out.0 by default), Gaussian init (A ~ N(0, 1/r), B = 0, so
training starts at θr), scale alpha / r, and only the adapters trained.

θs is then θr with its adapters fused, W + s·B·A, saved in the family's container like any snapshot: the sweep and
the merge see full weights, and (1+w)·θr − w·θs = θr − w·ΔW_s is the merge of `neon.lora` up to float rounding.
The factors are kept beside each snapshot, so θneon can also be written as a LoRA of rank r (neon.lora.neon_lora).
"""
from __future__ import annotations

import json
import os

import torch

from neon.checkpoint import atomic_path
from neon.errors import NeonError, shown
from neon.lora import Lora

DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]   # train_text_to_image_lora.py's target_modules
ADAPTER = "default"                                     # PEFT's adapter name
FIELDS = ("rank", "alpha", "targets", "out_rank")


def check_lora(spec: dict | None, where: str = "finetune.lora") -> dict | None:
    """{rank, alpha, targets, out_rank} with defaults filled (alpha = rank, as the script; the four attention
    projections; out_rank None: θneon's LoRA keeps its exact rank), or None for full fine-tuning; a bad field is
    one line naming it."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise NeonError(f"{where}: expected a mapping with {', '.join(FIELDS)} (or null), got {shown(spec)}")
    unknown = sorted(set(spec) - set(FIELDS))
    if unknown:
        raise NeonError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(FIELDS)})")
    rank = spec.get("rank", 4)
    if not (isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= 4096):
        raise NeonError(f"{where}.rank: an integer in [1, 4096], got {shown(rank)}")
    alpha = spec.get("alpha", rank)
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0):
        raise NeonError(f"{where}.alpha: a positive number, got {shown(alpha)}")
    targets = spec.get("targets", DEFAULT_TARGETS)
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise NeonError(f"{where}.targets: a non-empty list of module names, got {shown(targets)}")
    out_rank = spec.get("out_rank")
    if out_rank is not None and not (isinstance(out_rank, int) and not isinstance(out_rank, bool) and out_rank >= 1):
        raise NeonError(f"{where}.out_rank: a rank of at least 1 (θneon's LoRA cut to it by SVD), or null, got "
                        f"{shown(out_rank)}")
    return {"rank": rank, "alpha": float(alpha), "targets": list(targets), "out_rank": out_rank}


def add_adapters(net: torch.nn.Module, spec: dict, seed: int) -> None:
    """Put fresh adapters on `net`'s target modules (in place), their init drawn from `seed` alone: every rank
    starts from the same A, whatever the global RNG holds."""
    from peft import LoraConfig, inject_adapter_in_model
    config = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], init_lora_weights="gaussian",
                        target_modules=spec["targets"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(config, net, adapter_name=ADAPTER)
        except ValueError as e:   # no module matches the targets
            raise NeonError(f"finetune.lora.targets: {str(e).splitlines()[0]}") from None


def continue_adapters(net: torch.nn.Module, loras: dict[str, Lora]) -> None:
    """Put θr's own adapters on `net` (in place), whose adapted weights hold base + ΔW_r: each becomes the base
    W = (W + ΔW_r) − ΔW_r (in float32: the base again up to its rounding) with the factors A_r, B_r on it, so
    training continues the user's LoRA from where it stands."""
    from peft import LoraConfig, inject_adapter_in_model
    ranks = {name: lora.rank for name, lora in loras.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(loras), rank_pattern=ranks,
                        alpha_pattern=ranks, init_lora_weights=False)   # alpha = r: scale 1, folded into B below
    try:
        inject_adapter_in_model(config, net, adapter_name=ADAPTER)
    except ValueError as e:
        raise NeonError(f"θr's LoRA: {str(e).splitlines()[0]}") from None
    layers = dict(_lora_layers(net))
    with torch.no_grad():
        for name, lora in loras.items():
            if name not in layers:
                raise NeonError(f"θr's LoRA adapts {name!r}, which the network has no such layer for")
            m = layers[name]
            base = m.get_base_layer().weight
            base.copy_((base.float() - lora.delta().to(base.device).reshape(base.shape)).to(base.dtype))
            m.lora_A[ADAPTER].weight.copy_(lora.down)
            m.lora_B[ADAPTER].weight.copy_(lora.scale * lora.up)


def adapter_parameters(net: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the adapters' factors: what LoRA self-training updates."""
    return [(n, p) for n, p in net.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def _lora_layers(net: torch.nn.Module):
    from peft.tuners.lora import LoraLayer
    return [(name, m) for name, m in net.named_modules() if isinstance(m, LoraLayer)]


def factors(net: torch.nn.Module) -> dict[str, Lora]:
    """module name -> its adapter's factors (A, B) and scale alpha / r, detached on the CPU."""
    return {name: Lora(m.lora_A[ADAPTER].weight.detach().cpu().clone(), m.lora_B[ADAPTER].weight.detach().cpu().clone(),
                       float(m.scaling[ADAPTER])) for name, m in _lora_layers(net)}


def fused_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the network without adapters, each adapted weight W + s·B·A (in float32, cast back to W's
    dtype): the keys and shapes of θr's."""
    state = {k.replace(".base_layer.", "."): v.detach().clone() for k, v in net.state_dict().items()
             if ".lora_A." not in k and ".lora_B." not in k and ".lora_" not in k}
    for name, m in _lora_layers(net):
        key = f"{name}.weight"
        delta = m.get_delta_weight(ADAPTER).detach()
        state[key] = (state[key].float() + delta.float()).to(state[key].dtype)
    return state


def save_factors(loras: dict[str, Lora], path: str) -> None:
    """The adapters as safetensors (atomically): `<module>.down`, `<module>.up`, scales in the header."""
    from safetensors.torch import save_file
    tensors = {}
    for name, lora in loras.items():
        tensors[f"{name}.down"], tensors[f"{name}.up"] = lora.down.contiguous(), lora.up.contiguous()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"scales": json.dumps({n: lora.scale for n, lora in loras.items()})})


def read_factors(path: str) -> dict[str, Lora]:
    """What `save_factors` wrote; anything else is one line naming the file."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            scales = json.loads((f.metadata() or {}).get("scales", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, RuntimeError) as e:   # missing, not safetensors, bad header
        raise NeonError(f"{path}: cannot read the self-trained adapters ({str(e).splitlines()[0]})") from None
    if not isinstance(scales, dict) or not scales or \
            set(tensors) != {f"{n}.{part}" for n in scales for part in ("down", "up")}:
        raise NeonError(f"{path}: not a file of self-trained adapters (<module>.down/.up with their scales)")
    return {n: Lora(tensors[f"{n}.down"], tensors[f"{n}.up"], float(scales[n])) for n in scales}
