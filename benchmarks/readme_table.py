"""Regenerate the README's performance block from the benches' results files (``benchmarks/results.py``).

The block lies between the markers ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` of README.md;
everything else is left as it is. Each table of :data:`TABLES` found in ``benchmarks/results/`` becomes
a markdown table under a line saying where and when it was measured (CPU, load average, the GEMM
bound of the same run); a table not measured yet is left out with a note.

    .venv/bin/python benchmarks/readme_table.py            # rewrite README.md (make bench runs it)
    .venv/bin/python benchmarks/readme_table.py --check    # exit 1 if README.md is not up to date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# (bench, table key, caption, [(column, header, format)])
TABLES = [
    ("bench_devices", "devices", "Device effects per Euler step (`benchmarks/bench_devices.py`), ratio to the "
     "network without a device in the same run",
     [("case", "case", "{}"), ("marginal step us", "marginal step (us)", "{:.1f}"), ("ratio", "ratio", "{:.2f}")]),
    ("bench_devices", "draws", "One step's normal draws (510 x 64) in the same run, ratio to `np.exp` of as many "
     "values",
     [("draws", "draws", "{}"), ("us per step", "us per step", "{:.1f}"), ("ratio to np.exp", "ratio to np.exp",
                                                                           "{:.2f}"),
      ("ratio to the no-device step", "of the no-device step", "{:.2f}")]),
]


def _cell(value, fmt):
    return "-" if value is None else fmt.format(value)


def table(result, key, caption, columns):
    """The markdown of table ``key`` of one bench's results (a dict as ``results.py`` writes it)."""
    found = [t for t in result["tables"] if t.get("key") == key]
    if not found:
        raise KeyError(f"{result['bench']} has no table {key!r}")
    t = found[-1]  # a bench run twice in one file keeps its last table
    index = [t["columns"].index(c) for c, _, _ in columns]
    m = result["machine"]
    load = t.get("load_average") or m.get("load_average")
    bound = result.get("gemm_bound_s", {}).get("float64")
    where = (f"{result['started'][:10]}, {m['cpu']} ({m['logical_cores']} logical cores), load average "
             f"{load[0]:.2f}" if load else f"{result['started'][:10]}, {m['cpu']}")
    if bound is not None:
        where += f"; GEMM bound of the step (float64) {1e6 * bound:.1f} us"
    lines = [f"{caption} ({where}):", "", "| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in t["rows"]:
        lines.append("| " + " | ".join(_cell(row[i], fmt) for i, (_, _, fmt) in zip(index, columns)) + " |")
    return "\n".join(lines)


def block(results):
    """The README block (without markers) from {bench: results dict}."""
    parts = []
    for bench, key, caption, columns in TABLES:
        if bench in results and any(t.get("key") == key for t in results[bench]["tables"]):
            parts.append(table(results[bench], key, caption, columns))
        else:
            parts.append(f"{caption}: not measured yet (`make bench`).")
    return "\n\n".join(parts)


def replace_block(text, new):
    """``text`` with the part between the markers replaced by ``new``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"the README needs one {BEGIN} followed by one {END}")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{new}\n{END}{tail}"


def load(directory):
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--check", action="store_true", help="exit 1 if the README's block is not up to date")
    args = ap.parse_args(argv)
    readme = Path(args.readme)
    text = readme.read_text()
    new = replace_block(text, block(load(args.results)))
    if args.check:
        if new != text:
            sys.exit(f"{readme}: the performance block differs from {args.results}; run {sys.argv[0]}")
        return
    if new != text:
        readme.write_text(new)
        print(f"{readme}: performance block rewritten")


if __name__ == "__main__":
    main()
