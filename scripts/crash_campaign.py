#!/usr/bin/env python3
"""The long crash-consistency campaign: every write index of every image workload.

Runs each public-API workload of ``tests/reliability/image_workloads.py``
(create, scattered writes, a qcow2-over-qcow2-over-raw chain, snapshot
create/revert/delete, resize, compressed convert, ``check(repair=True)`` on a
leaky image) once to count its writes, then again cut at *every* write index,
for each fault kind:

* ``crash``: the process dies before write N (``faults.CrashAfter``);
* ``power``: every unflushed write is lost, then death (``faults.PowerLoss``);
* ``reorder``: a seeded random half of the unflushed writes is lost
  (``faults.PowerLoss(keep=0.5)``), as a disk cache may reorder them;
* ``enospc`` (``--enospc``): the disk is full from write N of a scattered-write
  workload (``faults.NoSpace``); the writer gets an ``ImageError``, retries
  once the space is back, and the image must be clean afterwards;
* ``sigkill`` (``--kills``): a real writer process killed with ``kill -9``.

After each cut the image must open, real ``qemu-img check`` must find no
corruption (leaks allowed), acknowledged data must read back, and
``check(repair=True)`` must leave ``qemu-img check`` clean. "Acknowledged" is
the durability contract of the cache mode (``--cache``): with ``writeback``
(the default) what a ``flush()`` returned for; with ``writethrough`` every
write that returned. Prints a table of
crash points tried and survived, the first failures of each row, and
optionally writes the figures as JSON.

Usage::

    .venv/bin/python scripts/crash_campaign.py                       # everything
    .venv/bin/python scripts/crash_campaign.py --kind crash --kind power
    .venv/bin/python scripts/crash_campaign.py --workload snapshots --variant v2
    .venv/bin/python scripts/crash_campaign.py --limit 60 --json figures.json
    .venv/bin/python scripts/crash_campaign.py --kind crash --kills 200      # + real kill -9
    .venv/bin/python scripts/crash_campaign.py --variant all --limit 60    # every qcow2 variant
    .venv/bin/python scripts/crash_campaign.py --cache writethrough

The default test run samples the same sweeps (``tests/reliability/``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import virtkit
from virtkit import images
from virtkit.testing import faults

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "reliability"))
W: Any = importlib.import_module("image_workloads")  # the test suite's workloads

VARIANTS: dict[str, dict[str, Any]] = {
    "v3": {},
    "v2": {"compat": "0.10"},
    "refcount1": {"refcount_bits": 1},
    "refcount64": {"refcount_bits": 64},
    "lazy": {"lazy_refcounts": True},
    "extl2": {"extended_l2": True, "cluster_size": 32768},
    "c512": {"cluster_size": 512},
}


def main(argv: list[str] | None = None) -> int:
    """Run the campaign; return 0 when every crash point survived, else 1."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", action="append", choices=sorted(W.WORKLOADS))
    ap.add_argument("--kind", action="append", choices=W.KINDS)
    ap.add_argument("--variant", action="append", choices=[*sorted(VARIANTS), "all"])
    ap.add_argument(
        "--cache", choices=["writeback", "writethrough"], default="writeback", help="cache mode"
    )
    ap.add_argument("--limit", type=int, default=None, help="crash points per row (default: all)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--show", type=int, default=2, help="failures printed per row")
    ap.add_argument(
        "--kills", type=int, default=0, help="also SIGKILL a real writer process this many times"
    )
    ap.add_argument(
        "--enospc", type=int, default=0, help="also fill the disk at this many sampled writes"
    )
    args = ap.parse_args(argv)
    workloads = args.workload or sorted(W.WORKLOADS)
    kinds = args.kind or list(W.KINDS)
    variants = args.variant or ["v3"]
    if "all" in variants:
        variants = list(VARIANTS)
    W.OPEN.clear()
    W.OPEN.update(cache=args.cache)
    rows: list[dict[str, Any]] = []
    broken = 0
    print(
        f"{'variant':<10} {'workload':<10} {'kind':<8} {'writes':>6} {'tried':>6} "
        f"{'survived':>8} {'leaked':>6} {'flagwin':>7} {'secs':>6}"
    )
    for variant in variants:
        W.VARIANT.clear()
        W.VARIANT.update(VARIANTS[variant])
        for name in workloads:
            for kind in kinds:
                started = time.monotonic()
                with tempfile.TemporaryDirectory(prefix="virtkit-crash-") as tmp:
                    try:
                        figs = W.sweep(
                            W.WORKLOADS[name], Path(tmp), kind, args.limit, stop_on_failure=False
                        )
                    except virtkit.VirtkitError as exc:  # the variant cannot run this workload
                        print(f"{variant:<10} {name:<10} {kind:<8} n/a: {exc.message}")
                        continue
                secs = time.monotonic() - started
                print(
                    f"{variant:<10} {name:<10} {kind:<8} {figs.writes:>6} {figs.tried:>6} "
                    f"{figs.survived:>8} {figs.leaked:>6} {figs.window:>7} {secs:>6.1f}",
                    flush=True,
                )
                for failure in figs.failures[: args.show]:
                    print("    FAIL " + failure.strip().replace("\n", "\n         ")[:1200])
                if figs.failures:
                    broken += 1
                row = {k: v for k, v in vars(figs).items() if k != "failures"}
                row.update(
                    variant=variant,
                    cache=args.cache,
                    seconds=round(secs, 1),
                    failed=len(figs.failures),
                )
                row["first_failures"] = [f[:2000] for f in figs.failures[:5]]
                rows.append(row)
    if args.enospc:
        broken += enospc_campaign(variants, args.enospc, rows)
    if args.kills:
        broken += kill_campaign(variants, args.kills, rows)
    tried = sum(r["tried"] for r in rows)
    survived = sum(r["survived"] for r in rows)
    print(f"total: {tried} crash points tried, {survived} survived, {broken} rows with failures")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0 if broken == 0 else 1


