"""Shared fixtures. Test data is read from ../shared/data (never copied into the repository);
set SPECTROLENS_SHARED_DATA to point elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPECTROLENS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared test data not found at {SHARED_DATA} (set SPECTROLENS_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def paper_batch(shared_data: Path, names: list[str]):
    """GraphBatch of study structures ``POSCAR_<name>.vasp`` through the production graph builder
    and collate (ids = names)."""
    import warnings

    from pymatgen.core import Structure

    from toolkit.data.graphs import structure_graph
    from toolkit.data.loader import collate

    items = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, n in enumerate(names):
            g = structure_graph(Structure.from_file(shared_data / "paper_structures" / f"POSCAR_{n}.vasp"))
            items.append(dict(numbers=g.numbers, edge_src=g.edge_src, edge_dst=g.edge_dst, edge_vec=g.edge_vec,
                              index=i, id=n))
    return collate(items)


def smallest_mp_jsonl(shared_data: Path, dest: Path, n: int) -> Path:
    """A JSONL file ``dest`` of the ``n`` smallest Materials Project structures (by site count, then id)."""
    import json

    lines = (shared_data / "mp_structures" / "mp_structures.jsonl").read_text().splitlines()
    objs = sorted((json.loads(x) for x in lines), key=lambda o: (len(o["structure"]["sites"]), o["material_id"]))
    dest.write_text("".join(json.dumps(o) + "\n" for o in objs[:n]))
    return dest


def untrained_checkpoint(cfg, run: Path, dest: Path) -> Path:
    """An untrained model (seed 0) for the prepared run ``run``, saved as a spectrolens checkpoint at
    ``dest`` (embed.checkpoint): for tests of the stages after training that need no learning."""
    import torch

    from toolkit.data.store import DatasetReader
    from toolkit.model import build_model
    from toolkit.train import checkpoint as ckpt

    g = len(DatasetReader(run / "dataset.zarr").energy)
    torch.manual_seed(0)
    model = build_model(cfg.model, g)
    ckpt.atomic_save({"format": ckpt.MODEL_FORMAT, "version": ckpt.VERSION, "model": model.state_dict(),
                      "config": cfg.model_dump_json(), "output_features": g, "epoch": 0, "val_mae": 1.0}, dest)
    return dest
