"""Files, without the model: atomic writes (a reader or a killed run sees the old file or the new
one) and what can only be a local path. Reading data, metrics and the ranking app's exports needs
these and nothing of torch (lm/checkpoint.py holds the models' directories)."""

import json
import os
from pathlib import Path


def atomic_write(path, write):
    """Call write(tmp_path), fsync it, then rename over path: a reader (or a run
    killed mid-write) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path, obj):
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2) + "\n"))


def looks_local(name):
    """Whether name can only be a path: a hub id is `name` or `org/name`, and starts with a letter or digit."""
    return name.startswith((".", "~", os.sep)) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
