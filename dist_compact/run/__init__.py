"""A generation run: its typed config (:mod:`.config`) and the YAML loader (:mod:`.loader`)."""
