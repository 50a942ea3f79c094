"""Prompt sets: what a text-to-image model is conditioned on, where a class-conditional one has labels.

A prompt file is plain text (one prompt per non-empty line) or JSON Lines (`.jsonl`: one object per line with
`prompt` and, optionally, `negative_prompt` and `seed`: a prompt with its own seed is always drawn from that seed,
whatever seed the run gives its image, as benchmark prompt sets fix one sample per prompt; use it with one image
per prompt, `per_class: 1`). Prompt i of the file is the model's "class" i: the core's label
machinery then covers the set in order (`labels: per_class`, every prefix balanced) or draws prompts from the
seeds (`labels: random`), and a label names the same prompt in S, in the sweep and in the final evaluation.
"""
from __future__ import annotations

import dataclasses
import json

from neon import paths
from neon.errors import NeonError, shown

MAX_FILE_BYTES = 64 << 20    # a million prompts of ~60 characters
MAX_PROMPTS = 1 << 20
MAX_CHARS = 4096             # far past any text encoder's context (77 tokens for CLIP)
FIELDS = ("prompt", "negative_prompt", "seed")


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    negative: str = ""       # the pipelines' negative_prompt; "" is their unconditional input
    seed: int | None = None  # the generator seed of this prompt's images; None: the run's seed of each image


def read_prompts(path: str) -> list[Prompt]:
    """The prompts of `path` (.txt or .jsonl), in file order; a bad file is one line naming the file and line."""
    raw = paths.read_input(path, "prompt file", MAX_FILE_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NeonError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    jsonl = path.endswith(".jsonl")
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        prompt = _json_prompt(path, number, line) if jsonl else Prompt(line.strip())
        if len(prompt.text) > MAX_CHARS:
            raise NeonError(f"{path}:{number}: a prompt of {len(prompt.text)} characters, at most {MAX_CHARS}")
        if len(prompts) == MAX_PROMPTS:
            raise NeonError(f"{path}: more than {MAX_PROMPTS} prompts")
        prompts.append(prompt)
    if not prompts:
        raise NeonError(f"{path}: no prompts (one per line{', as JSON objects' if jsonl else ''})")
    return prompts


def _json_prompt(path: str, number: int, line: str) -> Prompt:
    where = f"{path}:{number}"
    try:
        item = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise NeonError(f"{where}: not a JSON object ({e})") from None
    if not isinstance(item, dict):
        raise NeonError(f"{where}: expected an object with 'prompt', got {shown(item)}")
    unknown = sorted(set(item) - set(FIELDS))
    if unknown:
        raise NeonError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(FIELDS)})")
    seed = item.get("seed")
    if seed is not None and not (type(seed) is int and 0 <= seed < 2 ** 63):
        raise NeonError(f"{where}: seed must be an integer in [0, 2^63), got {shown(seed)}")
    for field in ("prompt", "negative_prompt"):
        value = item.get(field, "")
        if not isinstance(value, str) or len(value) > MAX_CHARS:
            raise NeonError(f"{where}: {field} must be text of at most {MAX_CHARS} characters, got {shown(value)}")
    if not item.get("prompt", "").strip():
        raise NeonError(f"{where}: no prompt")
    return Prompt(item["prompt"].strip(), item.get("negative_prompt", ""), seed)