def kill_campaign(variants: list[str], kills: int, rows: list[dict[str, Any]]) -> int:
    """``kill -9`` a real writer ``kills`` times per variant; return rows that failed."""
    k9: Any = importlib.import_module("test_image_kill9")
    failed = 0
    for seed, label in enumerate(variants, start=11):
        if VARIANTS[label].get("refcount_bits") == 1:
            print(f"kill -9 {label:<10} n/a: the writer takes snapshots (refcount_bits >= 2)")
            continue
        with tempfile.TemporaryDirectory(prefix="virtkit-kill-") as tmp:
            path = Path(tmp) / "disk.qcow2"
            create: dict[str, Any] = {"cluster_size": W.CS, **VARIANTS[label]}
            images.create(path, W.SIZE, **create).close()
            started = time.monotonic()
            try:
                figs = k9.kill_rounds(path, kills, seed=seed)
                error = ""
            except AssertionError as exc:
                figs, error = {}, str(exc)
                failed += 1
        print(f"kill -9 {label:<10} {figs or 'FAILED'} {time.monotonic() - started:.1f}s")
        if error:
            print("    FAIL " + error[:1500])
        rows.append(
            {
                "workload": "kill9",
                "variant": label,
                "kind": "sigkill",
                **figs,
                "tried": figs.get("kills", 0),
                "survived": figs.get("survived", 0),
            }
        )
    return failed


def enospc_campaign(variants: list[str], points: int, rows: list[dict[str, Any]]) -> int:
    """Fill the disk at ``points`` sampled writes of a scattered workload, per variant."""
    ns: Any = importlib.import_module("test_image_enospc")
    failed = 0
    for label in variants:
        W.VARIANT.clear()
        W.VARIANT.update(VARIANTS[label])
        with tempfile.TemporaryDirectory(prefix="virtkit-enospc-") as tmp:
            started = time.monotonic()
            probe = Path(tmp) / "probe.qcow2"
            images.create(probe, W.SIZE, **W.opts()).close()
            total = ns.count_writes(probe)
            tried = survived = raised = 0
            failures: list[str] = []
            for k in W.sample(total, points):
                path = Path(tmp) / f"disk{k}.qcow2"
                images.create(path, W.SIZE, **W.opts()).close()
                m = W.Model(bytes(W.SIZE))
                tried += 1
                try:
                    with images.open(path, writable=True, **W.OPEN) as img:
                        plan = faults.NoSpace(at_write=k)
                        with faults.inject(plan, only=path):
                            try:
                                ns.scattered(img, m)
                            except virtkit.ImageError as exc:
                                raised += 1
                                plan.release()
                                ns.scattered(img, m, start=exc.op_index)  # type: ignore[attr-defined]
                            plan.release()
                            m.flush(img)
                    m.ack()
                    ns.assert_clean_after(path, m)
                    survived += 1
                except (AssertionError, virtkit.VirtkitError) as exc:
                    failures.append(f"disk full from write {k}/{total}: {exc}")
                path.unlink()
        secs = time.monotonic() - started
        print(
            f"{label:<10} {'scattered':<10} {'enospc':<8} {total:>6} {tried:>6} {survived:>8} "
            f"raised={raised} {secs:>6.1f}",
            flush=True,
        )
        for failure in failures[:2]:
            print("    FAIL " + failure[:1200])
        failed += bool(failures)
        rows.append(
            {
                "workload": "scattered",
                "variant": label,
                "kind": "enospc",
                "writes": total,
                "tried": tried,
                "survived": survived,
                "raised": raised,
                "failed": len(failures),
                "seconds": round(secs, 1),
            }
        )
    return failed


if __name__ == "__main__":
    sys.exit(main())
