"""The GPU suite: one command that measures what a GPU machine is for, ready for the first one lent.

For the study's configuration (4 ALIGNN + 4 GCN layers, hidden 256, embedding 64, 1,501 outputs) on
real structures (the study's POSCARs or the MP structures in ../shared/data), on one device:

1. **training** structures/s with the production step (``toolkit.train.loop.Trainer._train_step``:
   masked L1, clip, AdamW, one-cycle) for fp32, bf16 autocast and bf16 + ``torch.compile``, each at the
   largest batch that fits (doubling from ``--batch`` up to ``--max-batch``; an out-of-memory error ends
   the search) and at the reference batch 16; peak device memory of each;
2. **extraction** materials/s (forward of every layer under ``inference_mode``, the embed stage's work)
   at the largest batch, and its ratio to training (target >= 5x);
3. the **data-loader share**: the time to collate the batches from stored graphs and move them to the
   device (``toolkit.data.loader.collate``, what the loader workers do) as a share of the training step;
4. upstream ALIGNN's DGL-free pure model (``ALIGNNAtomWisePure``; when ``alignn`` is importable) with
   the same optimizer on the same batches at batch 16 fp32, and the ratio.

Every measurement is a median over ``--repeats`` passes after a warm-up pass. Runs on CPU at tiny sizes
(``tests/test_gpu_suite.py`` does, so the first GPU run only has to start it):

    python benchmarks/gpu_suite.py                                  # a GPU machine: the study's sizes
    python benchmarks/gpu_suite.py --device cpu --tiny              # the CPU check (seconds)

Targets (docs/performance.md): >= 1,000 training structures/s on one H200; extraction >= 5x training.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, emit, machine_info, tune_malloc


def _structures(data: Path, n: int) -> list:
    """Up to ``n`` real structures: POSCARs of a folder, else the MP JSONL records."""
    import warnings

    from pymatgen.core import Structure

    files = sorted(p for p in data.glob("POSCAR*"))[:n] if data.is_dir() else []
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in files:
            out.append(Structure.from_file(str(f)))
    if not out:
        import json

        for line in (SHARED_DATA / "mp_structures" / "mp_structures.jsonl").read_text().splitlines()[:n]:
            rec = json.loads(line)
            out.append(Structure.from_dict(rec["structure"]) if "structure" in rec else Structure.from_dict(rec))
    return out


def _items(structures: list, outputs: int, graph_cfg: Any) -> list[dict]:
    """Stored-graph items (what the dataset store hands the loader) with a random spectrum each."""
    import numpy as np

    from toolkit.data.graphs import graph_from_config

    rng = np.random.default_rng(0)
    items = []
    for i, s in enumerate(structures):
        g = graph_from_config(s, graph_cfg)
        items.append({"id": f"s{i}", "index": i, "numbers": g.numbers, "edge_src": g.edge_src, "edge_dst": g.edge_dst,
                      "edge_vec": g.edge_vec, "spectrum": (2.0 + 4.0 * rng.random(outputs)).astype(np.float32),
                      "has_spectrum": True})
    return items


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args, self.torch = args, torch
        self.dev = torch.device(args.device)
        from toolkit.config import load_config

        self.cfg = lambda prec: load_config(None, [
            f"model.alignn_layers={args.layers}", f"model.gcn_layers={args.layers}",
            f"model.hidden_features={args.hidden}", f"model.embedding_features={args.embedding}",
            f"model.output_features={args.outputs}", "train.learning_rate=0.001", "train.grad_clip=1.0",
            "train.loss=l1", "train.epochs=1000", f"train.precision={prec}", f"train.device={args.device}"])
        base = self.cfg("fp32")
        t0 = time.perf_counter()
        self.items = _items(_structures(args.data, args.structures), args.outputs, base.graph)
        print(f"{len(self.items)} real structures, graphs in {time.perf_counter() - t0:.1f} s; device {self.dev}")

    def sync(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def batches(self, size: int) -> list:
        from toolkit.data.loader import collate

        return [collate(self.items[i:i + size]).to(self.dev) for i in range(0, len(self.items), size)]

    def peak_reset(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 2**30 if self.dev.type == "cuda" else None

    def trainer(self, prec: str, compile_: bool):
        from toolkit.model import build_model
        from toolkit.train.distributed import DistEnv
        from toolkit.train.loop import Loaders, Trainer

        cfg = self.cfg(prec)
        self.torch.manual_seed(0)
        model = build_model(cfg.model, self.args.outputs)
        if compile_:
            model = self.torch.compile(model, dynamic=True)
        loaders = Loaders(train=[], val=None, test=None, steps_per_epoch=1000, set_epoch=lambda e: None,
                          sampler_state=lambda n: {}, load_sampler_state=lambda s: None)
        self._tmp = tempfile.TemporaryDirectory()
        return Trainer(cfg, model, loaders, Path(self._tmp.name), DistEnv(), self.dev, energy=None,
                       output_features=self.args.outputs)

    def time_passes(self, fn, batches: list) -> float:
        """Median seconds of one pass of ``fn`` over ``batches`` (after one warm-up pass)."""
        for b in batches:
            fn(b)
        times = []
        for _ in range(self.args.repeats):
            self.sync()
            t = time.perf_counter()
            for b in batches:
                fn(b)
            self.sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def train_rate(self, prec: str, compile_: bool, batch: int) -> dict[str, Any]:
        tr = self.trainer(prec, compile_)
        bs = self.batches(batch)
        self.peak_reset()
        sec = self.time_passes(tr._train_step, bs)
        return {"precision": prec, "compile": compile_, "batch": batch, "structures_per_s": len(self.items) / sec,
                "peak_gib": self.peak_gib()}

    def largest(self, prec: str, compile_: bool) -> dict[str, Any]:
        """Training at doubling batch sizes until out of memory or ``--max-batch``; the fastest fitting one."""
        best, tried, b = None, [], self.args.batch
        while b <= min(self.args.max_batch, len(self.items)):
            try:
                r = self.train_rate(prec, compile_, b)
            except self.torch.OutOfMemoryError:
                tried.append({"batch": b, "error": "out of memory"})
                break
            tried.append(r)
            if best is None or r["structures_per_s"] > best["structures_per_s"]:
                best = r
            b *= 2
        return {**(best or {}), "tried": tried}

    def extraction(self, batch: int) -> dict[str, Any]:
        """The embed stage's own extraction (``toolkit.embed.extract.extract``: every layer hooked and
        pooled, predictions, host-to-device copies, bf16 autocast on GPU) over CPU-collated batches."""
        from toolkit.data.loader import collate
        from toolkit.embed.extract import LoadedModel, embed_layers, extract
        from toolkit.model import build_model

        cfg = self.cfg("fp32")
        model = build_model(cfg.model, self.args.outputs).to(self.dev).eval()
        loaded = LoadedModel(model=model, path=Path("-"), sha256="", model_cfg=cfg.model,
                             output_features=self.args.outputs, device=self.dev)
        layers = embed_layers(model, None)
        bs = [collate(self.items[i:i + batch]) for i in range(0, len(self.items), batch)]
        bf16 = self.dev.type == "cuda"
        self.peak_reset()
        sec = self.time_passes(lambda b: extract(loaded, [b], layers, list(cfg.embed.pooling), False, bf16), bs)
        return {"batch": batch, "materials_per_s": len(self.items) / sec, "peak_gib": self.peak_gib(),
                "layers": len(layers), "bf16": bf16}

    def loader_share(self, batch: int) -> dict[str, Any]:
        from toolkit.data.loader import collate

        chunks = [self.items[i:i + batch] for i in range(0, len(self.items), batch)]

        def load(c):
            collate(c).to(self.dev)

        t_load = self.time_passes(load, chunks)
        tr = self.trainer("fp32", False)
        t_step = self.time_passes(tr._train_step, self.batches(batch))
        return {"batch": batch, "collate_and_copy_s": t_load, "train_pass_s": t_step,
                "share": t_load / (t_load + t_step)}

    def upstream(self, batch: int) -> dict[str, Any] | None:
        try:
            from alignn.models.alignn_atomwise_pure import ALIGNNAtomWisePure  # noqa: F401
        except ImportError:
            return None
        from alignn.torch_graph_builder import batch_torch_graph_pairs

        from toolkit.compat.upstream import upstream_graph_pairs, upstream_pure_model

        a = self.args
        structures = _structures(a.data, a.structures)
        with tempfile.TemporaryDirectory() as d:
            files = []
            for i, s in enumerate(structures):
                p = Path(d) / f"POSCAR_{i}"
                s.to(filename=str(p), fmt="poscar")
                files.append(p)
            pairs = upstream_graph_pairs(files)
        chunks = [pairs[i:i + batch] for i in range(0, len(pairs), batch)]
        ub = [tuple(x.to(self.dev) for x in batch_torch_graph_pairs(c)) + (None,) for c in chunks]
        gen = self.torch.Generator().manual_seed(0)
        ys = [(2.0 + 4.0 * self.torch.rand(len(c), a.outputs, generator=gen)).to(self.dev) for c in chunks]
        self.torch.manual_seed(0)
        up = upstream_pure_model(alignn_layers=a.layers, gcn_layers=a.layers, atom_input_features=92,
                                 edge_input_features=80, triplet_input_features=40, embedding_features=a.embedding,
                                 hidden_features=a.hidden, output_features=a.outputs).to(self.dev).train()
        opt = self.torch.optim.AdamW(up.parameters(), lr=1e-3, weight_decay=1e-5)
        pairs_by = dict(zip(map(id, ub), ys))

        def step(b):
            out = up(b)["out"]
            loss = self.torch.nn.functional.l1_loss(out.float(), pairs_by[id(b)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            self.torch.nn.utils.clip_grad_norm_(up.parameters(), 1.0)
            opt.step()

        self.peak_reset()
        sec = self.time_passes(step, ub)
        return {"batch": batch, "structures_per_s": len(pairs) / sec, "peak_gib": self.peak_gib()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "paper_structures")
    ap.add_argument("--structures", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16, help="reference batch and the start of the batch search")
    ap.add_argument("--max-batch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--embedding", type=int, default=64)
    ap.add_argument("--outputs", type=int, default=1501)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--tiny", action="store_true", help="CPU check: 12 structures, 1+1 layers, hidden 16, 31 outputs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        args.structures, args.layers, args.hidden, args.embedding, args.outputs = 12, 1, 16, 8, 31
        args.batch, args.max_batch, args.repeats = 4, 8, 1
    if args.device == "cpu" and argv is None:
        tune_malloc()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device (use --device cpu --tiny for the CPU check)")
    t_all = time.perf_counter()
    s = Suite(args)
    res: dict[str, Any] = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}}
    variants = [("fp32", False), ("bf16", False)] + ([] if args.no_compile else [("bf16", True)])
    res["train"] = {}
    for prec, comp in variants:
        key = prec + ("+compile" if comp else "")
        try:
            res["train"][key] = {"largest": s.largest(prec, comp), "at_reference_batch": s.train_rate(prec, comp, args.batch)}
        except Exception as e:  # noqa: BLE001 - a variant that cannot run is reported, the suite goes on
            res["train"][key] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(f"train {key}: {res['train'][key]}")
    fits = [v["largest"] for v in res["train"].values() if "largest" in v and v["largest"].get("batch")]
    big = max((f["batch"] for f in fits), default=args.batch)
    res["extraction"] = s.extraction(big)
    best_train = max((f["structures_per_s"] for f in fits), default=float("nan"))
    res["extraction"]["ratio_to_best_training"] = res["extraction"]["materials_per_s"] / best_train
    print(f"extraction: {res['extraction']}")
    res["loader"] = s.loader_share(args.batch)
    print(f"data loading: {res['loader']}")
    res["upstream_pure"] = s.upstream(args.batch)
    ref = res["train"].get("fp32", {}).get("at_reference_batch", {})
    if res["upstream_pure"] and ref.get("structures_per_s"):
        res["upstream_pure"]["ratio_ours_fp32"] = ref["structures_per_s"] / res["upstream_pure"]["structures_per_s"]
    print(f"upstream ALIGNNAtomWisePure: {res['upstream_pure']}")
    res["seconds"] = time.perf_counter() - t_all
    print(f"gpu_suite done in {res['seconds']:.0f} s")
    rows = [{"what": f"training structures/s, {k}, batch {v['largest'].get('batch')}", "unit": "structures/s",
             "ours": v["largest"].get("structures_per_s"), "upstream": None, "ratio": None}
            for k, v in res["train"].items() if "largest" in v]
    rows.append({"what": f"extraction materials/s, batch {res['extraction']['batch']}", "unit": "materials/s",
                 "ours": res["extraction"]["materials_per_s"], "upstream": None, "ratio": None})
    if res["upstream_pure"]:
        rows.append({"what": f"training structures/s fp32 batch {args.batch} vs upstream pure", "unit": "structures/s",
                     "ours": ref.get("structures_per_s"), "upstream": res["upstream_pure"]["structures_per_s"],
                     "ratio": res["upstream_pure"].get("ratio_ours_fp32")})
    emit("gpu_suite", rows, {k: getattr(args, k) for k in ("device", "structures", "layers", "hidden", "outputs",
                                                             "batch", "max_batch", "repeats")}, args.json)
    if args.json:  # the whole result next to the table rows
        import json

        out = json.loads(Path(args.json).read_text())
        out["details"] = res
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()
