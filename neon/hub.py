"""`neon run CONFIG --push-to-hub REPO`: θneon's folder, with the run's MODEL_CARD.md as its README.md (the page
the Hub shows), uploaded to a Hugging Face Hub model repo with huggingface_hub's HfApi (create_repo with
exist_ok, then upload_folder).

Only what can be known offline is checked before the run (the repo id's form, offline mode, a base that is a
single file); whether the token may write to the repo is known only when the upload is tried, after the run, and
a refused upload leaves the finished run folder as it is: the same command pushes it again.
"""
from __future__ import annotations

import os
import shutil

from neon.checkpoint import atomic_open
from neon.errors import NeonError
from neon.pipeline_folder import MARKER

CARD = "MODEL_CARD.md"      # written by neon.model_card beside θneon
README = "README.md"        # the file a Hub repo shows as its model card
MERGED = "neon"             # θneon in a run folder: `neon` (a folder) or `neon.<ext>` (a file), as neon.run names it


def check_repo_id(repo_id: str) -> None:
    """Before the run: `repo_id` has the Hub's form ('name' or 'namespace/name') and huggingface_hub is not in
    offline mode (HF_HUB_OFFLINE), where no upload can work."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        why = str(e).splitlines()[0]
        raise NeonError(f"--push-to-hub: {repo_id!r} is not a Hub repo id such as 'you/neon-ddpm' ({why})") from None
    if constants.HF_HUB_OFFLINE:
        raise NeonError("--push-to-hub: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or run "
                        "without --push-to-hub and push the run's `neon` folder later")


def check_base_is_folder(base: str | None) -> None:
    """Before the run: a base checkpoint that is one file gives a θneon that is one file, which is not pushed."""
    if base is not None and os.path.isfile(base):
        raise NeonError(f"--push-to-hub: base {base} is a file, so θneon will be a file too; only a θneon folder "
                        "(a diffusers pipeline) is pushed")


def merged_folder(out: str) -> str:
    """θneon of the run folder `out`, which must be a folder."""
    found = sorted(n for n in os.listdir(out) if n == MERGED or n.startswith(MERGED + ".")) \
        if os.path.isdir(out) else []
    if len(found) != 1:
        raise NeonError(f"--push-to-hub: {out} holds no single θneon ({MERGED} or {MERGED}.*), found {found}")
    path = os.path.join(out, found[0])
    if not os.path.isdir(path):
        raise NeonError(f"--push-to-hub: θneon {path} is a file, not a folder; only a θneon folder (a diffusers "
                        "pipeline) is pushed")
    return path


def push_run(out: str, repo_id: str, api=None) -> str:
    """Upload θneon's folder of the finished run `out` to the model repo `repo_id`, MODEL_CARD.md as README.md
    (copied into the folder first, so the folder on disk is what the repo holds). api: an HfApi (default: a new
    one, with the login of `hf auth login` or $HF_TOKEN). Returns the folder pushed."""
    folder = merged_folder(out)
    card = os.path.join(out, CARD)
    if not os.path.isfile(card):
        raise NeonError(f"--push-to-hub: {card} not found (neon run writes it after the final evaluation)")
    with open(card, "rb") as src, atomic_open(os.path.join(folder, README), "wb") as dst:
        shutil.copyfileobj(src, dst)
    if api is None:
        from huggingface_hub import HfApi
        api = HfApi()
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                          ignore_patterns=[MARKER],   # the list of what Neon wrote there: local bookkeeping
                          commit_message=f"θneon from neon run ({os.path.basename(os.path.abspath(out))})")
    except Exception as e:  # no login, no write access, network: the run itself is done and kept
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NeonError(f"--push-to-hub: uploading {folder} to {repo_id} failed ({why}); the run folder is "
                        "complete, and the same command pushes it again") from None
    return folder
