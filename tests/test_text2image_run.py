"""`neon run` on a text-to-image model with a prompt file and the CLIP score: every swept point and the final
evaluation record the CLIP score of its images against their prompts, and the final one is the CLIP score of
those images computed directly; the run writes θneon as a pipeline folder and as a LoRA."""
import json
import os

import numpy as np
import pytest
import torch
import yaml

from hf_text2image.tiny_clip import write_tiny_clip
from neon.errors import NeonError
from neon.family import get_family
from neon.metrics.clip_score import load_clip
from neon.run import run
from neon.sampling import draw_labels, plan_seeds

PROMPTS = ["a photo of a cat", "a red house by the sea", "a dog on the beach"]
STEPS = {"num_inference_steps": 2, "guidance_scale": 2.0}


def _config(tmp_path) -> str:
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    clip = write_tiny_clip(str(tmp_path / "clip"), PROMPTS, seed=1)   # a seed whose cosines here are positive
    cfg = {
        "family": "text2image", "base": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "load_args": {"prompts": str(tmp_path / "prompts.txt")},
        "metrics": {"weights": "fid-helper", "inception_score": False, "clip": clip},
        "synthetic": {"num_images": 6, "batch": 3, "labels": "per_class", "sampler": STEPS},
        "finetune": {"lora": {"rank": 2}, "lr": 1.0e-2, "batch": 3, "total_images": 6, "log_every_images": 3},
        "sweep": {"w": [0.0, 1.0], "num_images": 6, "batch": 3, "search": "official", "tolerance": None,
                  "sampler": STEPS},
        "final": {"num_images": 6, "seed_offset": 100, "batch": 3, "sampler": STEPS, "base_sampler": STEPS},
        # the tiny random pipeline for θr, S's statistics for the reference: a smoke run
        "smoke": {"base": None, "ref_stats": None, "load_args": {"model": "sd", "resolution": 16}},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_a_text_to_image_run_records_the_clip_score_of_every_point(tmp_path):
    doc = run(_config(tmp_path), str(tmp_path / "out"), smoke=True)
    out = tmp_path / "out"
    points = json.loads(next((out / "sweep").glob("snapshot-*[0-9].json")).read_text())
    scores = [p["clip_score"] for p in points["points"]] if "points" in points else None
    assert scores and all(0 < s <= 100 for s in scores), points   # not clamped to 0: the numbers say something
    assert list((out / "sweep").glob("snapshot-*_clip_score.png"))   # drawn against w beside FID
    final = doc["stages"]["final"]
    assert 0 <= final["neon"]["clip_score"] <= 100 and 0 <= final["base"]["clip_score"] <= 100

    # θneon's final CLIP score is that of its final images against their prompts, computed directly
    family = get_family("text2image")
    theta_neon = family.load(str(out / "neon"), prompts=str(tmp_path / "prompts.txt"))
    seeds = plan_seeds(6, seed_offset=100)
    labels = draw_labels(family, theta_neon, seeds, "random")
    images = family.sample(theta_neon, seeds, torch.as_tensor(labels), **STEPS)
    direct = load_clip(str(tmp_path / "clip")).pair_scores(images, [PROMPTS[k] for k in labels]).mean()
    assert direct > 0
    np.testing.assert_allclose(final["neon"]["clip_score"], direct, rtol=1e-6)
    assert os.path.isfile(out / "neon_lora" / "pytorch_lora_weights.safetensors")
    assert os.path.isfile(out / "neon_lora" / "neon_lora_kohya.safetensors")


def test_an_edited_prompt_file_redoes_the_run_from_s(tmp_path, capsys):
    config = _config(tmp_path)
    run(config, str(tmp_path / "out"), smoke=True)
    (tmp_path / "prompts.txt").write_text("\n".join(reversed(PROMPTS)) + "\n")   # same path, other prompts
    capsys.readouterr()
    doc = run(config, str(tmp_path / "out"), smoke=True)
    assert "sample: redone (load_args.prompts.sha256 changed" in capsys.readouterr().out
    assert doc["plan"]["sample"]["inputs"]["load_args.prompts.sha256"] is not None


def test_each_stage_draws_its_prompts_from_its_own_range(tmp_path):
    """synthetic.classes / sweep.classes / final.classes: S from prompts 0–1, the sweep from 2–3, the final
    evaluation from 4–5 of one prompt file; a range past the prompt set is refused before anything runs."""
    from neon.evaluate import evaluate_images
    from neon.sampling import class_labels
    assert class_labels(range(6), 6, "per_class", classes=[2, 4]).tolist() == [2, 3, 2, 3, 2, 3]
    assert set(class_labels(range(50), 6, "random", classes=[4, 6]).tolist()) == {4, 5}

    six = PROMPTS + ["a blue car", "a green tree", "a white boat"]
    config = yaml.safe_load(open(_config(tmp_path)))
    (tmp_path / "prompts.txt").write_text("\n".join(six) + "\n")
    config["metrics"].pop("clip")
    config["synthetic"]["classes"], config["sweep"]["classes"] = [0, 2], [2, 4]
    config["final"] |= {"classes": [4, 6], "per_class": 2}
    (tmp_path / "ranges.yaml").write_text(yaml.safe_dump(config))
    doc = run(str(tmp_path / "ranges.yaml"), str(tmp_path / "out"), smoke=True)
    assert set(np.load(tmp_path / "out" / "synthetic.npz")["arr_1"].tolist()) == {0, 1}
    assert doc["stages"]["final"]["neon"]["num_images"] == 4   # per_class 2 × the 2 prompts of final.classes

    seen = []

    class Labels:   # a metric that records the labels it is given
        def __call__(self):
            return self

        def update(self, images, seeds, labels=None):
            seen.extend(labels.tolist())

        def finish(self):
            return {"fid": 0.0}

    bundle = get_family("text2image").tiny(prompts=str(tmp_path / "prompts.txt"))
    evaluate_images(get_family("text2image"), bundle, Labels(), per_class=1, batch=4, classes=[2, 5],
                    sampler_args=STEPS)
    assert seen == [2, 3, 4]

    config["final"]["classes"] = [4, 9]
    (tmp_path / "past.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(NeonError, match=r"final.classes: \[4, 9\] reaches past the model's 6 classes"):
        run(str(tmp_path / "past.yaml"), str(tmp_path / "out2"), smoke=True)
    assert not (tmp_path / "out2" / "synthetic.npz").exists()
