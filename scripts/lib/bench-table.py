#!/usr/bin/env python3
"""Prints scripts/bench.sh's one table from the `@row` lines its steps printed.

    bench-table.py SPEC STATUS LOG...

SPEC    one expected row a line, `id|step|name`, in table order (the name is shown when the row
        was not measured).
STATUS  one step a line, `step<TAB>exit code or "skipped"<TAB>seconds<TAB>reason<TAB>log`.
LOG     the steps' output; every line `@row<TAB>id<TAB>name<TAB>ours_us<TAB>base_us<TAB>ratio<TAB>target`
        is a measured row (the last one of an id wins). `base_us` is `-` with no baseline; `ratio`
        is `ours/base`, `base/ours` (row 5: how many times faster we are than the reference) or
        `-`; `target` starts with `<=` or `>=` and a number, or is `-`.

Rows in the logs that SPEC does not list are appended, so that nothing a source measures
disappears. Exits 1 when an expected row was not measured or a step failed, 0 otherwise.
"""

import re
import sys


def number(text):
    try:
        return float(text)
    except ValueError:
        return None


def read_rows(paths):
    rows = {}
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as log:
                for line in log:
                    fields = line.rstrip("\n").split("\t")
                    if fields[0] != "@row" or len(fields) < 7:
                        continue
                    _, row_id, name, ours, base, ratio, target = fields[:7]
                    rows[row_id] = {
                        "name": name,
                        "ours": number(ours),
                        "base": number(base),
                        "ratio_kind": ratio,
                        "target": target,
                    }
        except OSError:
            pass
    return rows


def ratio_of(row):
    ours, base, kind = row["ours"], row["base"], row["ratio_kind"]
    if ours is None or base is None or not ours or not base:
        return None
    if kind == "ours/base":
        return ours / base
    if kind == "base/ours":
        return base / ours
    return None


def verdict(ratio, target):
    match = re.match(r"\s*(<=|>=|≤|≥)\s*([0-9.]+)", target)
    if ratio is None or not match:
        return "—"
    limit = float(match.group(2))
    met = ratio <= limit if match.group(1) in ("<=", "≤") else ratio >= limit
    return "met" if met else "NOT met"


def fmt(value, digits=2):
    return "—" if value is None else f"{value:.{digits}f}"


def main():
    spec_path, status_path, logs = sys.argv[1], sys.argv[2], sys.argv[3:]
    spec = []
    with open(spec_path, encoding="utf-8") as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                row_id, step, name = line.rstrip("\n").split("|", 2)
                spec.append((row_id, step, name))
    status = {}
    with open(status_path, encoding="utf-8") as f:
        for line in f:
            step, code, seconds, reason, log = line.rstrip("\n").split("\t")
            status[step] = {"code": code, "seconds": seconds, "reason": reason, "log": log}
    rows = read_rows(logs)

    table = []  # (name, ours, base, ratio, target, met) or (name, "not measured (...)")
    missing = 0
    listed = set()
    for row_id, step, default_name in spec:
        listed.add(row_id)
        row = rows.get(row_id)
        if row is None:
            missing += 1
            st = status.get(step)
            if st is None:
                reason = f"step {step} did not run"
            elif st["code"] == "skipped":
                reason = f"step {step} skipped"
            elif st["code"] != "0":
                reason = f"{step}: {st['reason']}"
            else:
                reason = f"{step} printed no @row {row_id}"
            table.append((default_name, f"not measured ({reason})"))
            continue
        table.append(row_line(row))
    for row_id, row in rows.items():
        if row_id not in listed:
            table.append(row_line(row))

    headers = ("row", "ours µs/event", "baseline µs/event", "ratio", "target", "met?")
    full = [r for r in table if len(r) == 6]
    widths = [max([len(headers[i])] + [len(str(r[i])) for r in full]) for i in range(6)]
    widths[0] = max([widths[0]] + [len(r[0]) for r in table])

    def render(cells):
        out = [cells[0].ljust(widths[0])]
        out += [str(c).rjust(widths[i]) for i, c in enumerate(cells[1:4], 1)]
        out += [str(c).ljust(widths[i]) for i, c in enumerate(cells[4:6], 4)]
        return "  ".join(out).rstrip()

    print()
    print("=== benchmark table (medians per event, one run) ===")
    print(render(headers))
    print(render(tuple("-" * w for w in widths)))
    for r in table:
        print(render(r) if len(r) == 6 else f"{r[0].ljust(widths[0])}  {r[1]}")
    print()
    print("ratio = ours ÷ baseline (lower is better), except row 5: baseline = matrix-sdk-crypto 0.18 and")
    print("ratio = matrix-sdk-crypto ÷ ours = how many times faster we are (higher is better).")
    print("Row 7: ours = the call from the foreign language, baseline = the same call from Rust (7 Rust")
    print("baseline, this run); ratio = foreign ÷ Rust. Row 6 CLI: ours = wall time per event, no ratio.")

    failed = [s for s, st in status.items() if st["code"] not in ("0", "skipped")]
    print()
    print("steps:")
    for step, st in status.items():
        if st["code"] == "skipped":
            state = "skipped"
        elif st["code"] == "0":
            state = "ok"
        else:
            state = f"FAILED ({st['reason']})"
        print(f"  {step:<9} {state}, {st['seconds']} s, log {st['log']}")
    if missing or failed:
        print(f"bench: {missing} row(s) not measured, {len(failed)} step(s) failed", file=sys.stderr)
        return 1
    return 0


def row_line(row):
    ratio = ratio_of(row)
    target = row["target"] if row["target"] not in ("", "-") else "—"
    return (
        row["name"],
        fmt(row["ours"]),
        fmt(row["base"]),
        fmt(ratio),
        target,
        verdict(ratio, row["target"]),
    )


if __name__ == "__main__":
    sys.exit(main())
