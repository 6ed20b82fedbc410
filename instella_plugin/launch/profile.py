"""Cluster profiles (YAML) and the parallel-layout arithmetic checked before anything is submitted.

A profile names a Slurm partition and the shape of its nodes; ``load_profile`` accepts a bundled name
(``instella_plugin/launch/profiles/<name>.yaml``) or a path, applies ``key=value`` overrides, expands
``$VARS`` and ``~`` in paths, and raises ``ProfileError`` naming the problem and the fix.
``check_layout`` does the same for TP/PP/CP and the batch arithmetic (``training.layout.ParallelLayout``
with the node size, so TP x CP groups stay inside a node).
"""
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from instella_plugin.training.layout import LayoutError, ParallelLayout

PROFILES_DIR = Path(__file__).with_name("profiles")
REQUIRED = ("partition", "nodes", "gpus_per_node", "time_limit", "data_root", "output_root")
OPTIONAL = {
    "name": None, "description": None,
    "platform": "auto",          # rocm | nvidia | cpu | auto (detected inside the job)
    "account": None,
    "cpus_per_task": None,       # Slurm --cpus-per-task for the one task per node
    "signal_seconds": 600,       # USR1 this long before the time limit: the trainer saves and exits
    "activate": None,            # shell lines run first in every job (module load, venv, conda)
    "python": "python3",         # interpreter inside the job (after activation); null: the submitting one
    "container": None,           # {image: ..., mounts: [...]} for Slurm's pyxis (srun --container-*)
    "env": {},                   # extra environment, wins over the launch presets
    "sbatch_extra": [],          # further #SBATCH options, e.g. --exclusive, --qos=high
    "master_port": 29500,        # rendezvous port base (job id modulo 1000 is added)
    "merge_time_limit": "01:00:00",
}
TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


class ProfileError(ValueError):
    """A cluster profile or parallel layout that cannot work; the message says how to fix it."""


@dataclass
class Profile:
    path: str
    data: dict

    def __getattr__(self, key):
        try:
            return self.__dict__["data"][key]
        except KeyError:
            raise AttributeError(key) from None

    @property
    def world_size(self):
        return self.nodes * self.gpus_per_node


def bundled_profiles():
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def _coerce(value):
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def load_profile(name_or_path, overrides=()):
    """Load and validate a profile; ``overrides`` are ``key=value`` strings (YAML values)."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if not path.suffix and not path.exists():
        path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ProfileError(f"cluster profile {name_or_path!r} not found: pass a YAML path or one of "
                           f"{', '.join(bundled_profiles())}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ProfileError(f"cluster profile {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"cluster profile {path} must be a YAML mapping of keys to values")
    for item in overrides:
        if "=" not in item:
            raise ProfileError(f"--set {item!r}: expected KEY=VALUE, e.g. --set nodes=2")
        key, value = item.split("=", 1)
        data[key.strip()] = _coerce(value)
    return Profile(str(path), validate(data, str(path)))


def validate(data, where="profile"):
    missing = [k for k in REQUIRED if data.get(k) in (None, "")]
    if missing:
        raise ProfileError(f"cluster profile {where} is missing required key(s): {', '.join(missing)}. "
                           f"Every profile needs {', '.join(REQUIRED)}; see "
                           f"{PROFILES_DIR / 'mi300x-16node.yaml'} for an annotated example")
    unknown = sorted(set(data) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ProfileError(f"cluster profile {where} has unknown key(s) {', '.join(unknown)}; allowed keys: "
                           f"{', '.join(REQUIRED + tuple(OPTIONAL))}")
    out = {**{k: (v.copy() if isinstance(v, (dict, list)) else v) for k, v in OPTIONAL.items()}, **data}
    for key in ("nodes", "gpus_per_node", "signal_seconds", "master_port"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1:
            raise ProfileError(f"cluster profile {where}: {key} must be a positive integer, got {out[key]!r}")
    for key in ("time_limit", "merge_time_limit"):
        out[key] = str(out[key])
        if not TIME_RE.match(out[key]):
            raise ProfileError(f"cluster profile {where}: {key}={out[key]!r} is not a Slurm time "
                               "(minutes, MM:SS, HH:MM:SS or D-HH:MM:SS)")
    if out["platform"] not in ("auto", "rocm", "nvidia", "cpu"):
        raise ProfileError(f"cluster profile {where}: platform must be rocm, nvidia, cpu or auto, "
                           f"got {out['platform']!r}")
    if not isinstance(out["env"] or {}, dict):
        raise ProfileError(f"cluster profile {where}: env must be a mapping NAME: value")
    out["env"] = {str(k): str(v) for k, v in (out["env"] or {}).items()}
    if isinstance(out["sbatch_extra"], str):
        out["sbatch_extra"] = [out["sbatch_extra"]]
    if out["container"] is not None and not (isinstance(out["container"], dict) and out["container"].get("image")):
        raise ProfileError(f"cluster profile {where}: container must be a mapping with an image key "
                           "(and optional mounts list), or null")
    for key in ("data_root", "output_root"):
        out[key] = os.path.abspath(expand(str(out[key])))
    if out["python"] is None:
        out["python"] = sys.executable
    return out


def expand(text):
    """``${VAR:-default}``, ``$VAR``/``${VAR}`` and a leading ``~``, as a shell would expand them."""
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m.group(1)) or m.group(2), text)
    return os.path.expanduser(os.path.expandvars(text))


def Layout(nodes, gpus_per_node, tp=1, pp=1, cp=1, micro_batch_size=None, global_batch_size=None):  # noqa: N802
    """The ``ParallelLayout`` of a cluster allocation: ``nodes`` x ``gpus_per_node`` ranks."""
    return ParallelLayout(nodes * gpus_per_node, tp, pp, cp, micro_batch_size, global_batch_size,
                          gpus_per_node=gpus_per_node)


def check_layout(layout):
    """Raise ProfileError when the layout cannot run; returns the layout otherwise."""
    try:
        return layout.check()
    except LayoutError as e:
        raise ProfileError(str(e)) from None
