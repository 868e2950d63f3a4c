"""The command-line tools (console scripts of setup.cfg): :mod:`.generate`."""
