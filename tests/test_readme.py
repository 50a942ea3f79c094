"""Every command README.md shows runs, and so does every command of the docs pages that hold its longer lists.

Commands come from the ```bash blocks and the table cells of COMMAND_PAGES; a command shown on two pages runs once.
The README itself is a front door: at most 150 lines, with the two newcomer commands, and every relative link or
image of it and of the docs pages reaches its file (and heading). Each command is run in a workspace laid out like
the repository after `bash download_models.sh` — the same file names in checkpoints/ and fid_stats/, holding each
family's tiny network and placeholder statistics — with the counts scaled down for a CPU (SCALE_DOWN, below),
the offline Inception weights, and no network. The set-up line and the test command are what .ci/run runs.
A command that matches no rule here, or fails, fails this test.
"""
import importlib.metadata
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neon.config import METHOD_KIND, config_kind
from neon.family import get_family

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
# The pages whose commands run: the README and the docs pages its per-row, protocol and study sections live in.
COMMAND_PAGES = ["README.md", "docs/reproducing.md", "docs/fashion_mnist.md"]
# The pages whose relative links and images must reach their files.
LINKED_PAGES = ["README.md", "CONTRIBUTING.md", "bench/README.md",
                *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
# The README's `source .venv/bin/activate`: the repository's .venv, or the environment these tests run in.
ACTIVATE = shlex.quote(str(REPO / ".venv" / "bin" / "activate" if (REPO / ".venv" / "bin" / "activate").is_file()
                           else Path(sys.executable).parent / "activate"))

# (pattern, replacement): the README's GPU-sized counts -> CPU-sized ones; everything else runs as written.
# Commands run as typed in a shell where the README's `source .venv/bin/activate` ran (ACTIVATE, below): `neon`,
# `torchrun` and `python` are the environment's own.
SCALE_DOWN = [
    (r"^torchrun --standalone --nproc_per_node=8 ", "torchrun --standalone --nproc_per_node=1 "),
    (r"^torchrun --nnodes=4 --nproc_per_node=8 (.*)--rdzv_endpoint=\$HEAD_NODE:29500 ",
     r"torchrun --nnodes=1 --nproc_per_node=2 \g<1>--rdzv_endpoint=localhost:FREE_PORT "),
    (r"^\.venv/bin/neon toy$", "neon toy --quick --out toy"),
    (r"^bash download_models\.sh", f"bash {shlex.quote(str(REPO / 'download_models.sh'))} --dry-run"),
    (r"--num_images \d+", "--num_images 8"),
    (r"--seeds 0-\d+", "--seeds 0-7"),
    (r"--num_steps \d+", "--num_steps 3"),
    (r"--flow_steps \d+", "--flow_steps 3"),
    (r"--arg num_steps=\d+", "--arg num_steps=3"),
    (r"--(max_)?batch_size \d+", r"--\g<1>batch_size 8"),
    (r"--batch \d+", "--batch 4"),
    (r"--total-images \d+", "--total-images 16"),
    (r"--model xar_(large|base)", "--model auto"),
    (r"--inception-weights \S+", "--inception-weights fid-helper"),
    (r"(\bneon run configs/\S+\.yaml)", r"\g<1> --smoke"),
    (r"--minutes \d+", "--minutes 0.1"),
    (r"^(neon init .*?) &&", r"\g<1> --arg num_inference_steps=4 &&"),   # the tiny pipeline's 50 DDIM steps: 4
]
FAMILIES = sorted(ep.name for ep in importlib.metadata.entry_points(group="neon.families"))
PAPER_ROWS = [c for c in sorted((REPO / "configs").glob("*.yaml")) if config_kind(str(c)) == METHOD_KIND]


def bash_commands(text: str) -> list[str]:
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def table_commands(text: str) -> list[str]:
    return re.findall(r"\| `((?:torchrun|neon|python)[^`]*)` \|", text)


def page_commands() -> list[str]:
    """Every command of COMMAND_PAGES, in page order, each once."""
    commands = []
    for page in COMMAND_PAGES:
        text = (REPO / page).read_text()
        commands += bash_commands(text) + table_commands(text)
    return list(dict.fromkeys(commands))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def scaled(command: str) -> str:
    for pattern, repl in SCALE_DOWN:
        command = re.sub(pattern, repl, command)
    command = command.replace("FREE_PORT", str(free_port()))  # other tests may run torchrun at the same time
    family = re.search(rf"-m ({'|'.join(FAMILIES)})\.calculate_fid", command)
    if family:
        command += " --inception_weights fid-helper"
        resolution = get_family(family.group(1)).tiny().resolution
        command = re.sub(r"--img_size \d+", f"--img_size {resolution}", command)
    if re.search(r"-m neon fid ", command) and "--inception-weights" not in command:
        command += " --inception-weights fid-helper"
    return command


SETUP = [c for c in bash_commands(README) if "scripts/setup.sh" in c]
TESTS = [c for c in bash_commands(README) if "pytest" in c]
RUNNABLE = [c for c in page_commands() if c not in SETUP + TESTS]


FENCED = re.compile(r"^\s*```.*?^\s*```", re.M | re.S)


def without_code(text: str) -> str:
    """A page's text without its fenced blocks and code spans (a link's `code` text leaves `[](target)`)."""
    return re.sub(r"`[^`\n]*`", "", FENCED.sub("", text))


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens, -1, -2 on repeats."""
    out: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", FENCED.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = 0
        while (f"{slug}-{n}" if n else slug) in out:
            n += 1
        out.add(f"{slug}-{n}" if n else slug)
    return out


def test_the_readme_is_a_front_door_of_at_most_150_lines():
    assert len(README.splitlines()) <= 150, "write-ups, protocols and timings belong in docs/ and bench/README.md"


def test_every_relative_link_and_image_reaches_its_file_and_heading():
    broken = []
    for page in LINKED_PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", without_code((REPO / page).read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):   # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (REPO / page).parent / path if path else REPO / page
            if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file.read_text())):
                broken.append(f"{page}: {target}")
    assert not broken, "links that reach nothing:\n" + "\n".join(broken)


def test_the_readme_shows_the_two_newcomer_commands_and_ci_runs_them():
    assert len(SETUP) == 1 and len(TESTS) == 1
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert TESTS[0] in ci, ".ci/run must run exactly the README's test command"
    *steps, main_job = [s.strip() for s in SETUP[0].split("&&")]
    assert main_job == ".venv/bin/neon toy"
    assert steps == ["bash scripts/setup.sh"] and steps[0] in ci, "the set-up is scripts/setup.sh, as .ci/run runs it"
    assert ci.index(steps[0]) < ci.index(TESTS[0])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder laid out as after download_models.sh: each installed family's tiny stand-ins under its released
    file names (and its helper files), and placeholder statistics under every config's ref_stats name."""
    from neon.config import load_config
    from neon.family import get_family
    from neon.metrics import save_stats
    root = tmp_path_factory.mktemp("readme")
    (root / "configs").symlink_to(REPO / "configs")
    ck = root / "checkpoints"
    ck.mkdir()
    for config in PAPER_ROWS:
        save_stats(str(root / load_config(str(config)).ref_stats), np.zeros(2048), np.eye(2048))
    for name in FAMILIES:
        family = get_family(name)
        for release, tiny_args in family.RELEASES.items():
            family.save(family.tiny(**tiny_args), str(ck / release))
        family.save_helpers(family.tiny(), str(ck))
    (root / "runs").mkdir()
    own_model_and_images(root)
    return root


def own_model_and_images(root: Path) -> None:
    """A user's own tiny diffusers pipeline (my_pipeline/) and a folder of their own PNGs (my_images/)."""
    from PIL import Image
    family = get_family("diffusers")
    family.save(family.tiny(resolution=8, scheduler="DDIMScheduler"), str(root / "my_pipeline"))
    (root / "my_images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(root / "my_images" / f"{i:03d}.png")


@pytest.mark.parametrize("command", RUNNABLE, ids=lambda c: c[:70])
def test_readme_command_runs(command, workspace):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_PROXY": "*"}
    res = subprocess.run(f"source {ACTIVATE} && {scaled(command)}", shell=True, cwd=workspace, env=env,
                         capture_output=True, text=True, executable="/bin/bash")
    assert res.returncode == 0, f"{scaled(command)}\n{res.stdout[-1500:]}\n{res.stderr[-3000:]}"
