"""scripts/estimate_compute.py counts what a run does: every swept snapshot, every setting's own grid."""
import importlib.util
import subprocess
import sys
from pathlib import Path

from neon.config import load_config, snapshot_images

REPO = Path(__file__).resolve().parents[1]


def test_the_estimate_counts_the_snapshots_each_config_sweeps():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "estimate_compute.py"), "--no-simulation"],
                         capture_output=True,
                         text=True, check=True, cwd=REPO).stdout.splitlines()
    table = out[:out.index("")]            # the compute table; the memory table follows a blank line
    header, rows = table[0].split(), {line.split()[0]: line.split() for line in table[1:]}
    column = header.index("snapshots")
    assert len(rows) >= 8
    for row, values in rows.items():
        cfg = load_config(str(REPO / "configs" / f"{row}.yaml"))
        choice = cfg.sweep.snapshot
        expected = len(snapshot_images(cfg.finetune)) if choice == "all" else 1 if isinstance(choice, str) \
            else len(choice)
        assert int(values[column]) == expected, row
        assert float(values[-1]) > 0



def _script():
    spec = importlib.util.spec_from_file_location("estimate_compute", REPO / "scripts" / "estimate_compute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_memory_model_adds_states_and_each_gpus_share_of_the_activations():
    est = _script()
    for row in ("edm_cifar10_cond", "var_d16_256"):
        cfg = load_config(str(REPO / "configs" / f"{row}.yaml"))
        one, eight = est.memory(row, cfg, 1), est.memory(row, cfg, 8)
        assert one["states"] == eight["states"] and one["per_image"] == eight["per_image"] > 0
        assert one["images"] == cfg.finetune.batch == 8 * eight["images"]
        assert eight["total"] == eight["states"] + eight["images"] * eight["per_image"]
        # 16 bytes per parameter for weights, gradients and Adam at the least
        assert one["states"] >= 16 * one["params"]


def test_micro_batches_are_the_fewest_that_fit_and_none_when_the_states_do_not():
    est = _script()
    m = dict(states=10.0, per_image=1.0, images=8.0)
    assert est.micro_batches(m, 18.0) == 1
    assert est.micro_batches(m, 14.0) == 2        # 4 images per micro-batch
    assert est.micro_batches(m, 11.0) == 8
    assert est.micro_batches(m, 10.5) is None
