"""Nothing left behind: temporary files named after their target and cleared by the next run, kill -9 of a merge,
a second sample on a busy output refused with the first one's PID, and the last line under torchrun."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from neon import paths
from neon.checkpoint import atomic_path, atomic_save
from neon.family import get_family
from neon.images import NpzImages
from neon.merge import merge_state_dicts

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temps(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if paths.TEMP_TAG in n)


def _wait_for(predicate, what, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def test_a_temporary_file_sits_beside_its_target_named_after_it_and_this_process(tmp_path):
    target = tmp_path / "model.pth"
    with atomic_path(str(target)) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        name = os.path.basename(tmp)
        assert name.startswith(".model.pth" + paths.TEMP_TAG) and name.endswith(f"-{os.getpid()}")
        open(tmp, "wb").close()
    assert target.exists() and _temps(tmp_path) == []
    with pytest.raises(RuntimeError), atomic_path(str(tmp_path / "other.pth")) as tmp:
        raise RuntimeError("a failed write")
    assert _temps(tmp_path) == [] and not (tmp_path / "other.pth").exists()


def test_the_next_write_removes_temporary_files_of_dead_processes_only(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stem = os.path.basename(paths.temp_path(str(tmp_path / "x.pth"))).rsplit("-", 1)[0]
        dead = tmp_path / f"{stem}-{_dead_pid()}"
        alive = tmp_path / f"{stem}-{live.pid}"
        elsewhere = tmp_path / f".x.pth{paths.TEMP_TAG}some-other-host-{_dead_pid()}"
        for p in (dead, alive, elsewhere):
            p.write_bytes(b"partial")
        atomic_save({"w": torch.zeros(2)}, str(tmp_path / "y.pth"))
        assert not dead.exists(), "a dead process's leftover stays"
        assert alive.exists() and elsewhere.exists(), "a live (or unverifiable) process's file was removed"
    finally:
        live.kill()
        live.wait()


def _merge_cmd(folder, out):
    return [sys.executable, "-m", "neon", "merge", "--ref", str(folder / "r.pth"), "--synth", str(folder / "s.pth"),
            "--w", "0.5", "--out", str(out), "--force"]


def test_kill_9_during_merge_then_rerun_leaves_no_temporary_file(tmp_path):
    # Large enough that writing it takes far longer than the poll below needs to see its temporary file.
    g = torch.Generator().manual_seed(0)
    theta_r = {f"layer{i}.weight": torch.randn(512, 512, generator=g) for i in range(96)}
    theta_s = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in theta_r.items()}
    torch.save(theta_r, tmp_path / "r.pth")
    torch.save(theta_s, tmp_path / "s.pth")
    out = tmp_path / "out" / "neon.pth"
    out.parent.mkdir()
    proc = subprocess.Popen(_merge_cmd(tmp_path, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: _temps(out.parent) or proc.poll() is not None, "the merge's temporary file")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the merge finished before it could be killed"
    assert _temps(out.parent), "the kill left no temporary file: the rerun below would prove nothing"

    rerun = subprocess.run(_merge_cmd(tmp_path, out), env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _temps(out.parent) == [] and os.listdir(out.parent) == ["neon.pth"]
    merged = torch.load(out, weights_only=True)
    expected = merge_state_dicts(theta_r, theta_s, 0.5)
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)


def _sample_cmd(ckpt, out):
    return [sys.executable, "-m", "neon", "sample", "--family", "tinypix", "--ckpt", str(ckpt), "--out", str(out),
            "--seeds", "0-3999", "--batch", "8", "--labels", "random"]


def test_a_second_sample_on_a_busy_output_refuses_with_the_pid_and_a_dead_ones_lock_is_taken_over(tmp_path):
    family = get_family("tinypix")
    family.save(family.tiny(num_classes=5, seed=3), str(tmp_path / "tiny.pth"))
    out = tmp_path / "s.npz"
    lock, shards = tmp_path / "s.npz.lock", tmp_path / "s.npz.shards"
    first = subprocess.Popen(_sample_cmd(tmp_path / "tiny.pth", out), env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # A finished shard, not only the hidden temporary file of one being written (which a rerun removes).
        _wait_for(lambda: shards.is_dir() and any(not n.startswith(".") for n in os.listdir(shards))
                  or first.poll() is not None, "the first job's shards")
        first.send_signal(signal.SIGSTOP)   # busy for as long as the second needs to start, however slow it is
        assert first.poll() is None and lock.exists(), "the first job ended before the second started"
        second = subprocess.run(_sample_cmd(tmp_path / "tiny.pth", out), env=ENV, capture_output=True, text=True)
        assert second.returncode == 2 and second.stderr.strip().count("\n") == 0, second.stderr
        assert f"in use by PID {first.pid}" in second.stderr
        assert lock.read_text().split()[0] == str(first.pid), "the refused job touched the first one's lock"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not out.exists() and lock.exists()   # a killed job's lock stays behind, holding a dead PID

    third = subprocess.run(_sample_cmd(tmp_path / "tiny.pth", out), env=ENV, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "resuming" in third.stdout and len(NpzImages(str(out))) == 4000
    assert not lock.exists() and not shards.exists()


def _combined(cmd) -> tuple[int, list[str]]:
    res = subprocess.run(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return res.returncode, [line for line in res.stdout.splitlines() if line.strip()]


def test_under_torchrun_the_one_line_error_is_the_last_line(tmp_path):
    missing = tmp_path / "missing.pth"
    job = ["--standalone", "--nproc_per_node=2", "-m", "xar.calculate_fid", "--model", "auto", "--model_ckpt",
           str(missing), "--cfg", "1", "--vae_path", str(tmp_path / "vae.ckpt"), "--fid_stats", str(tmp_path / "s.npz")]
    line = f"error: {missing}: checkpoint not found"
    rc, lines = _combined([sys.executable, "-m", "neon", "torchrun", *job])
    assert rc == 2 and lines[-1] == line, lines[-12:]
    assert lines.count(line) == 1, "printed more than once"


def test_plain_torchrun_reports_the_one_line_error_of_a_gloo_job(tmp_path):
    missing = tmp_path / "missing.pth"
    rc, lines = _combined([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "neon", "sample", "--family", "tinypix", "--ckpt", str(missing), "--num-images", "4",
                           "--out", str(tmp_path / "s.npz")])
    line = f"neon sample: error: {missing}: checkpoint not found"
    assert rc != 0 and lines.count(line) == 1, lines      # printed by rank 0 only
    # The root cause (the first rank to fail) is reported with our line and our exit status. The other rank may
    # be stopped by the agent before it fails by itself (a race on a busy machine), so only its line is checked
    # where it has one.
    root = lines[next(i for i, x in enumerate(lines) if x.startswith("Root Cause")):]
    assert any(x.strip().startswith("exitcode  : 2 ") for x in root), root
    assert any(x.strip() == f"traceback : {line}" for x in root), root
    reported = [x.strip() for x in lines if x.strip().startswith("traceback :")]
    assert all(x == f"traceback : {line}" or "Signal" in x for x in reported), reported
    assert os.listdir(tmp_path) == []


def test_without_flock_the_lock_files_pid_decides(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(38, "Function not implemented")
    monkeypatch.setattr(paths.fcntl, "flock", no_flock)
    out = str(tmp_path / "s.npz")
    host = paths._HOST
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "s.npz.lock").write_text(f"{live.pid} {host}\n")
        with pytest.raises(paths.NeonError, match=f"in use by PID {live.pid}"):
            with paths.output_lock(out):
                pass
    finally:
        live.kill()
        live.wait()
    (tmp_path / "s.npz.lock").write_text(f"{_dead_pid()} {host}\n")
    with paths.output_lock(out) as lock:
        assert open(lock).read().split() == [str(os.getpid()), host]
    assert not os.path.exists(lock)
