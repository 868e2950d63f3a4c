"""The command-line tools, installed as console scripts (setup.cfg): ``dist-compact-generate``
(:mod:`.generate`; ``generate.py`` at the repository root runs the same), ``dist-compact-search``
(:mod:`.search`), ``dist-compact-train`` (:mod:`.train`); ``dist-compact-launch`` is
:mod:`launchers.launch`, installed beside the package."""
