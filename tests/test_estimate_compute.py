"""scripts/estimate_compute.py counts what a run does: every swept snapshot, every setting's own grid."""
import subprocess
import sys
from pathlib import Path

from neon.config import load_config, snapshot_images

REPO = Path(__file__).resolve().parents[1]


def test_the_estimate_counts_the_snapshots_each_config_sweeps():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "estimate_compute.py"), "--no-simulation"],
                         capture_output=True,
                         text=True, check=True, cwd=REPO).stdout.splitlines()
    header, rows = out[0].split(), {line.split()[0]: line.split() for line in out[1:]}
    column = header.index("snapshots")
    assert len(rows) >= 8
    for row, values in rows.items():
        cfg = load_config(str(REPO / "configs" / f"{row}.yaml"))
        choice = cfg.sweep.snapshot
        expected = len(snapshot_images(cfg.finetune)) if choice == "all" else 1 if isinstance(choice, str) \
            else len(choice)
        assert int(values[column]) == expected, row
        assert float(values[-1]) > 0
