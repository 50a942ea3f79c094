"""bench/device_check.sh runs its CPU-runnable part: every variant of a family on tiny networks, with rows that
say how far each fast path is from eager."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_device_check_runs_every_variant_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "DEVICE_CHECK_OUT": str(tmp_path)}
    res = subprocess.run(["bash", str(REPO / "bench" / "device_check.sh"), "--device", "cpu", "--quick",
                          "--families", "var", "imm"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = json.loads((tmp_path / "device_check.json").read_text())
    variants = {(r["family"], r["variant"]) for r in rows}
    assert variants == {("var", "eager fp32"), ("var", "official precision"), ("imm", "eager fp32"),
                        ("imm", "official precision"), ("imm", "compiled fp32"), ("imm", "compiled official")}
    for r in rows:
        assert r["images_per_s"] > 0 and r["max_abs_uint8"] <= 1, r   # CPU: fp16 autocast is CUDA-only
    assert "failed: none" in (tmp_path / "device_check.log").read_text()
