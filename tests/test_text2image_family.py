"""The text-to-image family: tiny random SD and SDXL pipelines built here (tokenizer files written locally, no Hub),
whose images equal the pipelines' own __call__ for the same prompts and generators."""
import json

import diffusers
import numpy as np
import pytest
import safetensors.torch
import torch

from neon.errors import NeonError
from neon.family import get_family

FAMILY = get_family("text2image")
PROMPTS = [{"prompt": "a photo of a cat", "negative_prompt": "blurry"},
           {"prompt": "a red house by the sea"},
           {"prompt": "a dog on the beach", "negative_prompt": "a cat"}]
SEEDS, LABELS = [3, 7, 11, 12], [2, 0, 1, 2]
ARGS = dict(num_inference_steps=3, guidance_scale=3.0)


def write_prompts(folder) -> str:
    """PROMPTS as a JSONL prompt file in `folder` -> its path (the SD3 tests use it too)."""
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return str(path)


@pytest.fixture
def prompt_file(tmp_path):
    return write_prompts(tmp_path)


def pipelines_own(bundle, folder=None) -> torch.Tensor:
    """The pipeline's __call__ on the prompt texts, one generator per image, as output_type='pil' -> uint8."""
    if folder is None:
        from hf_text2image.adapter import _pipeline
        pipe = _pipeline(bundle)
    else:
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
    chosen = [PROMPTS[i] for i in LABELS]
    images = pipe(prompt=[p["prompt"] for p in chosen], negative_prompt=[p.get("negative_prompt", "") for p in chosen],
                  generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="pil",
                  height=bundle.resolution, width=bundle.resolution, **ARGS).images
    return torch.stack([torch.from_numpy(np.array(im)) for im in images])


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_images_equal_the_pipelines_own_call(model, prompt_file):
    bundle = FAMILY.tiny(model=model, prompts=prompt_file)
    assert bundle.num_classes == len(PROMPTS)
    ours = FAMILY.sample(bundle, SEEDS, torch.tensor(LABELS), **ARGS)
    assert ours.dtype == torch.uint8 and ours.shape == (len(SEEDS), bundle.resolution, bundle.resolution, 3)
    assert torch.equal(ours, pipelines_own(bundle))
    assert ours.float().std() > 10   # not a blank canvas


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_a_saved_folder_loads_in_diffusers_and_back_with_the_same_images(model, prompt_file, tmp_path):
    bundle = FAMILY.tiny(model=model, prompts=prompt_file, seed=1)
    FAMILY.save(bundle, str(tmp_path / "pipe"))
    again = FAMILY.load(str(tmp_path / "pipe"), prompts=prompt_file)
    for key, value in bundle.net.state_dict().items():
        assert torch.equal(value, again.net.state_dict()[key]), key
    ours = FAMILY.sample(again, SEEDS, torch.tensor(LABELS), **ARGS)
    assert torch.equal(ours, pipelines_own(again, str(tmp_path / "pipe")))
    assert torch.equal(ours, FAMILY.sample(bundle, SEEDS, torch.tensor(LABELS), **ARGS))


def test_each_prompt_is_encoded_once(prompt_file, monkeypatch):
    calls = []
    own = diffusers.StableDiffusionPipeline.encode_prompt
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "encode_prompt",
                        lambda self, *a, **k: calls.append(k.get("prompt")) or own(self, *a, **k))
    bundle = FAMILY.tiny(prompts=prompt_file)
    FAMILY.sample(bundle, SEEDS, torch.tensor(LABELS), **ARGS)
    FAMILY.sample(bundle, SEEDS, torch.tensor(LABELS), **ARGS)
    examples = FAMILY.encode(bundle, FAMILY.sample(bundle, [1, 2], torch.tensor([0, 1]), **ARGS), torch.tensor([0, 1]))
    FAMILY.loss(bundle, examples)
    assert sorted(c for c in calls if c is not None) == sorted(p["prompt"] for p in PROMPTS)   # None: __call__'s own


