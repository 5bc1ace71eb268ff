"""toolkit.embed: layer activations of a trained ALIGNN into ``RUN_DIR/embeddings.zarr``.

Launcher contract (docs/architecture.md): ``plan``, ``run_shard``, ``finalize``, ``run``, ``verify``
(plus ``run_task`` = worker t of T). Store layout and reading: :mod:`toolkit.embed.store`, docs/zarr.md.
"""

from toolkit.embed.extract import EmbedError
from toolkit.embed.stage import finalize, plan, run, run_shard, run_task, verify
from toolkit.embed.store import EmbedStoreError, open_embeddings

__all__ = ["EmbedError", "EmbedStoreError", "finalize", "open_embeddings", "plan", "run", "run_shard", "run_task",
           "verify"]
