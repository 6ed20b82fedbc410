"""Launch environment presets (ROCm/MI300X, NVIDIA, CPU), chosen by the detected platform.

The presets are data (``env_presets.yaml``): each variable has a value and a one-line reason.
Precedence, highest first: ``overrides`` passed in, values already in the environment (a user's
``export`` or a cluster profile's ``env:``), the platform preset, then variables detected from this
machine's network devices. Nothing here imports torch unless it is already imported.

Python:  ``apply_env_preset(platform=None) -> {name: value}`` sets the variables and prints a table.
Shell:   ``eval "$(python -m instella_plugin.launch.env --format export)"`` (values already set win),
         ``python -m instella_plugin.launch.env --format table`` prints what a run uses.
"""
import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

PRESETS_FILE = Path(__file__).with_name("env_presets.yaml")
PLATFORMS = ("rocm", "nvidia", "cpu")


@dataclass(frozen=True)
class EnvVar:
    name: str
    value: str
    source: str  # preset | deterministic | detected | environment | override
    reason: str


def load_presets(path=PRESETS_FILE):
    with open(path) as f:
        return yaml.safe_load(f)


def detect_platform(environ=None):
    """``rocm``, ``nvidia`` or ``cpu``: $INSTELLA_PLATFORM, else an imported torch, else device files."""
    environ = os.environ if environ is None else environ
    forced = environ.get("INSTELLA_PLATFORM", "").strip().lower()
    if forced and forced != "auto":
        if forced not in PLATFORMS:
            raise ValueError(f"INSTELLA_PLATFORM={forced!r} is not one of {', '.join(PLATFORMS)} (or auto)")
        return forced
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "cuda"):
        if torch.cuda.is_available():
            return "rocm" if getattr(torch.version, "hip", None) else "nvidia"
        return "cpu"
    if os.path.exists("/dev/kfd") and os.path.isdir("/sys/class/kfd"):
        return "rocm"
    if os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0"):
        return "nvidia"
    return "cpu"


def default_route_interface(route_file="/proc/net/route"):
    """Name of the interface holding the default route, or None."""
    try:
        with open(route_file) as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) > 1 and fields[1] == "00000000":
                    return fields[0]
    except (OSError, StopIteration):
        pass
    return None


def rdma_devices(sys_dir="/sys/class/infiniband"):
    """Comma-separated RDMA device names (NCCL_IB_HCA syntax), or None when there are none."""
    try:
        names = sorted(os.listdir(sys_dir))
    except OSError:
        return None
    return ",".join(names) or None


def _detect(name, platform):
    if name in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
        return default_route_interface()
    if name == "NCCL_IB_HCA":
        return rdma_devices()
    return None


def resolve_env_preset(platform=None, environ=None, overrides=None, deterministic=False, detect=True):
    """The variables a run on ``platform`` uses, as ``EnvVar`` rows (nothing is set here)."""
    environ = os.environ if environ is None else environ
    platform = platform or detect_platform(environ)
    if platform == "auto":
        platform = detect_platform(environ)
    presets = load_presets()
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}: choose one of {', '.join(PLATFORMS)} or auto")
    rows = []
    table = [("preset", presets.get("common", {}))]
    table.append(("preset", presets[platform].get("vars", {})))
    if deterministic:
        table.append(("deterministic", presets[platform].get("deterministic") or {}))
    for source, block in table:
        for name, spec in block.items():
            rows.append(EnvVar(name, str(spec["value"]), source, spec["reason"]))
    if detect:
        for name, spec in (presets.get("detect") or {}).items():
            if platform in spec.get("platforms", PLATFORMS):
                value = _detect(name, platform)
                if value:
                    rows.append(EnvVar(name, value, "detected", spec["reason"]))
    overrides = dict(overrides or {})
    out = []
    for row in rows:
        if row.name in overrides:
            out.append(EnvVar(row.name, str(overrides.pop(row.name)), "override", row.reason))
        elif row.name in environ and environ[row.name] != row.value:
            out.append(EnvVar(row.name, environ[row.name], "environment", row.reason))
        else:
            out.append(row)
    out.extend(EnvVar(k, str(v), "override", "set by the caller") for k, v in overrides.items())
    return out


def format_table(rows, platform):
    width = max([len(f"{r.name}={r.value}") for r in rows] + [20])
    lines = [f"[instella] launch environment for platform {platform} "
             "(environment > preset; change with export NAME=value or the profile's env:)"]
    for r in rows:
        lines.append(f"[instella]   {f'{r.name}={r.value}':<{width}}  [{r.source}] {r.reason}")
    return "\n".join(lines)


def format_exports(rows):
    """Bash lines: values already set in the shell win over the preset (``${NAME-default}``)."""
    out = []
    for r in rows:
        value = re.sub(r'([\\"$`])', r"\\\1", r.value)
        if r.source == "override":
            out.append(f'export {r.name}="{value}"  # {r.reason}')
        else:
            out.append(f'export {r.name}="${{{r.name}-{value}}}"  # {r.reason}')
    return "\n".join(out)


def apply_env_preset(platform=None, environ=None, overrides=None, deterministic=False, log=print):
    """Set the preset for ``platform`` (detected when None) in ``environ`` (default ``os.environ``),
    keeping values already set; print the table with ``log`` (None: silent). Returns {name: value}."""
    environ = os.environ if environ is None else environ
    platform = platform if platform not in (None, "auto") else detect_platform(environ)
    rows = resolve_env_preset(platform, environ, overrides, deterministic)
    for r in rows:
        environ[r.name] = r.value
    if log is not None:
        log(format_table(rows, platform))
    return {r.name: r.value for r in rows}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m instella_plugin.launch.env", description=__doc__.splitlines()[0])
    p.add_argument("--platform", default="auto", choices=("auto",) + PLATFORMS)
    p.add_argument("--deterministic", action="store_true", help="add the bitwise-reproducibility variables")
    p.add_argument("--format", default="table", choices=("table", "export"))
    args = p.parse_args(argv)
    platform = detect_platform() if args.platform == "auto" else args.platform
    rows = resolve_env_preset(platform, deterministic=args.deterministic)
    print(format_table(rows, platform) if args.format == "table" else format_exports(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
