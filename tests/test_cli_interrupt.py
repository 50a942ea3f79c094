"""Ctrl-C: one line saying how to go on, exit status 130, and the same command resumes."""
import glob
import os
import select
import signal
import subprocess
import sys
import time

from neon.errors import INTERRUPTED

MESSAGE = "interrupted; rerun the same command to resume"


def _sample(out) -> list[str]:
    return [sys.executable, "-m", "neon", "sample", "--family", "edm", "--tiny", "--num-images", "12", "--batch", "1",
            "--out", str(out)]


def _ctrl_c_after_first_shard(cmd, shards) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group and send SIGINT to the group, as a terminal's Ctrl-C does, once the
    first shard is on disk."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not glob.glob(os.path.join(shards, "shard-*.npz")):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "no shard written"
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def test_ctrl_c_while_sampling_prints_one_line_exits_130_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "s.npz"
    res = _ctrl_c_after_first_shard(_sample(out), str(out) + ".shards")
    assert res.returncode == INTERRUPTED == 130, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "KeyboardInterrupt" not in res.stderr, res.stderr[-2000:]
    lines = [line for line in res.stderr.replace("\r", "\n").splitlines() if line.strip()]
    said = [line for line in lines if not line.startswith("sampling ")]   # the progress bar's own lines aside
    assert said == [MESSAGE] and lines[-1] == MESSAGE, res.stderr[-2000:]
    assert not out.exists()

    rerun = subprocess.run(_sample(out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming:" in rerun.stdout and "of 12 images already drawn" in rerun.stdout, rerun.stdout
    assert out.exists()


def test_ctrl_c_under_neon_torchrun_ends_on_the_one_line_said_once(tmp_path):
    out = tmp_path / "s.npz"
    cmd = [sys.executable, "-m", "neon", "torchrun", "--standalone", "--nproc-per-node=2", *_sample(out)[1:]]
    res = _ctrl_c_after_first_shard(cmd, str(out) + ".shards")
    assert res.returncode == 130, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "SignalException" not in res.stderr, res.stderr[-2000:]
    lines = [line for line in res.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1] == MESSAGE and lines.count(MESSAGE) == 1, res.stderr[-2000:]


def test_ctrl_c_during_the_toy_experiment_prints_one_line_and_exits_130(tmp_path):
    """`python -m experiments.toy` (the same command as `neon toy`), its FID workers in the same process group."""
    cmd = [sys.executable, "-m", "experiments.toy", "--quick", "--threads", "2", "--out", str(tmp_path)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    err, deadline = b"", time.monotonic() + 300
    while b"FID" not in err:   # the progress bars say it has started its work
        assert p.poll() is None and time.monotonic() < deadline, err[-2000:]
        if select.select([p.stderr], [], [], 0.5)[0]:
            err += os.read(p.stderr.fileno(), 1 << 16)
    os.killpg(p.pid, signal.SIGINT)
    _, rest = p.communicate(timeout=300)
    err = (err + rest).decode()
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert err.replace("\r", "\n").splitlines()[-1] == MESSAGE
