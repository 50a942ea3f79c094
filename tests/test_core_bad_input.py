"""Bad input to the CLI: each mistake is one line naming what is wrong, exit status 2, and nothing on disk."""
import os

import numpy as np
import pytest
import torch
import yaml

from neon import cli
from neon.errors import NeonError
from neon.family import get_family, register
from neon.images import NpzImages
from neon.sampling import draw_labels
from neon.testing import TinyPixFamily


def _tree(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs}


def _refused(capsys, argv, root) -> str:
    """Run `neon ARGV` in this process; it must exit 2 with one line on stderr and leave `root` as it was."""
    before = _tree(root)
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2, err
    assert err and "\n" not in err and "Traceback" not in err, err
    assert _tree(root) == before, f"left behind: {_tree(root) - before}"
    return err


# ---------------------------------------------------------------------------------------------------------
# neon finetune: the training set and the sizes, refused before the output folder exists.

def _variant(base, tmp_path, kind) -> str:
    """A copy of the synthetic set made wrong in one way."""
    s = NpzImages(base["data"])
    images, labels = s.read(0, len(s)), s.labels
    c = base["bundle"].num_classes
    images, labels = {
        "label_is_num_classes": (images, np.full_like(labels, c)),
        "negative_label": (images, labels - labels.max() - 1),
        "other_channels": (images[..., :1] if images.shape[-1] == 3 else np.repeat(images, 3, -1), labels),
        "other_resolution": (images.repeat(2, axis=1).repeat(2, axis=2), labels),
        "empty": (images[:0], labels[:0]),
        "no_labels": (images, None),
        "fractional_labels": (images, labels + 0.5),
    }[kind]
    path = tmp_path / "inputs" / f"{kind}.npz"
    path.parent.mkdir(exist_ok=True)
    np.savez(path, arr_0=images, **({} if labels is None else {"arr_1": labels}))
    return str(path)


BAD_DATA = [  # (kind, what the one line must say)
    ("label_is_num_classes", "labels must lie in [0, {c})"),
    ("negative_label", "labels must lie in [0, {c})"),
    ("other_channels", "channels"),
    ("other_resolution", "the model's are {r}x{r}"),
    ("empty", "empty"),
    ("no_labels", "no labels"),
    ("fractional_labels", "labels must be integers"),
]


def _finetune(base, data, out, *extra):
    args = {"--lr": "1e-3", "--batch": "4", "--total-images": "8"}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value
    return [str(a) for a in ["finetune", "--family", "tinypix", "--ckpt", base["ckpt"], "--data", data, "--out",
                             out, *[x for kv in args.items() for x in kv]]]


@pytest.mark.parametrize("kind,message", BAD_DATA, ids=[k for k, _ in BAD_DATA])
def test_finetune_refuses_bad_training_data_before_creating_its_folder(capsys, tmp_path, base, kind, message):
    data = _variant(base, tmp_path, kind)
    err = _refused(capsys, _finetune(base, data, tmp_path / "ft"), tmp_path)
    b = base["bundle"]
    assert message.format(c=b.num_classes, r=b.resolution) in err and os.path.basename(data) in err


BAD_SIZES = [  # (flag, value, what the one line must say)
    ("--batch", "0", "finetune.batch: must be positive"),
    ("--batch", "-4", "finetune.batch: must be positive"),
    ("--total-images", "0", "finetune.total_images: must be positive"),
    ("--snapshot-every-images", "0", "finetune.snapshot_every_images: must be positive"),
    ("--warmup-images", "-1", "finetune.warmup_images"),
    ("--lr", "0", "finetune.lr: must be positive"),
    ("--ema-beta", "1.5", "finetune.ema"),
    ("--ema-halflife-images", "-3", "finetune.ema"),
    ("--encode-batch", "0", "--encode-batch: must be positive"),
]


@pytest.mark.parametrize("flag,value,message", BAD_SIZES, ids=[f"{f}={v}" for f, v, _ in BAD_SIZES])
def test_finetune_refuses_sizes_that_cannot_train(capsys, tmp_path, base, flag, value, message):
    err = _refused(capsys, _finetune(base, base["data"], tmp_path / "ft", flag, value), tmp_path)
    assert message in err


def test_finetune_refuses_bad_paths(capsys, tmp_path, base):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "no_images").mkdir()
    cases = [
        (_finetune(base, tmp_path / "missing.npz", tmp_path / "ft"), "not found"),
        (_finetune(base, tmp_path / "no_images", tmp_path / "ft"), "no .png/.jpg/.jpeg images"),
        (_finetune(base, base["data"], tmp_path / "a_file"), "exists and is not a folder"),
        (_finetune(base, base["data"], tmp_path / "a_file" / "ft"), "is not a folder"),
        (["finetune", "--family", "tinypix", "--ckpt", tmp_path, "--data", base["data"], "--out", tmp_path / "ft",
          "--lr", "1e-3", "--batch", "4", "--total-images", "8"], "is a folder, expected a checkpoint"),
    ]
    for argv, message in cases:
        assert message in _refused(capsys, argv, tmp_path)


