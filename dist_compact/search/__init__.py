"""Pattern search.

* Offline (Compact Attention): :mod:`.capture` records block-mass statistics from a dense run,
  :mod:`.offline` searches per-(layer, head) window configs, :mod:`.config_file` saves/loads them,
  :mod:`.quality` reports recall and density; CLI: ``dist-compact-search``.
* Online (AdaSpa): :mod:`.online` selects blocks from the block mass at run time.
"""

from .capture import CaptureAttention, MassStore
from .config_file import load_config, save_config
from .offline import SearchSettings, search_store, search_stores
from .quality import evaluate

__all__ = [
    "CaptureAttention",
    "MassStore",
    "SearchSettings",
    "search_store",
    "search_stores",
    "save_config",
    "load_config",
    "evaluate",
]
