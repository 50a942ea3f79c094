"""What a command imports and how: heavy libraries only where they are used, imports without garbage collection,
and no collection of the whole heap at exit (neon/startup.py). Behaviours, checked in fresh interpreters where
sys.modules or the exit matter; no timings."""
import gc
import json
import subprocess
import sys
import textwrap

import pytest

from neon import cli, startup

# Libraries that cost seconds or pull in large trees (diffusers: torch._dynamo, sympy, scipy.stats) and that no
# sampler of EDM, VAR or xAR needs.
HEAVY = ("diffusers", "scipy", "matplotlib", "timm", "torch_fidelity", "huggingface_hub", "sympy", "torch._dynamo",
         "torchvision")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)


def _loaded_after(code: str) -> dict:
    """Run `code` in a fresh interpreter; -> the JSON it prints last."""
    res = _python(code)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_importing_the_cli_imports_neither_torch_nor_any_heavy_library():
    loaded = _loaded_after(f"""
        import json, sys
        import neon.cli
        print(json.dumps([m for m in ("torch", "numpy") + {HEAVY!r} if m in sys.modules]))
    """)
    assert loaded == []


def test_neon_sample_of_edm_var_and_xar_imports_no_heavy_library(tmp_path):
    loaded = _loaded_after(f"""
        import json, sys
        from neon import cli
        found = {{}}
        for family in ("edm", "var", "xar"):
            cli.main(["sample", "--family", family, "--tiny", "--num-images", "2", "--batch", "2",
                      "--out", {str(tmp_path)!r} + f"/{{family}}.npz"])
            found[family] = [m for m in {HEAVY!r} if m in sys.modules]
        print(json.dumps(found))
    """)
    assert loaded == {"edm": [], "var": [], "xar": []}
    assert all((tmp_path / f"{family}.npz").is_file() for family in loaded)


def test_the_imm_family_imports_diffusers_only_when_it_builds_its_vae():
    loaded = _loaded_after(f"""
        import json, sys
        from neon.family import get_family
        family = get_family("imm")
        before = [m for m in {HEAVY!r} if m in sys.modules]
        family.tiny("cpu")
        print(json.dumps({{"family imported": before, "vae built": "diffusers" in sys.modules}}))
    """)
    assert loaded == {"family imported": [], "vae built": True}


def test_import_attribute_imports_with_the_collector_paused_and_restores_it(tmp_path, monkeypatch):
    (tmp_path / "probe_module.py").write_text("import gc\nCOLLECTING = gc.isenabled()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert gc.isenabled()
    assert startup.import_attribute("probe_module", "COLLECTING") is False
    assert gc.isenabled()


def test_paused_gc_leaves_a_disabled_collector_disabled():
    gc.disable()
    try:
        with startup.paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_commands_module_is_imported_with_the_collector_paused_and_runs_with_it_on(tmp_path, monkeypatch):
    (tmp_path / "probe_command.py").write_text(textwrap.dedent("""
        import gc
        SEEN = {"import": gc.isenabled()}
        def add_probe_arguments(parser):
            SEEN["parser"] = gc.isenabled()
        def probe_main(args):
            SEEN["main"] = gc.isenabled()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "probe", ("probe_command", "a command that records the collector's state"))
    cli.main(["probe"])
    import probe_command
    assert probe_command.SEEN == {"import": False, "parser": False, "main": True}


@pytest.mark.parametrize("entry", ["neon.cli.main(['probe-missing'])", "neon.cli.run_as_script(lambda: None)"])
def test_an_entry_point_freezes_the_heap_at_exit_after_the_libraries_exit_handlers(entry):
    # A handler registered after the entry point started (as a library imported later registers its own) runs
    # before the freeze; one registered before it, after.
    res = _python(f"""
        import atexit, gc, sys
        import neon.cli
        atexit.register(lambda: print("last handler sees frozen objects:", gc.get_freeze_count() > 0, flush=True))
        try:
            {entry}
        except SystemExit:
            pass
        atexit.register(lambda: print("library handler sees frozen objects:", gc.get_freeze_count() > 0,
                                      flush=True))
    """)
    assert "library handler sees frozen objects: False" in res.stdout, res.stdout + res.stderr[-2000:]
    assert "last handler sees frozen objects: True" in res.stdout, res.stdout + res.stderr[-2000:]
