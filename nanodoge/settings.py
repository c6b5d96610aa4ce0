"""
The scripts' entry point and settings: a user error is one line, not a traceback; defaults, then a Python
config file, then --key=value, where an unknown key or a value of the wrong type is an error.
"""
import os
import sys
import ast
import difflib
from types import SimpleNamespace

# -----------------------------------------------------------------------------
# errors and the entry point

def run(main):
    """Run a script's main(); a user error (ValueError, FileNotFoundError) is one line, not a traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

# -----------------------------------------------------------------------------
# config: nanoGPT's recipe (defaults, then a Python config file, then --key=value), except that a key
# the script does not know or a value of the wrong type is an error instead of a silent new global

def load_config(defaults, argv=None):
    argv = sys.argv[1:] if argv is None else argv
    config = dict(defaults)
    argv = list(argv)
    while argv:
        arg = argv.pop(0)
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep and key in defaults:  # --flag sets a boolean; --key value is --key=value
                if isinstance(defaults[key], bool):
                    text = "True"
                elif argv:
                    text = argv.pop(0)
                else:
                    raise ValueError(f"{arg}: give it a value, --{key}=VALUE")
            # a text setting keeps its text as typed (--prompt=12 is "12", not the number 12)
            value = text if isinstance(defaults.get(key), str) else _parse_value(text)
            _set_config(config, defaults, key, value, arg)
        else:
            if not os.path.isfile(arg):
                raise FileNotFoundError(f"config file {arg} does not exist")
            namespace = {}
            exec(compile(open(arg).read(), arg, "exec"), namespace)
            for key, value in namespace.items():
                if not key.startswith("_") and not callable(value) and type(value).__name__ != "module":
                    _set_config(config, defaults, key, value, arg)
    return SimpleNamespace(**config)

def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as --init_from=resume

def _set_config(config, defaults, key, value, source):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"{source}: unknown config key '{key}'{hint}")
    default = defaults[key]
    if default is not None and value is not None:
        if isinstance(default, bool) or isinstance(value, bool):
            ok = isinstance(default, bool) and isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float))
            value = float(value) if ok else value
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ValueError(f"{source}: {key} must be {type(default).__name__}, got {value!r}")
    config[key] = value

def config_file(argv=None):
    """The config file named on a command line (the last one), or None."""
    argv = sys.argv[1:] if argv is None else argv
    files = [arg for arg in argv if not arg.startswith("--") and arg.endswith(".py")]
    return files[-1] if files else None

def require_prepared(data_dir, argv=None, offline_dir=None):
    """A one-line error, naming the command that makes it, when data_dir holds no prepared data: the command
    is `python prepare_data.py <the config file>` (which prepares what that config trains on), and the offline
    default offline_dir is named too when it is another directory."""
    if os.path.exists(os.path.join(data_dir, "meta.json")):
        return
    config = config_file(argv)
    command = f"python prepare_data.py {config}" if config else "python prepare_data.py"
    if not config and data_dir != offline_dir:
        command += f" --out_dir={os.path.dirname(data_dir) or '.'} (with the settings that make {data_dir})"
    offline = "" if offline_dir in (None, data_dir) else \
        f", or offline: python prepare_data.py, then --data_dir={offline_dir}"
    raise FileNotFoundError(f"{data_dir} holds no prepared data: run {command}{offline}")
