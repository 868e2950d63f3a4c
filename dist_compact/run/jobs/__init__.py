"""The jobs of :mod:`dist_compact.run.runner`, one per ``model.kind``: :mod:`.embedded`, :mod:`.diffusers`,
:mod:`.random_weights`."""
