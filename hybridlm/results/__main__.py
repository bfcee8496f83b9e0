"""`python -m hybridlm.results {lengthgen,sespan,failure_map} RUNS --out DIR`: the tables and figures of `make
repro-*` and `make failure-map` from the runs under RUNS (the Makefile runs this after the Hydra runs; run it again
to rebuild the outputs). Exits 1 when a job failed or a row is incomplete, after writing what there is."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hybridlm.results import failure_map, lengthgen, sespan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hybridlm.results", description=__doc__.split("\n")[0])
    p.add_argument("experiment", choices=["lengthgen", "sespan", "failure_map"])
    p.add_argument("runs", type=Path, nargs="+", help="the folder of the experiment's runs (hydra.sweep.dir / "
                   "hydra.run.dir); failure_map and sespan: several, folders or results.json files they wrote before")
    p.add_argument("--out", type=Path, required=True, help="where table.md, results.json and figure.png go")
    p.add_argument("--command", default=None, help="the command quoted in the table (default: make repro-<name>)")
    p.add_argument("--loss-bin", type=int, default=128, help="sespan: positions per point of the loss curves")
    args = p.parse_args(argv)
    command = args.command or ("make failure-map" if args.experiment == "failure_map"
                               else f"make repro-{args.experiment}")
    if args.experiment == "lengthgen" and len(args.runs) > 1:
        p.error(f"{args.experiment} reads one folder of runs, got {len(args.runs)}")
    if args.experiment == "lengthgen":
        complete = lengthgen.write(args.runs[0], args.out, command)
    elif args.experiment == "failure_map":
        complete = failure_map.write(args.runs, args.out, command)
    else:
        complete = sespan.write(args.runs, args.out, command, args.loss_bin)
    print((args.out / "table.md").read_text(), flush=True)
    print(f"hybridlm.results: wrote {args.out}/table.md, results.json and figure.png"
          + ("" if complete else "; some jobs FAILED or have no report yet (see the table)"), flush=True)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
