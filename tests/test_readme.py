"""Every command in README.md must work as written: each is checked against the script it runs.

.ci/run executes the quick start itself (with fewer iterations) and the test command; here every other command is
parsed by the very code that would run it, so a renamed setting, option, config or file breaks this test.
"""

import os
import re
import shlex

import pytest

import export
import preprocess
import sample
import train
from configurator import configure, settings_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line:
                commands.extend(part.strip() for part in line.split("&&"))
    return commands


def check_settings(module, args):
    g = {k: getattr(module, k) for k in settings_of(vars(module))}
    configure(g, args)  # exits (code 2) on an unknown setting, a wrong type or a missing config file
    return g


def check(command):
    words = shlex.split(command)
    if words[:3] == ["python", "-m", "venv"] or words[0] == ".":
        return
    if words[:2] == ["pip", "install"]:
        assert words[2] == "-r" and os.path.isfile(os.path.join(ROOT, words[3])), command
        return
    if words[:3] == ["python", "-m", "pytest"]:
        return
    if words[0] == "torchrun":
        script = next(i for i, w in enumerate(words) if w.endswith(".py"))
        assert words[script] == "train.py"
        g = check_settings(train, words[script + 1:])
        nproc = int(next(w.split("=")[1] for w in words if w.startswith("--nproc_per_node=")))
        assert g["gradient_accumulation_steps"] % nproc == 0, command
        return
    assert words[0] == "python", f"README command not covered by this test: {command}"
    script, args = words[1], words[2:]
    if script == "train.py":
        check_settings(train, args)
    elif script == "sample.py":
        check_settings(sample, args)
    elif script == "export.py":
        check_settings(export, args)
    elif script == "bench.py":
        assert len(args) <= 1 and args[:1] in ([], ["all"], ["train"], ["sample"]), command
    elif script == "preprocess.py":
        preprocess.build_parser().parse_args(args)  # exits on an unknown verb or option
    else:
        raise AssertionError(f"README runs an unknown script: {command}")


def test_readme_has_the_quick_start_and_test_commands():
    commands = readme_commands()
    assert "python train.py configs/tiny.py" in commands
    assert "python sample.py --ckpt output/ckpt.pt" in commands
    assert "python -m pytest -q" in commands and "pip install -r requirements-dev.txt" in commands
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "readme_command quickstart" in ci and "readme_command tests" in ci


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_is_valid(command, monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths are relative to the repository root, as in the README
    check(command)
