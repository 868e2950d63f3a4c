"""Pattern search: offline Compact config search (offline.py, capture.py) and AdaSpa online search (online.py)."""
