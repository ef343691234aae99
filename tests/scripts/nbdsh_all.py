# Exercises every NBD command, command flag and negotiation option that
# lungate supports, through libnbd, against one export.
#
# Run by tests/nbd_clients.rs (and by hand) as:
#   PATH=/usr/bin:$PATH NBDSH_URI=nbd://127.0.0.1:PORT/NAME/disk0 \
#     NBDSH_SIZE=<bytes> nbdsh -c 'exec(open("tests/scripts/nbdsh_all.py").read())'
#
# Environment:
#   NBDSH_URI        URI of the export (nbd://, nbd+unix://, nbds://)
#   NBDSH_SIZE       the export size the server must advertise, in bytes
#   NBDSH_READ_ONLY  "1" if the export is served read-only (writes must
#                    fail with EPERM and nothing else is written)
#   NBDSH_EXTENDED   "1": request extended headers (libnbd >= 1.18) and
#                    check they were negotiated; otherwise they are not
#                    requested (libnbd 1.22 would by default)
#   NBDSH_SERVER     "lungate" (default): also assert lungate's own
#                    promises (every transmission flag advertised, trim
#                    reads back zeros, block status truthful, export names
#                    NAME/diskN); "reference": only what the NBD spec
#                    requires, to validate this script against nbdkit.
#
# Prints one line per check and finally "NBDSH_ALL OK"; any failed check
# raises and nbdsh exits non-zero.

import errno
import os
import re

import nbd

URI = os.environ["NBDSH_URI"]
SIZE = int(os.environ["NBDSH_SIZE"])
READ_ONLY = os.environ.get("NBDSH_READ_ONLY", "0") == "1"
EXTENDED = os.environ.get("NBDSH_EXTENDED", "0") == "1"
LUNGATE = os.environ.get("NBDSH_SERVER", "lungate") == "lungate"
MIB = 1 << 20
KIB = 1 << 10


def check(cond, what):
    if not cond:
        raise AssertionError("FAILED: " + what)
    print("ok:", what)


def errnum(e):
    # python3-libnbd reports errno as its symbolic name ("EINVAL") in some
    # versions and as a number in others.
    if isinstance(e.errno, str):
        return getattr(errno, e.errno, -1)
    return e.errno


def expect_errno(fn, want, what):
    try:
        fn()
    except nbd.Error as e:
        check(errnum(e) == want,
              "%s fails with errno %s (got %s: %s)"
              % (what, errno.errorcode.get(want, want), e.errno, e.string))
        return
    raise AssertionError("FAILED: %s succeeded, expected errno %s"
                         % (what, errno.errorcode.get(want, want)))


def expect_any_error(fn, what):
    try:
        fn()
    except nbd.Error as e:
        print("ok: %s fails (errno %s: %s)" % (what, e.errno, e.string))
        return
    raise AssertionError("FAILED: %s succeeded, expected an error" % what)


def pattern(n, seed):
    # Cheap, position-dependent and seed-dependent bytes.
    return bytes(((i * 131 + seed * 17 + (i >> 9)) & 0xFF) for i in range(n))


def connect(structured=True, meta=True, strict=True):
    h = nbd.NBD()
    if hasattr(h, "set_request_extended_headers"):
        h.set_request_extended_headers(structured and EXTENDED)
    elif EXTENDED:
        raise AssertionError("FAILED: this libnbd cannot request extended headers")
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(URI)
    if not strict:
        # Let requests the spec forbids reach the server, so the server's
        # own checks are what is tested.
        h.set_strict_mode(0)
    return h


def extents(h, count, offset, flags=0):
    got = []

    def cb(metacontext, off, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            got.append((off, list(entries)))
        return 0

    h.block_status(count, offset, cb, flags)
    check(len(got) == 1,
          "block_status(%d, %d, flags=%d) returned one base:allocation chunk"
          % (count, offset, flags))
    off, entries = got[0]
    out = []
    pos = off
    for i in range(0, len(entries), 2):
        out.append((pos, entries[i], entries[i + 1]))
        pos += entries[i]
    return out


def status_at(exts, offset):
    for (o, l, f) in exts:
        if o <= offset < o + l:
            return f
    raise AssertionError("FAILED: no extent covers offset %d in %r"
                         % (offset, exts))


# ---------------------------------------------------------------- flags
h = connect()
check(h.get_size() == SIZE, "export size %d == %d" % (h.get_size(), SIZE))
check(h.get_structured_replies_negotiated(), "structured replies negotiated")
if EXTENDED:
    check(h.get_extended_headers_negotiated(), "extended headers negotiated")
check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION),
      "base:allocation negotiated")
