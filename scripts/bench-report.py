#!/usr/bin/env python3
"""scripts/bench-report.py OUT: the results.md of scripts/bench from what its
parts left in OUT (results.csv from ../shared/bench/nbd-bench.sh, pause.csv,
rss.csv, map.csv, cluster.csv, checksums-skipped.txt, snapshots.md, vmm.md,
machine.txt). Medians over runs; a ratio is lungate over the best peer (the
lowest CPU, the highest rate), or over lungate's own reference (depth 0, no
checksums, 64 KiB clusters)."""

import csv
import os
import statistics
import sys

out = sys.argv[1]


def path(name):
    return os.path.join(out, name)


def rows(name):
    if not os.path.exists(path(name)):
        return []
    with open(path(name)) as f:
        return [r for r in csv.DictReader(f) if r.get("label") != "label"]


runs = rows("results.csv")


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def series(label, workload):
    return [r for r in runs if r["label"] == label and r["workload"] == workload]


def iops(label, workload):
    return med([float(r["iops"]) for r in series(label, workload)])


def mib_s(label, workload):
    return med([float(r["mib_s"]) for r in series(label, workload)])


def cpu_us(label, workload):
    """Server CPU per request, µs: the server's CPU time over the requests it
    served in the same run (CPU% of one core / IOPS), median over runs."""
    v = []
    for r in series(label, workload):
        if r["srv_cpu_pct"] and float(r["iops"]) > 0:
            v.append(float(r["srv_cpu_pct"]) / 100 / float(r["iops"]) * 1e6)
    return med(v)


def fmt(x, unit=""):
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:.0f}{unit}"
    return f"{x:.1f}{unit}" if abs(x) >= 10 else f"{x:.2f}{unit}"


lines = []
emit = lines.append

if os.path.exists(path("machine.txt")):
    emit("```")
    emit(open(path("machine.txt")).read().rstrip())
    emit("```")
    emit("")

PEERS = ["qemu-nbd", "nbdkit"]
transports = [t for t in ("tcp", "unix") if any(r["label"].endswith("-" + t) for r in runs)]

# (metric, workload, getter, lower is better, target ratio)
TARGETS = [
    ("server CPU per 4K random read (µs)", "rr4k", cpu_us, True, 0.5),
    ("server CPU per 4K random write (µs)", "rw4k", cpu_us, True, 0.5),
    ("4K random read IOPS, 1 connection", "rr4k", iops, False, 1.1),
    ("4K random write IOPS, 1 connection", "rw4k", iops, False, 1.1),
    ("4K random read IOPS, 4 connections", "rr4k-mc4", iops, False, 1.3),
    ("4K random write IOPS, 4 connections", "rw4k-mc4", iops, False, 1.3),
    ("1M sequential read MiB/s", "sr1m", mib_s, False, 1.2),
    ("1M sequential write MiB/s", "sw1m", mib_s, False, 1.2),
    ("nbdcopy, 4 connections, MiB/s", "copy4", mib_s, False, 1.2),
]

