"""The GPU paths on a simulated CUDA device (tests/vcuda.py): tensors that would live on the GPU report cuda:0 and
compute on the CPU, and every op refuses what CUDA refuses (CPU and CUDA tensors in one op, a CPU generator for a
CUDA draw, .numpy() of a CUDA tensor). The simulation patches torch for a whole process, so each check runs in
its own. It cannot check kernels, memory or numerics (bench/device_check.sh on a GPU does)."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from neon.selftrain import last_log_entry

REPO = Path(__file__).resolve().parents[1]
# The project's files: host synchronisations are counted by the line of these that caused them.
ROOTS = [REPO / name for name in ("neon", "edm", "var", "xar", "imm", "hf_diffusers", "experiments")]
SIMULATED = "import sys\nsys.path.insert(0, 'tests')\nimport vcuda\nvcuda.install()\n"

# `neon run CONFIG --smoke` on the simulated GPU, counting the network's evaluations by stage while it samples.
SMOKE_RUN = SIMULATED + '''
import json
from neon.cli import main
from neon.family import get_family

config, out, family, counts = sys.argv[1:5]
vcuda._patch_stage_markers()
evaluations = {}

def count(module, inputs):
    evaluations[vcuda._state["stage"]] = evaluations.get(vcuda._state["stage"], 0) + 1

cls = type(get_family(family))
real_sample = cls.sample

def sample(self, bundle, *args, **kwargs):
    hook = bundle.net.register_forward_pre_hook(count)
    try:
        return real_sample(self, bundle, *args, **kwargs)
    finally:
        hook.remove()
cls.sample = sample
sys.argv = ["neon", "run", config, "--smoke", "--out", out]
try:
    main()
finally:
    with open(counts, "w") as f:
        json.dump(evaluations, f)
'''

# Three cheap smoke runs under simulation (about 35, 15 and 40 s on a 2-core machine): EDM's runs every baseline,
# the guided ones included (θneon merged on the GPU from θs read from a file); the diffusers DiT encodes its latents;
# SD3 trains a LoRA with the flow-matching loss and writes θneon as a LoRA.
SMOKE_CONFIGS = ["configs/edm_cifar10_cond.yaml", "configs/diffusers_dit_256.yaml", "configs/text2image_sd35.yaml"]


def _simulated(tmp_path, code: str, *args: str) -> dict:
    """Run `code` in a process on the simulated GPU -> its report (violations, host syncs by stage and site)."""
    report = tmp_path / "vcuda.json"
    env = {**os.environ, "VCUDA_REPORT": str(report), "VCUDA_ROOTS": ":".join(map(str, ROOTS)),
           "OMP_NUM_THREADS": "1"}
    env.pop("VCUDA_STRICT", None)
    res = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(report.read_text())


def _no_violations(report: dict) -> None:
    found = [f"{v['kind']} at {v['site']} ({v['stage']}): {v['detail']}" for v in report["violations"]]
    assert not found, "\n".join(found[:10])


def test_merging_a_theta_r_on_the_gpu_with_a_theta_s_read_to_the_cpu_stays_on_the_gpu(tmp_path):
    code = SIMULATED + '''
import torch
from neon.merge import merge_state_dicts

g = torch.Generator().manual_seed(0)
theta_s = {"weight": torch.randn(3, 4, generator=g), "half": torch.randn(5, generator=g).to(torch.bfloat16),
           "steps": torch.tensor(4)}   # as read from a file: on the CPU
theta_r = {k: (v + 1).to("cuda") for k, v in theta_s.items()}
merged = merge_state_dicts(theta_r, theta_s, 0.5)
assert all(t.device.type == "cuda" for t in merged.values()), {k: t.device for k, t in merged.items()}
on_cpu = merge_state_dicts({k: v.cpu() for k, v in theta_r.items()}, theta_s, 0.5)
assert all(torch.equal(merged[k].cpu(), on_cpu[k]) for k in on_cpu)
'''
    _no_violations(_simulated(tmp_path, code))


def test_a_resumed_self_training_step_syncs_the_host_no_more_than_an_uninterrupted_one(tmp_path):
    code = SIMULATED + f'''
import torch
from neon.config import FinetuneConfig, build_config
from neon.family import get_family
from neon.selftrain import Trainer

family = get_family("tinypix")
bundle = family.tiny(device="cuda", seed=1)
examples = family.encode(bundle, torch.randint(0, 256, (8, 8, 8, 3), dtype=torch.uint8))
cfg = build_config(FinetuneConfig, {{"lr": 1e-3, "batch": 4, "total_images": 12, "warmup_images": 0, "ema": None,
                                    "snapshot_every_images": None, "optimizer": {{}}, "loss_args": {{}}, "seed": 0}},
                   "finetune")

def syncs_in_step(trainer, step):
    before = sum(vcuda.SYNCS.values())
    trainer.step(examples, step)
    return sum(vcuda.SYNCS.values()) - before

trainer = Trainer.start(family, bundle, cfg)
trainer.step(examples, 0)
uninterrupted = syncs_in_step(trainer, 1)
trainer.snapshot("{tmp_path}/snapshot.pth", "{tmp_path}/state.pt", 2, [])
resumed = Trainer.start(family, bundle, cfg)
assert resumed.resume("{tmp_path}/state.pt")[0] == 2
after_resume = syncs_in_step(resumed, 2)
assert after_resume == uninterrupted, f"{{after_resume}} host syncs in a resumed step, {{uninterrupted}} before"
'''
    _no_violations(_simulated(tmp_path, code))


def test_the_edm_samplers_host_syncs_do_not_grow_with_its_steps(tmp_path):
    code = SIMULATED + '''
import torch
from edm.adapter import EDMFamily

family = EDMFamily()
bundle = family.tiny(device="cuda")

def syncs(num_steps):
    before = sum(vcuda.SYNCS.values())
    family.sample(bundle, [0, 1], torch.tensor([3, 4]), num_steps=num_steps)
    return sum(vcuda.SYNCS.values()) - before

few, many = syncs(3), syncs(9)
assert few == many, f"{few} host syncs with 3 steps, {many} with 9: {vcuda.SYNCS.most_common(3)}"
'''
    _no_violations(_simulated(tmp_path, code))


def _family(config: Path) -> str:
    data = yaml.safe_load(config.read_text())
    return data.get("family") or data["study"]["family"]


def _syncs_per(report: dict, stage: str, n: int, unit: str) -> str:
    """Host syncs of one stage per `unit`: scalar reads (item, bool, ...) apart from copies to the host (images
    handed back, checkpoints written)."""
    reads, copies = Counter(), 0
    for s in report["syncs"]:
        if s["stage"] != stage:
            continue
        if s["kind"].startswith(("D2H", "torch.save")):
            copies += s["count"]
        else:
            reads[f"{s['kind']} at {s['site']}"] += s["count"]
    return (f"{sum(reads.values()) / n:.1f} scalar reads and {copies / n:.1f} copies to the host per {unit} "
            f"({n} in all); most read at: {reads.most_common(2)}")


@pytest.mark.parametrize("config", SMOKE_CONFIGS)
def test_a_smoke_run_on_the_simulated_gpu_mixes_no_devices(tmp_path, config):
    out, counts = tmp_path / "run", tmp_path / "evaluations.json"
    report = _simulated(tmp_path, SMOKE_RUN, config, str(out), _family(REPO / config), str(counts))
    _no_violations(report)
    steps = last_log_entry(str(out / "finetune"))["step"]
    evaluations = json.loads(counts.read_text()).get("sample S", 0)
    assert steps > 0 and evaluations > 0
    print(f"{config}: self-training: {_syncs_per(report, 'finetune', steps, 'training step')} (snapshot writes "
          f"and the baselines' training included)")
    print(f"{config}: sampling S: {_syncs_per(report, 'sample S', evaluations, 'network evaluation')}")


def test_the_adaptive_selection_on_the_simulated_gpu_mixes_no_devices(tmp_path):
    from test_adaptive import CONFIG
    config, out, counts = tmp_path / "adaptive.yaml", tmp_path / "run", tmp_path / "evaluations.json"
    config.write_text(yaml.safe_dump(CONFIG))
    report = _simulated(tmp_path, SMOKE_RUN, str(config), str(out), CONFIG["family"], str(counts))
    _no_violations(report)
    log = json.loads((out / "sweep" / "selection.json").read_text())
    assert log["evaluations"] and log["choice"]["protocol"] == "adaptive"
    # the walk ran on the device: its images came back to the host from simulated CUDA tensors
    assert any(s["kind"].startswith("D2H") and "adaptive_sweep" in s["site"] for s in report["syncs"]) or \
        any(s["kind"].startswith("D2H") for s in report["syncs"] if s["stage"] not in ("sample S", "finetune"))
