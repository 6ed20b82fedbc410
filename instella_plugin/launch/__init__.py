"""Launching Instella runs: environment presets per platform (``env``), cluster profiles and layout
checks (``profile``), batch-script rendering (``jobscript``) and ``instella submit`` (``submit``).

Nothing is imported here: job scripts run ``python -m instella_plugin.launch.env``, which must not find
its module already imported by the package."""