def test_finetune_still_trains_on_good_data(capsys, tmp_path, base):
    cli.main(_finetune(base, base["data"], tmp_path / "ft"))
    assert "θs:" in capsys.readouterr().out
    assert any(p.name.startswith("snapshot-") for p in (tmp_path / "ft").iterdir())


# ---------------------------------------------------------------------------------------------------------
# Paths: a folder where a file goes, a file where a folder goes, refused before anything is written.

def _sample(base, out, *extra):
    return ["sample", "--family", "tinypix", "--ckpt", base["ckpt"], "--num-images", "4", "--out", out, *extra]


def test_sample_refuses_bad_paths_and_label_files(capsys, tmp_path, base):
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "words.txt").write_text("cat\ndog\n")
    np.save(tmp_path / "floats.npy", np.zeros(4, dtype=np.float32))
    c = base["bundle"].num_classes
    (tmp_path / "too_big.txt").write_text("\n".join(str(c) for _ in range(4)))
    cases = [
        (["sample", "--family", "tinypix", "--ckpt", tmp_path / "a_folder", "--num-images", "4", "--out",
          tmp_path / "s.npz"], "is a folder, expected a checkpoint"),
        (_sample(base, tmp_path / "a_folder"), "is a folder, expected an output"),
        (_sample(base, tmp_path / "a_file" / "s.npz"), "is not a folder"),
        (_sample(base, tmp_path / "s.npz", "--png", tmp_path / "a_file"), "exists and is not a folder"),
        (_sample(base, tmp_path / "s.npz", "--labels", tmp_path / "a_folder"), "is a folder, expected a label file"),
        (_sample(base, tmp_path / "s.npz", "--labels", tmp_path / "words.txt"), "not a label file"),
        (_sample(base, tmp_path / "s.npz", "--labels", tmp_path / "floats.npy"), "labels must be integers"),
        (_sample(base, tmp_path / "s.npz", "--labels", tmp_path / "too_big.txt"), f"labels must lie in [0, {c})"),
        (_sample(base, tmp_path / "s.npz", "--batch", "0"), "batch: must be positive"),
    ]
    for argv, message in cases:
        assert message in _refused(capsys, argv, tmp_path)


def test_outputs_of_the_metric_commands_are_refused_before_the_work(capsys, tmp_path, base):
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    evaluate = ["evaluate", "--family", "tinypix", "--ckpt", base["ckpt"], "--ref", tmp_path / "a_file",
                "--num-images", "4"]
    cases = [
        (evaluate + ["--json", tmp_path / "a_folder"], "is a folder, expected an output JSON file"),
        (evaluate + ["--json", tmp_path / "a_file" / "r.json"], "is not a folder"),
        (evaluate + ["--batch", "0"], "--batch: must be positive"),
        (["evaluate", "--family", "tinypix", "--ckpt", tmp_path / "a_folder", "--ref", tmp_path / "a_file"],
         "is a folder, expected a checkpoint"),
        (["evaluate", "--family", "tinypix", "--ckpt", base["ckpt"], "--ref", tmp_path / "a_folder"],
         "is a folder, expected reference statistics"),
        (["fid", "--images", base["data"], "--ref", tmp_path / "a_folder"], "is a folder, expected a statistics file"),
        (["fid", "--images", base["data"], "--ref", tmp_path / "a_file", "--json", tmp_path / "a_folder"],
         "is a folder, expected an output JSON file"),
        (["stats", "--images", base["data"], "--out", tmp_path / "a_folder"], "is a folder, expected an output"),
        (["stats", "--images", base["data"], "--out", tmp_path / "a_file" / "s.npz"], "is not a folder"),
    ]
    for argv, message in cases:
        assert message in _refused(capsys, [str(a) for a in argv], tmp_path)


def test_merge_into_a_folder_is_refused_before_merging_even_with_force(capsys, tmp_path, base):
    (tmp_path / "out").mkdir()
    (tmp_path / "a_file").write_text("x")
    merge = ["merge", "--ref", base["ckpt"], "--synth", base["ckpt"], "--w", "1"]
    assert "is a folder" in _refused(capsys, merge + ["--out", tmp_path / "out", "--force"], tmp_path)
    assert "is not a folder" in _refused(capsys, merge + ["--out", tmp_path / "a_file" / "m.pth"], tmp_path)
    assert "is a folder, expected a checkpoint" in _refused(
        capsys, ["merge", "--ref", tmp_path / "out", "--synth", base["ckpt"], "--w", "1", "--out", tmp_path / "m.pth"],
        tmp_path)


