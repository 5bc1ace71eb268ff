"""toolkit.embed: layer activations of a trained ALIGNN into ``RUN_DIR/embeddings.zarr``.

A sharded stage (:mod:`toolkit.sharded`; the contract is implemented in :mod:`toolkit.embed.stage`):
``plan``, ``unit_done``, ``run_units`` / ``run_shard``, ``finalize``, ``run``, plus ``verify``.
Store layout and reading: :mod:`toolkit.embed.store`, docs/zarr.md.
"""

from toolkit.embed.extract import EmbedError
from toolkit.embed.stage import finalize, plan, run, run_shard, verify
from toolkit.embed.store import EmbedStoreError, open_embeddings

__all__ = ["EmbedError", "EmbedStoreError", "finalize", "open_embeddings", "plan", "run", "run_shard",
           "verify"]
