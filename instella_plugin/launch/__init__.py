"""Launching Instella runs: environment presets per platform (``env``), cluster profiles and layout
checks (``profile``), batch-script rendering (``jobscript``) and ``instella submit`` (``submit``)."""
from instella_plugin.launch.env import apply_env_preset, detect_platform  # noqa: F401