def _config(tmp_path, name, **changes) -> str:
    config = {"family": "tinypix", "load_args": {"num_classes": 3}, "synthetic": {"num_images": 4}}
    config.update(changes)
    path = tmp_path / "inputs" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_run_refusals_leave_no_run_folder(capsys, tmp_path):
    (tmp_path / "a_folder").mkdir()
    run = tmp_path / "runs" / "r"
    cases = [
        (["run", tmp_path / "a_folder", "--out", run], "is a folder, expected a config file"),
        (["run", _config(tmp_path, "missing_base", base=str(tmp_path / "nope.pth"), load_args={}), "--out", run],
         "nope.pth not found"),
        (["run", _config(tmp_path, "folder_base", base=str(tmp_path / "a_folder"), load_args={}), "--out", run],
         "is a folder"),
        (["run", _config(tmp_path, "missing_stats", ref_stats=str(tmp_path / "none.npz")), "--smoke", "--out", run],
         "none.npz not found"),
        (["run", _config(tmp_path, "no_training", finetune={"total_images": 0}), "--smoke", "--out", run],
         "total_images"),
    ]
    for argv, message in cases:
        assert message in _refused(capsys, argv, tmp_path)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------
# Labels: the unconditional class is a label only where the family says so.

class NullClassPix(TinyPixFamily):
    allows_null_class = True


def test_a_label_list_may_hold_the_null_class_only_where_the_family_allows_it():
    register("nullpix", NullClassPix)
    plain, null = get_family("tinypix"), get_family("nullpix")
    bundle = plain.tiny(num_classes=4, seed=0)
    c = bundle.num_classes
    seeds = list(range(c + 1))
    assert draw_labels(null, bundle, seeds, "list", list(range(c + 1))).tolist() == list(range(c + 1))
    with pytest.raises(NeonError, match=rf"\[0, {c}\)"):
        draw_labels(plain, bundle, seeds, "list", list(range(c + 1)))
    with pytest.raises(NeonError, match=rf"\[0, {c}\]"):
        draw_labels(null, bundle, seeds[:2], "list", [0, c + 1])


def test_var_declares_its_null_class_and_samples_it_from_a_label_file(capsys, tmp_path):
    var = get_family("var")
    assert var.allows_null_class and not getattr(get_family("xar"), "allows_null_class", False)
    bundle = var.tiny()
    c = bundle.num_classes
    (tmp_path / "labels.txt").write_text(f"{c}\n0\n")
    cli.main(["sample", "--family", "var", "--tiny", "--seeds", "0-1", "--labels", str(tmp_path / "labels.txt"),
              "--out", str(tmp_path / "s.npz")])
    s = NpzImages(str(tmp_path / "s.npz"))
    assert s.labels.tolist() == [c, 0] and len(s) == 2
    unconditional = var.sample(bundle, [0], torch.tensor([c]))
    assert np.array_equal(s.read(0, 1), unconditional.numpy())


# ---------------------------------------------------------------------------------------------------------
# neon fid / neon stats: counts and statistics that are no numbers, refused before any image is read.

BAD_METRIC_ARGS = [
    (["stats", "--out", "o.npz", "--batch", "0"], "--batch: must be a positive number"),
    (["stats", "--out", "o.npz", "--num-images", "-3"], "--num-images: must be a positive number"),
    (["fid", "--ref", "ref.npz", "--batch", "0"], "--batch: must be a positive number"),
    (["fid", "--ref", "ref.npz", "--prdc", "--real", "imgs.npz", "--k", "0"], "--k: must be a positive number"),
    (["fid", "--ref", "strings.npz"], "strings.npz: mu must hold real numbers"),
]


@pytest.mark.parametrize("argv,message", BAD_METRIC_ARGS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_METRIC_ARGS])
def test_metric_commands_refuse_bad_counts_and_non_numeric_statistics(tmp_path, capsys, monkeypatch, argv, message):
    import numpy as np

    from neon.images import save_images_npz
    from neon.metrics import save_stats
    monkeypatch.chdir(tmp_path)
    save_images_npz("imgs.npz", np.zeros((4, 8, 8, 3), np.uint8))
    save_stats("ref.npz", np.zeros(2048), np.eye(2048))
    np.savez("strings.npz", mu=np.array(["a", "b"]), sigma=np.eye(2))
    err = _refused(capsys, [argv[0], "--images", "imgs.npz", "--inception-weights", "fid-helper", *argv[1:]], tmp_path)
    assert message in err


BAD_DATASET_JSON = {
    "not JSON": "{labels: ",
    "labels not a list": '{"labels": {"0.png": 1}}',
    "a label that is no class": '{"labels": [["0.png", "cat"]]}',
    "a row that is no pair": '{"labels": [["0.png"]]}',
    "deeply nested": "[" * 100_000 + "]" * 100_000,
}


@pytest.mark.parametrize("kind", BAD_DATASET_JSON, ids=list(BAD_DATASET_JSON))
def test_a_malformed_dataset_json_is_one_line_naming_it(tmp_path, capsys, kind):
    from PIL import Image
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
    (folder / "dataset.json").write_text(BAD_DATASET_JSON[kind])
    err = _refused(capsys, ["stats", "--images", folder, "--out", tmp_path / "o.npz", "--inception-weights",
                            "fid-helper"], tmp_path)
    assert "dataset.json" in err