def test_self_training_examples_are_latents_with_their_prompts(prompt_file):
    bundle = FAMILY.tiny(prompts=prompt_file)
    images = FAMILY.sample(bundle, SEEDS, torch.tensor(LABELS), **ARGS)
    examples = FAMILY.encode(bundle, images, torch.tensor(LABELS))
    assert examples["x0"].shape == (len(SEEDS), 4, bundle.resolution // 2, bundle.resolution // 2)
    assert examples["labels"].tolist() == LABELS
    bundle.net.train().requires_grad_(True)
    loss = FAMILY.loss(bundle, examples)
    loss.backward()
    cross = [p.grad for n, p in bundle.net.named_parameters() if "attn2.to_k" in n]
    assert loss.isfinite() and cross and all(g is not None and g.abs().sum() > 0 for g in cross)


def test_a_text_model_without_prompts_is_refused_in_one_line(tmp_path):
    bundle = FAMILY.tiny()
    FAMILY.save(bundle, str(tmp_path / "pipe"))
    loaded = FAMILY.load(str(tmp_path / "pipe"))
    with pytest.raises(NeonError, match="no prompt set.*load_args.prompts") as e:
        FAMILY.sample(loaded, [0], torch.tensor([0]), **ARGS)
    assert "\n" not in str(e.value)
    with pytest.raises(NeonError, match=r"prompt labels must lie in \[0, 3\)"):
        FAMILY.sample(bundle, [0], torch.tensor([3]), **ARGS)


@pytest.mark.parametrize("name, text, message", [
    ("p.txt", "\n\n", "no prompts"),
    ("p.jsonl", '{"prompt": "a cat"}\n{"prompt": "a dog", "steps": 3}\n', r"p.jsonl:2: unknown field 'steps'"),
    ("p.jsonl", '{"prompt": "a dog", "seed": -1}\n', r"p.jsonl:1: seed must be an integer in \[0, 2\^63\)"),
    ("p.jsonl", '{"prompt": "a cat"}\nnot json\n', r"p.jsonl:2: not a JSON object"),
    ("p.jsonl", '{"negative_prompt": "x"}\n', r"p.jsonl:1: no prompt"),
    ("p.jsonl", '["a cat"]\n', r"p.jsonl:1: expected an object"),
    ("p.jsonl", '{"prompt": 3}\n', r"p.jsonl:1: prompt must be text"),
    ("p.txt", "a" * 5000 + "\n", r"p.txt:1: a prompt of 5000 characters"),
])
def test_a_bad_prompt_file_is_named_in_one_line(tmp_path, name, text, message):
    from hf_text2image.prompts import read_prompts
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(NeonError, match=message) as e:
        read_prompts(str(path))
    assert "\n" not in str(e.value)


def test_a_plain_prompt_file_is_one_prompt_per_line(tmp_path):
    from hf_text2image.prompts import Prompt, read_prompts
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(str(tmp_path / "p.txt")) == [Prompt("a cat"), Prompt("a dog")]
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(NeonError, match="not UTF-8"):
        read_prompts(str(tmp_path / "bin.txt"))


def test_a_text_encoder_missing_a_weight_is_refused(tmp_path):
    FAMILY.save(FAMILY.tiny(), str(tmp_path / "pipe"))
    weights = tmp_path / "pipe" / "text_encoder" / "model.safetensors"
    state = safetensors.torch.load_file(str(weights))
    state.pop(sorted(state)[0])
    safetensors.torch.save_file(state, str(weights))
    with pytest.raises(NeonError, match="text_encoder: the CLIPTextModel of its config.json is not the one its "
                                        "weights hold: 1 missing"):
        FAMILY.load(str(tmp_path / "pipe"))


def test_a_text_encoder_config_far_larger_than_its_weights_is_refused_before_it_is_built(tmp_path, prompt_file):
    """hidden 8192 × 64 layers asks for ~50 GB: refused from the headers, under a 6 GB address-space limit."""
    import resource
    import subprocess
    import sys
    FAMILY.save(FAMILY.tiny(prompts=prompt_file), str(tmp_path / "pipe"))
    config = tmp_path / "pipe" / "text_encoder" / "config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), hidden_size=8192, intermediate_size=32768,
                                      num_hidden_layers=64, num_attention_heads=64)))
    res = subprocess.run([sys.executable, "-m", "neon", "sample", "--family", "text2image", "--ckpt",
                          str(tmp_path / "pipe"), "--load-arg", f"prompts={prompt_file}", "--seeds", "0-1",
                          "--out", str(tmp_path / "s.npz")], capture_output=True, text=True, timeout=300,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
    assert "text_encoder: the CLIPTextModel of its config.json is not the one its weights hold" in res.stderr
    assert not (tmp_path / "s.npz").exists()


def test_an_unsupported_pipeline_or_component_class_is_refused(tmp_path):
    FAMILY.save(FAMILY.tiny(), str(tmp_path / "pipe"))
    index_path = tmp_path / "pipe" / "model_index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps(dict(index, _class_name="StableVideoDiffusionPipeline")))
    with pytest.raises(NeonError, match="not a text-to-image pipeline supported here"):
        FAMILY.load(str(tmp_path / "pipe"))
    index_path.write_text(json.dumps(dict(index, text_encoder=["transformers", "AutoModel"])))
    with pytest.raises(NeonError, match="text encoder class 'AutoModel' is not supported|AutoModel is not supported"):
        FAMILY.load(str(tmp_path / "pipe"))


def test_each_pipeline_folder_is_told_to_its_family(tmp_path):
    from neon import containers
    from neon.family import readers
    from neon.init import family_of
    FAMILY.save(FAMILY.tiny(), str(tmp_path / "sd"))
    diffusers_family = get_family("diffusers")
    diffusers_family.save(diffusers_family.tiny(), str(tmp_path / "ddpm"))
    assert family_of(str(tmp_path / "sd")) == "text2image" and family_of(str(tmp_path / "ddpm")) == "diffusers"
    with pytest.raises(NeonError, match="does not drive; it is for --family text2image"):
        containers.check_reads(str(tmp_path / "sd"), diffusers_family, readers)
    with pytest.raises(NeonError, match="does not drive; it is for --family diffusers"):
        containers.check_reads(str(tmp_path / "ddpm"), FAMILY, readers)


@pytest.mark.parametrize("model", ["sd", "sd3"])
def test_theta_s_as_a_guide_extrapolates_every_network_output(model, prompt_file):
    """Sampling θr with θs as its guide at ω equals sampling a network whose every output is (1+ω)·θr − ω·θs;
    a guide with θr's own weights changes nothing."""
    from neon.guidance import with_guide
    theta_r = FAMILY.tiny(model=model, prompts=prompt_file, seed=1)
    theta_s = FAMILY.tiny(model=model, prompts=prompt_file, seed=2).net.state_dict()
    guided = with_guide(theta_r, theta_s)
    ours = FAMILY.sample(guided, SEEDS, torch.tensor(LABELS), guide_scale=0.5, **ARGS)

    class Extrapolated(torch.nn.Module):   # the mix by hand, around the pipeline's network
        def __init__(self, r, s):
            super().__init__()
            self.r, self.s = r, s

        def forward(self, *args, **kwargs):
            a, b = self.r(*args, **kwargs), self.s(*args, **kwargs)
            return (a[0] + 0.5 * (a[0] - b[0]),)

    from hf_text2image.adapter import _pipeline
    pipe = _pipeline(theta_r)
    name = "transformer" if model == "sd3" else "unet"
    by_hand_net = Extrapolated(theta_r.net, guided.guide)
    net = theta_r.net
    by_hand_net.config, by_hand_net.dtype, by_hand_net.device = net.config, net.dtype, net.device
    object.__setattr__(pipe, name, by_hand_net)
    from hf_text2image.adapter import text_embeddings  # the same embeddings: only the mix is compared
    by_hand = pipe(**text_embeddings(theta_r, pipe, LABELS),
                   generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="np",
                   height=theta_r.resolution, width=theta_r.resolution, **ARGS).images
    ref = torch.from_numpy((by_hand * 255).round().astype("uint8"))
    assert torch.equal(ours, ref), (ours.int() - ref.int()).abs().max()
    same = with_guide(theta_r, theta_r.net.state_dict())
    assert torch.equal(FAMILY.sample(same, SEEDS, torch.tensor(LABELS), guide_scale=0.5, **ARGS),
                       FAMILY.sample(theta_r, SEEDS, torch.tensor(LABELS), **ARGS))
    assert not torch.equal(ours, FAMILY.sample(theta_r, SEEDS, torch.tensor(LABELS), **ARGS))


def test_a_tokenizer_file_that_is_no_regular_file_or_too_large_is_refused(tmp_path):
    import os
    FAMILY.save(FAMILY.tiny(), str(tmp_path / "pipe"))
    vocab = tmp_path / "pipe" / "tokenizer" / "tokenizer.json"   # as transformers' save_pretrained writes it
    vocab.unlink()
    os.mkfifo(vocab)   # reading it would block forever
    with pytest.raises(NeonError, match="tokenizer.json: is a FIFO"):
        FAMILY.load(str(tmp_path / "pipe"))
    vocab.unlink()
    with open(vocab, "wb") as f:
        f.truncate((64 << 20) + 1)   # sparse: no disk used
    with pytest.raises(NeonError, match="tokenizer.json: 67108865 bytes, more than a tokenizer file holds"):
        FAMILY.load(str(tmp_path / "pipe"))


def test_the_embedding_cache_keeps_what_fits_and_recomputes_the_rest(prompt_file, monkeypatch):
    import hf_text2image.adapter as adapter
    bundle = FAMILY.tiny(prompts=prompt_file)
    first = FAMILY.sample(bundle, SEEDS, torch.tensor(LABELS), **ARGS)
    one = sum(t.nbytes for t in bundle.info["embeddings"][0])
    monkeypatch.setattr(adapter, "CACHE_BYTES", 2 * one)   # room for two prompts' embeddings
    small = FAMILY.tiny(prompts=prompt_file)
    assert torch.equal(FAMILY.sample(small, SEEDS, torch.tensor(LABELS), **ARGS), first)
    assert list(small.info["embeddings"]) == [1, 2]   # the two used last; prompt 0 recomputed when asked again


def test_a_prompt_with_its_own_seed_is_drawn_from_it_whatever_the_runs_seed(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a photo of a cat", "seed": 1234}\n{"prompt": "a dog on the beach"}\n')
    bundle = FAMILY.tiny(prompts=str(path))
    fixed = FAMILY.sample(bundle, [5, 6, 7], torch.tensor([0, 0, 1]), **ARGS)
    assert torch.equal(fixed[0], fixed[1])                                    # prompt 0: always seed 1234
    assert torch.equal(fixed[:1], FAMILY.sample(bundle, [1234], torch.tensor([0]), **ARGS))
    (tmp_path / "plain.txt").write_text("a photo of a cat\na dog on the beach\n")   # the same prompts, no seed
    plain = FAMILY.tiny(prompts=str(tmp_path / "plain.txt"))
    assert torch.equal(fixed[2], FAMILY.sample(plain, [7], torch.tensor([1]), **ARGS)[0])   # prompt 1: the run's seed
    assert not torch.equal(fixed[0], FAMILY.sample(plain, [5], torch.tensor([0]), **ARGS)[0])