if transports:
    emit("## Against the best peer (same data, same client, median of the runs)")
    emit("")
    emit("| metric | transport | lungate | qemu-nbd | nbdkit | ratio to best peer | target | met |")
    emit("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, wl, get, lower, target in TARGETS:
        for t in transports:
            lg = get(f"lungate-{t}", wl)
            peers = {p: get(f"{p}-{t}", wl) for p in PEERS}
            have = [v for v in peers.values() if v is not None]
            if lg is None and not have:
                continue
            best = (min(have) if lower else max(have)) if have else None
            ratio = lg / best if lg is not None and best else None
            if ratio is None:
                met = "–"
            elif lower:
                met = "yes" if ratio <= target else "no"
            else:
                met = "yes" if ratio >= target else "no"
            tgt = f"≤ {target}×" if lower else f"≥ {target}×"
            emit(f"| {name} | {t} | {fmt(lg)} | {fmt(peers['qemu-nbd'])} | {fmt(peers['nbdkit'])} "
                 f"| {fmt(ratio, '×')} | {tgt} | {met} |")
    emit("")

    emit("### Every workload")
    emit("")
    emit("| server | transport | workload | IOPS | MiB/s | server CPU % | client CPU % | server µs/request | runs |")
    emit("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    labels = []
    for r in runs:
        if r["label"] not in labels and not r["label"].startswith(("depth-", "csum-")):
            labels.append(r["label"])
    for label in labels:
        server, _, t = label.rpartition("-")
        wls = []
        for r in runs:
            if r["label"] == label and r["workload"] not in wls:
                wls.append(r["workload"])
        for wl in wls:
            s = series(label, wl)
            srv = med([float(r["srv_cpu_pct"]) for r in s if r["srv_cpu_pct"]])
            cli = med([float(r["cli_cpu_pct"]) for r in s])
            i = iops(label, wl)
            emit(f"| {server} | {t} | {wl} | {fmt(i) if i else '–'} | {fmt(mib_s(label, wl))} | {fmt(srv)} "
                 f"| {fmt(cli)} | {fmt(cpu_us(label, wl))} | {len(s)} |")
    emit("")


def verdict(ok):
    return "–" if ok is None else ("yes" if ok else "no")


own = []  # (metric, measured, reference, ratio, target, met)
depth_lg = sorted({r["label"] for r in runs if r["label"].startswith("depth-lungate-d")},
                  key=lambda l: int(l.rpartition("-d")[2]))
if len(depth_lg) >= 2:
    d0, dn = depth_lg[0], depth_lg[-1]
    a, b = iops(d0, "rr4k"), iops(dn, "rr4k")
    if a and b:
        own.append((f"4K random read IOPS at chain depth {dn.rpartition('-d')[2]} (TCP, 1 conn.)",
                    fmt(b), f"depth {d0.rpartition('-d')[2]}: {fmt(a)}", fmt(b / a, "×"),
                    "≥ 0.9× (within 10 %)", verdict(b / a >= 0.9)))
for r in rows("pause.csv"):
    p99 = int(r["p99_us"])
    own.append((f"live-switch pause p99, {r['op']}, 32 requests in flight (µs)", str(p99),
                f"{r['count']} pauses, p50 {r['p50_us']}, max {r['max_us']}", "–", "< 1000 µs",
                verdict(p99 < 1000)))
_rss = rows("rss.csv")
if _rss:
    r = _rss[0]
    e, _, c = r["exports_connections"].partition(":")
    mib = int(r["rss_connected_kib"]) / 1024
    own.append((f"gateway RSS, {e} exports, {c} idle connections (MiB)", f"{mib:.1f}",
                f"{int(r['rss_idle_kib']) / 1024:.1f} before connecting", "–", "< 64 MiB",
                verdict(mib < 64)))
_m = {r["disk"]: int(r["rss_kib"]) for r in rows("map.csv")}
if "1T" in _m and "1G" in _m:
    diff = (_m["1T"] - _m["1G"]) / 1024
    own.append(("allocation-map RAM of a 1 TiB sparse LUN (MiB)", f"{diff:.1f}",
                f"RSS {_m['1T'] / 1024:.1f} vs {_m['1G'] / 1024:.1f} for 1 GiB", "–", "≤ 4 MiB",
                verdict(diff <= 4)))
if os.path.exists(path("checksums-skipped.txt")):
    own.append(("data checksums (lunctl create --checksums)", "not measured",
                open(path("checksums-skipped.txt")).read().strip(), "–", "cost measured", "–"))
else:
    for wl, what in (("rr4k", "read"), ("rw4k", "write")):
        on, off = iops("csum-lungate-on", wl), iops("csum-lungate-off", wl)
        con, coff = cpu_us("csum-lungate-on", wl), cpu_us("csum-lungate-off", wl)
        if on and off:
            own.append((f"4K random {what} IOPS with data checksums (TCP, 1 conn.)", fmt(on),
                        f"without: {fmt(off)}; server µs/request {fmt(con)} vs {fmt(coff)}",
                        fmt(on / off, "×"), "cost measured", "–"))
_cl = rows("cluster.csv")
if _cl:
    def cl(cs, p, k):
        return med([float(r[k]) for r in _cl if r["cluster"] == cs and r["pass"] == p])
    for p in ("fresh", "allocated"):
        a, b = cl("64K", p, "iops"), cl("4K", p, "iops")
        ua, ub = cl("64K", p, "srv_us_per_write"), cl("4K", p, "srv_us_per_write")
        if a and b:
            own.append((f"4 KiB writes into {p} clusters, 64 KiB cluster size (IOPS)", fmt(a),
                        f"4 KiB clusters: {fmt(b)}; server µs/write {fmt(ua)} vs {fmt(ub)}",
                        fmt(a / b, "×"), "cost measured", "–"))
if own:
    emit("## lungate's own targets")
    emit("")
    emit("| metric | lungate | reference | ratio | target | met |")
    emit("| --- | --- | --- | --- | --- | --- |")
    for row in own:
        emit("| " + " | ".join(row) + " |")
    emit("")
    if _cl:
        emit("### 4 KiB writes into fresh and allocated clusters (one per 64 KiB, QD32, 1 conn.)")
        emit("")
        emit("| cluster size | pass | writes | IOPS | server µs/write | p99 µs | runs |")
        emit("| --- | --- | --- | --- | --- | --- | --- |")
        for cs in ("64K", "4K"):
            for p in ("fresh", "allocated"):
                s_ = [r for r in _cl if r["cluster"] == cs and r["pass"] == p]
                if s_:
                    emit(f"| {cs} | {p} | {s_[0]['writes']} | {fmt(cl(cs, p, 'iops'))} "
                         f"| {fmt(cl(cs, p, 'srv_us_per_write'))} | {fmt(cl(cs, p, 'p99_us'))} | {len(s_)} |")
        emit("")

depth_labels = sorted({r["label"] for r in runs if r["label"].startswith("depth-")},
                      key=lambda l: (l.rpartition("-d")[0], int(l.rpartition("-d")[2])))
if depth_labels:
    emit("## Snapshot-chain depth (TCP, one connection)")
    emit("")
    emit("| server | depth | 4K read IOPS | read µs/request | 4K write IOPS | write µs/request |")
    emit("| --- | --- | --- | --- | --- | --- |")
    for label in depth_labels:
        server, _, d = label[len("depth-"):].rpartition("-d")
        emit(f"| {server} | {d} | {fmt(iops(label, 'rr4k'))} | {fmt(cpu_us(label, 'rr4k'))} "
             f"| {fmt(iops(label, 'rw4k'))} | {fmt(cpu_us(label, 'rw4k'))} |")
    emit("")

pause = rows("pause.csv")
if pause:
    emit("## Live-switch pause with 32 requests in flight (GET /v1/stats while fio runs)")
    emit("")
    emit("| operation | pauses | p50 µs | p99 µs | max µs | requests held | fio IOPS meanwhile | p99 < 1 ms |")
    emit("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in pause:
        met = "yes" if int(r["p99_us"]) < 1000 else "no"
        emit(f"| {r['op']} | {r['count']} | {r['p50_us']} | {r['p99_us']} | {r['max_us']} "
             f"| {r['held_requests']} | {r['iops_during']} | {met} |")
    emit("")


for name, title in (("snapshots.md", "Snapshot creation (idle LUNs)"), ("vmm.md", "vmm-shim save and restore")):
    if os.path.exists(path(name)):
        emit(f"## {title}")
        emit("")
        emit(open(path(name)).read().rstrip())
        emit("")

print("\n".join(lines))
