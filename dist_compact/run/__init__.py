"""A generation run: its typed config (:mod:`.config`), the YAML loader (:mod:`.loader`), the run skeleton
(:mod:`.runner`, typed :class:`~.runner.RunOutput`), the sampler (:mod:`.sampler`), the run folder and
report (:mod:`.report`), and the jobs, one per model kind (:mod:`.jobs`, picked by
:func:`.generation.run_generation`)."""
