"""Derived indexes beside the lake, for long-running readers (the read API, the dashboard): the task-tree index
with its row copies (``tree_index``) and the reach copies a blast radius reads (``reach_copies``), both written
through ``copies``. Derived data: delete ``<data-dir>/index/`` and they are rebuilt from the lake."""