check(h.is_read_only() == READ_ONLY, "is_read_only == %s" % READ_ONLY)
queries = {
    "can_flush": h.can_flush(),
    "can_fua": h.can_fua(),
    "can_trim": h.can_trim(),
    "can_zero": h.can_zero(),
    "can_fast_zero": h.can_fast_zero(),
    "can_df": h.can_df(),
    "can_multi_conn": h.can_multi_conn(),
    "can_cache": h.can_cache(),
    "is_rotational": h.is_rotational(),
}
print("flags:", queries)
for n in ("minimum", "preferred", "maximum"):
    v = h.get_block_size(getattr(nbd, "SIZE_" + n.upper()))
    print("block size %s: %d" % (n, v))
minimum = max(h.get_block_size(nbd.SIZE_MINIMUM), 1)
check(minimum <= 512, "minimum block size %d <= 512" % minimum)
if LUNGATE:
    for q in ("can_flush", "can_df", "can_multi_conn", "can_cache"):
        check(queries[q], q)
    for q in ("can_fua", "can_trim", "can_zero", "can_fast_zero"):
        # Read-only exports advertise no write-type commands.
        check(queries[q] == (not READ_ONLY), "%s == %s" % (q, not READ_ONLY))
    check(not queries["is_rotational"], "not is_rotational")
check(queries["can_df"], "can_df with structured replies")
if queries["can_fast_zero"]:
    check(queries["can_zero"], "can_fast_zero implies can_zero")

last = SIZE - 64 * KIB

if not READ_ONLY:
    # ------------------------------------------------------- read/write
    a = pattern(64 * KIB, 1)
    h.pwrite(a, 0)
    check(h.pread(64 * KIB, 0) == a, "pwrite/pread 64K at 0")
    b = pattern(64 * KIB, 2)
    h.pwrite(b, last, nbd.CMD_FLAG_FUA)
    check(h.pread(64 * KIB, last) == b, "pwrite FUA/pread 64K at the last 64K")
    c = pattern(333, 3)
    h.pwrite(c, 12345)
    check(h.pread(333, 12345) == c, "unaligned pwrite/pread 333 bytes at 12345")
    check(h.pread(64 * KIB, 0)[:12345] == a[:12345],
          "bytes before the unaligned write are untouched")
    h.flush()
    check(True, "flush")

    # ------------------------------------------------------------- trim
    d = pattern(MIB, 4)
    h.pwrite(d, 2 * MIB)
    h.trim(MIB, 2 * MIB)
    check(True, "trim 1M at 2M")
    if LUNGATE:
        check(h.pread(MIB, 2 * MIB) == bytes(MIB), "trimmed range reads zeros")
    h.pwrite(d, 2 * MIB)
    h.trim(MIB, 2 * MIB, nbd.CMD_FLAG_FUA)
    check(True, "trim with FUA")

    # ------------------------------------------------------------- zero
    for (flags, name) in ((0, "no flags"),
                          (nbd.CMD_FLAG_NO_HOLE, "NO_HOLE"),
                          (nbd.CMD_FLAG_FUA, "FUA"),
                          (nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA,
                           "NO_HOLE|FUA")):
        h.pwrite(d, 3 * MIB)
        h.zero(MIB, 3 * MIB, flags)
        check(h.pread(MIB, 3 * MIB) == bytes(MIB),
              "zero with %s reads back zeros" % name)
    if queries["can_fast_zero"]:
        h.pwrite(d, 3 * MIB)
        try:
            h.zero(MIB, 3 * MIB, nbd.CMD_FLAG_FAST_ZERO)
            check(h.pread(MIB, 3 * MIB) == bytes(MIB),
                  "FAST_ZERO succeeded and reads back zeros")
        except nbd.Error as e:
            check(errnum(e) == errno.ENOTSUP,
                  "FAST_ZERO refused with ENOTSUP (got %s)" % e.errno)
            check(h.pread(MIB, 3 * MIB) == d,
                  "refused FAST_ZERO left the data alone")
    # Not asserted: that NO_HOLE leaves block status "data". lungate
    # provisions with FALLOC_FL_ZERO_RANGE, whose unwritten extents ext4's
    # SEEK_DATA reports as holes, and the spec lets a server report a hole
    # anywhere (base:allocation, NBD_STATE_HOLE).

    # ----------------------------------------------------- block status
    # Layout of [4M, 8M): hole, 1M data at 5M, hole.
    h.trim(4 * MIB, 4 * MIB)
    h.pwrite(pattern(MIB, 5), 5 * MIB)
    h.flush()
    exts = extents(h, 4 * MIB, 4 * MIB)
    print("extents [4M,8M):", exts)
    check(exts[0][0] == 4 * MIB, "first extent starts at the request offset")
    for (o, l, f) in exts:
        check(l > 0, "extent at %d has a non-zero length" % o)
    covered = sum(l for (_, l, _) in exts[:-1])
    check(covered < 4 * MIB,
          "all extents but the last lie within the request")
    f5 = status_at(exts, 5 * MIB)
    check(f5 & nbd.STATE_HOLE == 0 and f5 & nbd.STATE_ZERO == 0,
          "written range reports data (flags %d)" % f5)
    if LUNGATE:
        check(exts[-1][0] + exts[-1][1] >= 6 * MIB,
              "extents cover at least through the written range")
        f4 = status_at(exts, 4 * MIB)
        check(f4 & nbd.STATE_HOLE and f4 & nbd.STATE_ZERO,
              "trimmed range reports hole+zero (flags %d)" % f4)
    one = extents(h, 4 * MIB, 4 * MIB, nbd.CMD_FLAG_REQ_ONE)
    check(len(one) == 1, "REQ_ONE returns exactly one extent: %r" % one)
    check(0 < one[0][1] <= 4 * MIB, "REQ_ONE extent within the request")
    one = extents(h, 2 * MIB, 5 * MIB, nbd.CMD_FLAG_REQ_ONE)
    check(len(one) == 1 and one[0][2] & nbd.STATE_HOLE == 0
          and one[0][1] <= MIB,
          "REQ_ONE at the data extent reports data up to its end: %r" % one)
    tail = extents(h, 64 * KIB, last)
    check(tail[0][0] == last, "block status at the last 64K")

