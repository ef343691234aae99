# Crash-test client for tests/crash.rs (run with the system python, which has
# libnbd's `nbd` module).
#
#   crash_workload.py run URI CONTROL_SOCKET LUN LOG SEED NBLOCKS BS TAG
#       Sequential writes (each block filled with one byte value), flushes and
#       snapshots (through the control API) until the server goes away. Every
#       event is logged, line-buffered, *around* the request:
#         W b v   write of value v to block b sent      A b v   ...acknowledged
#         f       flush sent                            F       ...completed
#         s NAME  snapshot requested                    S NAME  ...201 received
#       The log survives the gateway's SIGKILL (only the gateway dies).
#   crash_workload.py verify URI NBLOCKS BS EXPECT_JSON
#       EXPECT_JSON maps block -> list of allowed byte values (null: any).
#       Prints one JSON object: {"actual": {b: value or -1 if mixed},
#       "bad": [[b, [values seen]], ...]}.
import json
import random
import socket
import sys

import nbd


def snapshot(sock_path, lun, name):
    body = json.dumps({"name": name}).encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(sock_path)
    head = ("POST /v1/luns/%s/snapshots HTTP/1.1\r\nHost: lungate\r\n"
            "Content-Type: application/json\r\nContent-Length: %d\r\n"
            "Connection: close\r\n\r\n" % (lun, len(body))).encode()
    s.sendall(head + body)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return int(data.split(b" ", 2)[1])


def run(uri, sock_path, lun, log_path, seed, nblocks, bs, tag):
    rnd = random.Random(seed)
    log = open(log_path, "a", buffering=1)
    h = nbd.NBD()
    h.connect_uri(uri)
    i = 0
    try:
        log.write("f\n")
        h.flush()
        log.write("F\n")
        while True:
            i += 1
            r = rnd.random()
            if r < 0.80:
                b = rnd.randrange(nblocks)
                v = rnd.randrange(1, 256)
                log.write("W %d %d\n" % (b, v))
                h.pwrite(bytes([v]) * bs, b * bs)
                log.write("A %d %d\n" % (b, v))
            elif r < 0.95:
                log.write("f\n")
                h.flush()
                log.write("F\n")
            else:
                name = "%s-%d" % (tag, i)
                log.write("s %s\n" % name)
                st = snapshot(sock_path, lun, name)
                log.write(("S %s\n" % name) if st == 201 else ("X %s %d\n" % (name, st)))
    except Exception as e:  # the gateway was killed
        log.write("E %s\n" % str(e).replace("\n", " "))


def verify(uri, nblocks, bs, expect_json):
    expect = json.loads(expect_json)
    h = nbd.NBD()
    h.connect_uri(uri)
    actual, bad = {}, []
    for b in range(nblocks):
        data = h.pread(bs, b * bs)
        seen = sorted(set(data))
        actual[b] = seen[0] if len(seen) == 1 else -1
        allowed = expect.get(str(b))
        if allowed is not None and not set(seen) <= set(allowed):
            bad.append([b, seen])
    h.shutdown()
    print(json.dumps({"actual": actual, "bad": bad}))


if __name__ == "__main__":
    a = sys.argv
    if a[1] == "run":
        run(a[2], a[3], a[4], a[5], int(a[6]), int(a[7]), int(a[8]), a[9])
    else:
        verify(a[2], int(a[3]), int(a[4]), a[5])
