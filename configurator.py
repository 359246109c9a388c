"""
Settings from the command line, applied to a script's globals (nanoGPT's "poor man's configurator", stricter).

    python train.py configs/tiny.py --batch_size=32 --compile=False

Each argument is either a config file (a .py file of plain assignments, executed) or --key=value, applied left to
right; `--key value` (two arguments) means the same, and dashes in a key stand for underscores (--tokenizer-out is
--tokenizer_out). A setting is any global of the calling script whose name does not start with "_" and whose value
is a bool, int, float, str, tuple, list or None. Values are Python literals (ast.literal_eval), else taken as strings;
the type must match the default's (an int is accepted for a float; a bool only from True/False).

The calling script does:
    from configurator import configure
    configure(globals(), sys.argv[1:])
A renamed setting keeps working under its old name for a while: the script lists it in a global
DEPRECATED = {"old_name": ("new_name", convert)}, and configure applies convert(old value) to the new name with a
one-line note on stderr (`note: --old_name is now --new_name=value`).
Mistakes end the program with one line naming the problem and the fix, exit code 2; the scripts' own checks of
setting values use the same fail() (train.py, sample.py, export.py, model.py's device and dtype choice).
"""

import ast
import difflib
import os
import sys

SETTING_TYPES = (bool, int, float, str, tuple, list, type(None))


def settings_of(g):
    """The names in g that count as settings."""
    return [k for k, v in g.items() if not k.startswith("_") and isinstance(v, SETTING_TYPES)]


class SettingError(SystemExit):
    """A setting no run can use: exits with code 2 (as argparse does for a bad command line); str() is the line."""

    def __init__(self, message):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


def fail(message):
    """The one way tinyllm's scripts refuse a setting: `error: message` on stderr, exit code 2."""
    line = f"error: {message}"
    print(line, file=sys.stderr)
    raise SettingError(line)


def unknown(key, known, where):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean --{close[0]}?" if close else "see --help for the list of settings"
    fail(f"unknown setting --{key}{where}; {hint}")


def checked(key, value, default, where=""):
    """value converted to the default's type, or a one-line error."""
    if default is None:  # no type to hold it to
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        fail(f"--{key}{where} must be True or False, not {value!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    if type(value) is not type(default):
        fail(f"--{key}{where} must be {type(default).__name__} like its default {default!r}, "
             f"not {type(value).__name__} {value!r}")
    return value


def parse_value(text, default):
    """A Python literal, or the text itself (a str setting always takes the text as written)."""
    if isinstance(default, str):
        try:
            value = ast.literal_eval(text)
            return value if isinstance(value, str) else text  # --out_dir='out' and --out_dir=out alike
        except (ValueError, SyntaxError):
            return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def renamed(key, value, g, where=""):
    """(new key, new value) for a deprecated setting name, with the one-line note; (key, value) otherwise."""
    if key not in g.get("DEPRECATED", {}):
        return key, value
    new, convert = g["DEPRECATED"][key]
    value = convert(value)
    print(f"note: --{key}{where} is now --{new}={value!r}", file=sys.stderr)
    return new, value


def apply_config_file(path, g, known):
    if not os.path.isfile(path):
        here = sorted(f for f in os.listdir("configs") if f.endswith(".py")) if os.path.isdir("configs") else []
        choices = f"; choose one of {', '.join('configs/' + f for f in here)}" if here else ""
        fail(f"config file {path} not found{choices}")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    scope = {k: g[k] for k in known}
    try:
        exec(compile(source, path, "exec"), scope)
    except SyntaxError as e:
        fail(f"config file {path}, line {e.lineno}: {e.msg}")
    except Exception as e:  # a config file is user code: report its error in one line
        fail(f"config file {path}: {type(e).__name__}: {e}")
    updates = {}
    for key, value in scope.items():
        if key.startswith("_") or not isinstance(value, SETTING_TYPES) or (key in known and value is g[key]):
            continue  # helpers a config file imports or defines are not settings
        key, value = renamed(key, value, g, f" (in {path})")
        if key not in known:
            unknown(key, known, f" in {path}")
        updates[key] = checked(key, value, g[key], f" (in {path})")
    g.update(updates)
    return updates


def joined(argv):
    """argv with each `--key value` pair joined into --key=value.

    A lone --key followed by an argument that is not itself an option takes it as its value, so
    `python sample.py --ckpt output/ckpt.pt` works as people type it. A --key with nothing usable after it is
    left alone, to be reported as malformed.
    """
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and len(arg) > 2 and "=" not in arg and arg != "--help" \
                and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
        else:
            out.append(arg)
            i += 1
    return out


def configure(g, argv):
    """Apply config files and --key=value overrides in argv to the settings in g; returns what changed."""
    known = settings_of(g)
    changed = {}
    for arg in joined(argv):
        if arg in ("-h", "--help"):
            print("settings (override with --key=value, or put assignments in a config file):")
            for k in known:
                print(f"  --{k}={g[k]!r}")
            sys.exit(0)
        if not arg.startswith("-"):
            changed.update(apply_config_file(arg, g, known))
            continue
        if not arg.startswith("--") or "=" not in arg:
            fail(f"malformed argument '{arg}'; use --key=value (e.g. --batch_size=32) or a config file path")
        key, text = arg[2:].split("=", 1)
        deprecated = g.get("DEPRECATED", {})
        if key not in known and key not in deprecated and key.replace("-", "_") in (*known, *deprecated):
            key = key.replace("-", "_")  # --tokenizer-out for tokenizer_out, as command-line habit has it
        if key in deprecated:
            key, value = renamed(key, parse_value(text, g[deprecated[key][0]]), g)
        elif key not in known:
            unknown(key, known, "")
        else:
            value = parse_value(text, g[key])
        g[key] = changed[key] = checked(key, value, g[key])
    return changed