# ----------------------------------------------------------------- reads
check(len(h.pread(4096, SIZE - 4096)) == 4096, "pread of the last 4K")
check(len(h.pread(1, SIZE - 1)) == 1, "pread of the last byte")

chunks = []


def chunk_cb(subbuf, offset, status, err):
    chunks.append((offset, len(subbuf), status))
    return 0


buf = h.pread_structured(128 * KIB, 0, chunk_cb)
check(len(buf) == 128 * KIB, "pread_structured 128K")
spans = sorted((o, o + n) for (o, n, s) in chunks if s != nbd.READ_ERROR)
pos = 0
for (s, e) in spans:
    check(s == pos, "read chunks are contiguous, no overlap (at %d)" % s)
    pos = e
check(pos == 128 * KIB, "read chunks cover the whole request")

chunks.clear()
buf = h.pread_structured(64 * KIB, 0, chunk_cb, nbd.CMD_FLAG_DF)
check(len(buf) == 64 * KIB, "DF read 64K")
check(len(chunks) == 1, "DF read sent one content chunk (%d)" % len(chunks))
check(h.pread(64 * KIB, 0) == buf, "DF read returned the same bytes as a plain read")

h.cache(MIB, 0)
check(True, "cache 1M at 0")

# --------------------------------------------------- errors, server side
e = connect(strict=False)
expect_errno(lambda: e.pread(512, SIZE), errno.EINVAL, "pread at the end")
expect_errno(lambda: e.pread(1024, SIZE - 512), errno.EINVAL,
             "pread across the end")
expect_errno(lambda: e.pread(512, (1 << 63) - 1), errno.EINVAL,
             "pread at offset 2^63-1")
expect_errno(lambda: e.block_status(512, SIZE, lambda *a: 0), errno.EINVAL,
             "block_status at the end")
