"""Small hostile inputs stay small: a YAML of aliases, deep nesting, huge counts and control characters are each
refused in one short, escaped line, under a memory limit the test sets (the config reader states its bounds:
neon.config.MAX_CONFIG_VALUES, MAX_REPEATS; neon.sampling.MAX_SEEDS; neon.errors.MAX_LINE)."""
import resource
import subprocess
import sys

import pytest

from neon.errors import MAX_LINE, one_line

LIMIT = 6 << 30   # address space of the neon process (torch's import alone maps ~4 GB): far below what the
                  # inputs below would take expanded (the aliases: 9**10 strings, tens of GB)

LAUGHS = "a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
    f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n" for i in range(9)) + "family: *j\n"


def _neon(*argv, cwd) -> subprocess.CompletedProcess:
    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))
    return subprocess.run([sys.executable, "-m", "neon", *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                          preexec_fn=limited, timeout=300)


CASES = {   # name -> (config text, what the one line says)
    "billion laughs": (LAUGHS, "values once its YAML aliases are expanded"),
    "billion laughs in smoke": ("family: tinypix\nsynthetic: {num_images: 4}\n" + LAUGHS.replace("family: *j", "")
                                + "smoke: *j\n", "values once its YAML aliases are expanded"),
    "deep nesting": ("family: tinypix\nsmoke: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    "huge repeats": ("family: tinypix\nsynthetic: {num_images: 4}\nfinal: {repeats: 1000000000}\n",
                     "final.repeats: at most 1000 (each is a full final evaluation), got 1000000000"),
    "a newline and escape codes in a key": ('family: tinypix\nsynthetic: {num_images: 4, "x\\nforged\\u001b[31m": 1}\n',
                                            "synthetic.x\\nforged\\x1b[31m: unknown field"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_small_hostile_config_is_refused_in_one_short_line_within_the_memory_bound(tmp_path, case):
    text, expected = CASES[case]
    (tmp_path / "c.yaml").write_text(text)
    assert len(text) < 12_000
    res = _neon("run", "c.yaml", "--smoke", "--out", "run", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.count("\n") == 1 and len(res.stderr) <= MAX_LINE + 1, res.stderr[:600]
    assert expected in res.stderr and "\x1b" not in res.stderr
    assert not (tmp_path / "run").exists()


def test_a_huge_seed_range_is_refused_before_it_is_listed(tmp_path):
    res = _neon("sample", "--family", "tinypix", "--tiny", "--seeds", "0-20000000000", "--out", "s.npz", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
    assert "more than 100000000 seeds" in res.stderr


def test_one_line_escapes_control_characters_and_bounds_the_length():
    assert one_line("a\nb\x1b[31mc") == "a\\nb\\x1b[31mc"
    long = one_line("x" * 100_000)
    assert len(long) == MAX_LINE and long.endswith("...")
