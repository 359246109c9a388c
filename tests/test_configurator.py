"""configurator.py: config files and --key=value overrides, type checks, and its one-line errors."""

import subprocess
import sys
import textwrap

import pytest

from configurator import configure, settings_of


def defaults():
    return {"batch_size": 8, "learning_rate": 5e-4, "compile": True, "out_dir": "output", "betas": (0.9, 0.95),
            "wandb_run_name": None, "_private": 1, "math": sys}


def run_configure(argv, capsys):
    g = defaults()
    with pytest.raises(SystemExit) as e:
        configure(g, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err, g


def test_overrides_applied_and_typed():
    g = defaults()
    changed = configure(g, ["--batch_size=32", "--learning_rate=1", "--compile=False", "--out_dir=runs/a",
                            "--betas=(0.8, 0.99)", "--wandb_run_name=exp1"])
    assert g["batch_size"] == 32
    assert g["learning_rate"] == 1.0 and isinstance(g["learning_rate"], float)  # int accepted for float
    assert g["compile"] is False and g["out_dir"] == "runs/a" and g["betas"] == (0.8, 0.99)
    assert g["wandb_run_name"] == "exp1"
    assert set(changed) == {"batch_size", "learning_rate", "compile", "out_dir", "betas", "wandb_run_name"}


def test_str_settings_take_the_text_as_written():
    g = defaults()
    configure(g, ["--out_dir=123"])
    assert g["out_dir"] == "123"
    configure(g, ["--out_dir='quoted'"])
    assert g["out_dir"] == "quoted"


def test_config_file_then_override(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("import math\nbatch_size = 16\nlearning_rate = 3e-4 * math.sqrt(4)\n_helper = 3\n")
    g = defaults()
    configure(g, [str(cfg), "--batch_size=64"])
    assert g["batch_size"] == 64 and g["learning_rate"] == pytest.approx(6e-4)
    assert "_helper" not in g


def test_unknown_setting_suggests_the_right_one(capsys):
    err, g = run_configure(["--batchsize=3"], capsys)
    assert "unknown setting --batchsize; did you mean --batch_size?" in err
    assert g["batch_size"] == 8


def test_unknown_setting_without_close_match(capsys):
    err, _ = run_configure(["--zzz=3"], capsys)
    assert "unknown setting --zzz" in err and "--help" in err


def test_wrong_types_refused(capsys):
    err, _ = run_configure(["--batch_size=3.5"], capsys)
    assert "--batch_size must be int" in err
    err, _ = run_configure(["--compile=1"], capsys)
    assert "--compile must be True or False" in err
    err, _ = run_configure(["--batch_size=True"], capsys)
    assert "--batch_size must be int" in err
    err, _ = run_configure(["--learning_rate=fast"], capsys)
    assert "--learning_rate must be float" in err


def test_malformed_arguments(capsys):
    for arg in ["--batch_size", "-b=3", "--=3"]:
        err, _ = run_configure([arg], capsys)
        assert "malformed argument" in err or "unknown setting" in err


def test_missing_config_file(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.py").write_text("batch_size = 4\n")
    err, _ = run_configure(["configs/tnyi.py"], capsys)
    assert "config file configs/tnyi.py not found; choose one of configs/tiny.py" in err


def test_config_file_errors(capsys, tmp_path):
    bad_key = tmp_path / "bad_key.py"
    bad_key.write_text("batch_sise = 4\n")
    err, g = run_configure([str(bad_key)], capsys)
    assert "unknown setting --batch_sise in" in err and "did you mean --batch_size?" in err
    assert g["batch_size"] == 8  # nothing applied
    bad_type = tmp_path / "bad_type.py"
    bad_type.write_text("compile = 'yes'\n")
    err, _ = run_configure([str(bad_type)], capsys)
    assert "--compile (in" in err
    bad_syntax = tmp_path / "bad_syntax.py"
    bad_syntax.write_text("batch_size = = 4\n")
    err, _ = run_configure([str(bad_syntax)], capsys)
    assert "line 1" in err


def test_errors_from_a_real_script_have_no_traceback(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(__import__('os').getcwd())!r})
        from configurator import configure, settings_of
        batch_size = 8
        configure(globals(), sys.argv[1:])
        print("batch_size", batch_size)
    """))
    ok = subprocess.run([sys.executable, str(script), "--batch_size=3"], capture_output=True, text=True)
    assert ok.returncode == 0 and "batch_size 3" in ok.stdout
    bad = subprocess.run([sys.executable, str(script), "--batchsize=3"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: unknown setting --batchsize; did you mean --batch_size?"
    helped = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--batch_size=8" in helped.stdout


def test_space_separated_values_and_dashed_keys():
    g = defaults()
    changed = configure(g, ["--out_dir", "runs/b", "--batch_size", "4", "--learning_rate=1e-3", "--wandb-run-name",
                            "exp2", "--betas", "(0.7, 0.8)"])
    assert g["out_dir"] == "runs/b" and g["batch_size"] == 4 and g["learning_rate"] == 1e-3
    assert g["wandb_run_name"] == "exp2" and g["betas"] == (0.7, 0.8)
    assert set(changed) == {"out_dir", "batch_size", "learning_rate", "wandb_run_name", "betas"}
    g = defaults()
    configure(g, ["--out_dir", "-dashed"])  # a value may start with one dash
    assert g["out_dir"] == "-dashed"


def test_space_form_keeps_checks(capsys):
    err, _ = run_configure(["--batch_size", "many"], capsys)
    assert "--batch_size must be int" in err
    err, _ = run_configure(["--out_dir", "--batch_size=3"], capsys)  # an option is never taken as a value
    assert "malformed argument '--out_dir'" in err
    err, _ = run_configure(["--batch-sise", "3"], capsys)
    assert "unknown setting --batch-sise; did you mean --batch_size?" in err


def test_renamed_settings_take_their_old_names_with_a_note(tmp_path, capsys):
    g = {**defaults(), "keep_best": True, "data_source": "shakespeare",
         "DEPRECATED": {"always_save_checkpoint": ("keep_best", lambda v: not v if isinstance(v, bool) else v),
                        "dataset": ("data_source", lambda v: v)}}
    changed = configure(g, ["--always-save-checkpoint", "True", "--dataset=tinystories"])
    assert changed == {"keep_best": False, "data_source": "tinystories"} and g["keep_best"] is False
    assert capsys.readouterr().err.splitlines() == ["note: --always_save_checkpoint is now --keep_best=False",
                                                    "note: --dataset is now --data_source='tinystories'"]
    cfg = tmp_path / "old.py"
    cfg.write_text("always_save_checkpoint = False\n")
    configure(g, [str(cfg)])
    assert g["keep_best"] is True and "always_save_checkpoint" not in g
    assert capsys.readouterr().err == f"note: --always_save_checkpoint (in {cfg}) is now --keep_best=True\n"
    with pytest.raises(SystemExit):  # the new name's type still holds
        configure(g, ["--always_save_checkpoint=1"])
    assert "error: --keep_best must be True or False, not 1" in capsys.readouterr().err
    assert "DEPRECATED" not in settings_of(g)