expect_any_error(lambda: e.cache(512, SIZE), "cache at the end")
if READ_ONLY:
    expect_errno(lambda: e.pwrite(bytes(512), 0), errno.EPERM,
                 "pwrite to a read-only export")
    expect_errno(lambda: e.trim(512, 0), errno.EPERM,
                 "trim on a read-only export")
    expect_errno(lambda: e.zero(512, 0), errno.EPERM,
                 "zero on a read-only export")
    expect_any_error(lambda: e.pwrite(bytes(512), SIZE),
                     "pwrite past the end of a read-only export")
else:
    expect_errno(lambda: e.pwrite(bytes(512), SIZE), errno.ENOSPC,
                 "pwrite at the end")
    expect_errno(lambda: e.pwrite(bytes(1024), SIZE - 512), errno.ENOSPC,
                 "pwrite across the end")
    expect_errno(lambda: e.zero(512, SIZE), errno.ENOSPC, "zero at the end")
    expect_errno(lambda: e.trim(512, SIZE), errno.EINVAL, "trim at the end")
    check(e.pread(64 * KIB, last) == b, "export intact after refused requests")
# A flag that is not defined for the command.
expect_errno(lambda: e.pread(512, 0, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL,
             "pread with NO_HOLE")
expect_errno(lambda: e.pread(512, 0, 1 << 7), errno.EINVAL,
             "pread with an unknown flag")
check(len(e.pread(512, 0)) == 512, "connection still usable after errors")
e.shutdown()

# ------------------------------------------------- no structured replies
s = connect(structured=False, meta=False, strict=False)
check(not s.get_structured_replies_negotiated(),
      "structured replies off when not requested")
check(not s.can_df(), "no DF without structured replies")
check(len(s.pread(64 * KIB, 0)) == 64 * KIB, "simple-reply pread 64K")
if not READ_ONLY:
    check(s.pread(64 * KIB, last) == b, "simple-reply pread sees the data")
expect_errno(lambda: s.pread(512, SIZE), errno.EINVAL,
             "simple-reply pread at the end")
check(len(s.pread(512, 0)) == 512, "simple-reply connection usable after error")
s.shutdown()

# Structured replies but no meta context: BLOCK_STATUS must be refused.
m = connect(structured=True, meta=False, strict=False)
check(not m.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION),
      "no meta context when none requested")
expect_errno(lambda: m.block_status(512, 0, lambda *a: 0), errno.EINVAL,
             "block_status without a negotiated meta context")
check(len(m.pread(512, 0)) == 512, "connection usable after that")
m.shutdown()

# -------------------------------------------------------------- opt mode
export = h.get_export_name()
o = nbd.NBD()
o.set_opt_mode(True)
o.connect_uri(URI)
check(o.aio_is_negotiating(), "opt mode stops in negotiation")
names = []
o.opt_list(lambda name, desc: names.append(name) or 0)
print("exports:", names)
check(export in names, "opt_list lists %s" % export)
if LUNGATE:
    for n in names:
        check(re.fullmatch(r"[^/]+/disk[0-9]+", n) is not None,
              "export name %r is NAME/diskN" % n)
    check(len(set(names)) == len(names), "no export listed twice")
contexts = []
o.opt_list_meta_context(lambda ctx: contexts.append(ctx) or 0)
check(nbd.CONTEXT_BASE_ALLOCATION in contexts,
      "opt_list_meta_context offers base:allocation (%r)" % contexts)
o.set_export_name(export)
o.opt_info()
check(o.get_size() == SIZE, "opt_info reports the size")
check(o.is_read_only() == READ_ONLY, "opt_info reports read-only-ness")
o.set_export_name(export + "-does-not-exist")
expect_any_error(o.opt_info, "opt_info on an unknown export")
if LUNGATE:
    o.set_export_name("../" + export)
    expect_any_error(o.opt_info, "opt_info on ../%s" % export)
o.set_export_name(export)
o.opt_go()
check(not o.aio_is_negotiating(), "opt_go enters transmission")
check(len(o.pread(512, 0)) == 512, "pread after opt_go")
o.shutdown()

a = nbd.NBD()
a.set_opt_mode(True)
a.connect_uri(URI)
a.opt_abort()
check(a.aio_is_closed(), "opt_abort closes the connection")

h.shutdown()
print("NBDSH_ALL OK")
