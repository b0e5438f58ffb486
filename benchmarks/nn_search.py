"""Nearest-neighbour search: lethe's chunked search against one `torch.cdist` over the full matrix.

For 100k and 1M reference vectors (dimension 256, a 16x16 image's pixels) and 1,000 queries, each
method runs in its own process so that its peak memory (max RSS) is its own. The full matrix is
skipped where it would not fit in the memory given by --max-full-gib. Prints one JSON object.

    python benchmarks/nn_search.py [--sizes 100000 1000000] [--queries 1000] [--dim 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def worker(method: str, n: int, queries: int, dim: int, chunk: int) -> dict:
    from lethe.memorization.neighbors import nearest_neighbors

    torch.manual_seed(0)
    references = torch.randn(n, dim)
    q = torch.randn(queries, dim)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if method == "chunked":
        d, i = nearest_neighbors(q, references, k=2, chunk_size=chunk)
    else:
        d, i = torch.cdist(q, references).topk(2, dim=1, largest=False)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "references": n, "seconds": round(seconds, 3),
            "queries_per_s": round(queries / seconds, 1),
            "peak_rss_gib": round(peak / 2**20, 3), "search_extra_gib": round((peak - base_rss) / 2**20, 3),
            "checksum": int(i[:, 0].sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=65536)
    parser.add_argument("--max-full-gib", type=float, default=12.0)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "N"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.queries, args.dim, args.chunk)))
        return
    results = []
    for n in args.sizes:
        full_gib = args.queries * n * 4 / 2**30
        for method in ("chunked", "full_cdist"):
            if method == "full_cdist" and full_gib > args.max_full_gib:
                results.append({"method": method, "references": n, "skipped": f"needs {full_gib:.1f} GiB"})
                continue
            out = subprocess.run([sys.executable, __file__, "--worker", method, str(n), "--queries", str(args.queries),
                                  "--dim", str(args.dim), "--chunk", str(args.chunk)],
                                 capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout))
    by = {(r["method"], r["references"]): r for r in results}
    agree = {n: by[("chunked", n)].get("checksum") == by[("full_cdist", n)].get("checksum")
             for n in args.sizes if "checksum" in by[("full_cdist", n)]}
    print(json.dumps({"benchmark": "nn_search", "queries": args.queries, "dim": args.dim, "chunk": args.chunk,
                      "same_nearest": agree, "results": results}))


if __name__ == "__main__":
    main()
