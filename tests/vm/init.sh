#!/bin/sh
# Guest /init for lungate's real-VM test (tests/vm.rs), run by busybox sh as
# PID 1 inside a throwaway initramfs.
#
# The disk under test is /dev/vda: a virtio-blk device that QEMU backs with
# an NBD export of lungate. The host passes on the kernel command line:
#   lungate.size=BYTES   the disk region length the guest must see
#   lungate.phase=1|2|3  1: partition, format, write files; 2: verify them;
#                        3: raw sequence-numbered writes during a migration
#   lungate.writes=N     phase 3: how many blocks to write (default 300)
#
# Every result goes to the serial console as one line
#   LUNGATE-RESULT key=value
# and the run ends with `LUNGATE-RESULT done=PHASE`. A failed check prints
# `LUNGATE-FAIL why` and powers off at once, so the host never waits for a
# timeout to learn that something went wrong. The host asserts every line.

export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

say() { echo "LUNGATE-RESULT $*"; }

fail() {
    echo "LUNGATE-FAIL $*"
    sync
    poweroff -f
    # poweroff -f does not return; if it ever does, do not let PID 1 exit
    # (that panics and hides the message).
    while :; do sleep 1; done
}

SIZE=
PHASE=
WRITES=
for word in $(cat /proc/cmdline); do
    case "$word" in
        lungate.size=*) SIZE=${word#*=} ;;
        lungate.phase=*) PHASE=${word#*=} ;;
        lungate.writes=*) WRITES=${word#*=} ;;
    esac
done
[ -n "$SIZE" ] || fail "no lungate.size= on the kernel command line"
[ -n "$PHASE" ] || fail "no lungate.phase= on the kernel command line"

# /modules.order lists the virtio modules with their dependencies first
# (the host resolves it from modules.dep).
while read -r mod; do
    insmod "/modules/$mod" || fail "insmod $mod"
done </modules.order

# Waits up to 30 s for a path to appear (the virtio probe is asynchronous).
wait_for() {
    i=0
    while [ ! -e "$1" ]; do
        i=$((i + 1))
        [ "$i" -le 300 ] || fail "$1 did not appear within 30 s"
        usleep 100000
    done
}

wait_for /sys/block/vda/size
SECTORS=$(cat /sys/block/vda/size)
BYTES=$((SECTORS * 512))
say "phase=$PHASE"
say "size=$BYTES"
[ "$BYTES" = "$SIZE" ] || fail "/dev/vda is $BYTES bytes, expected $SIZE"
wait_for /dev/vda

# The partition leaves the first MiB (MBR, alignment) and the last MiB
# (where the tail marker lives) outside of it.
PART_START=2048
PART_END=$((SECTORS - 2048 - 1))
PART_SECTORS=$((PART_END - PART_START + 1))
TAIL="LUNGATE-TAIL size=$SIZE"
FILES="hello.txt seq.txt random.bin"

# Bytes of the last sector, and what a read one sector past the end gets
# (the guest kernel must return nothing: the device ends where the region
# ends).
last_read=$(dd if=/dev/vda bs=512 skip=$((SECTORS - 1)) count=1 2>/dev/null | wc -c)
say "last_read=$last_read"
[ "$last_read" = 512 ] || fail "reading the last sector gave $last_read bytes"
pastend_read=$(dd if=/dev/vda bs=512 skip="$SECTORS" count=1 2>/dev/null | wc -c)
say "pastend_read=$pastend_read"
[ "$pastend_read" = 0 ] || fail "reading past the end gave $pastend_read bytes"

phase1() {
    # A fresh disk reads zeros at its start: whatever the host keeps in the
    # LUN's first sectors (the aligned layout's GPT and label) is not the
    # guest's, and the guest sees only its own partition table from here on.
    start_nonzero=$(head -c 1048576 /dev/vda | tr -d '\000' | wc -c)
    say "start_nonzero=$start_nonzero"
    [ "$start_nonzero" = 0 ] || fail "the first MiB of a fresh disk holds $start_nonzero non-zero bytes"

    if dd if=/dev/zero of=/dev/vda bs=512 seek="$SECTORS" count=1 conv=notrunc 2>/dev/null; then
        fail "writing one sector past the end succeeded"
    fi
    say "pastend_write=refused"

    # The tail marker: the last sector of the disk, which the host finds at
    # the last sector of the disk region in the LUN file.
    printf '%s\n' "$TAIL" | dd of=/dev/vda bs=512 seek=$((SECTORS - 1)) count=1 conv=notrunc,sync,fsync 2>/dev/null \
        || fail "writing the tail marker"
    say "tail=written"

    # Discards right at both ends of the disk, next to whatever the LUN
    # keeps around the region: the host then checks that the hidden bytes,
    # the other disk and the tail marker all survived.
    dd if=/dev/urandom of=/dev/vda bs=512 seek=$((SECTORS - 2048)) count=2047 conv=notrunc,fsync 2>/dev/null \
        || fail "filling the last MiB"
    blkdiscard -o $(((SECTORS - 2048) * 512)) -l $((2047 * 512)) /dev/vda || fail "discarding the last MiB"
    blkdiscard -o 0 -l 1048576 /dev/vda || fail "discarding the first MiB"
    say "discard=ok"

    printf 'o\nn\np\n1\n%s\n%s\nw\n' "$PART_START" "$PART_END" | fdisk -u /dev/vda >/dev/null 2>&1
    wait_for /sys/block/vda/vda1/start
    wait_for /dev/vda1
    say "part_start=$(cat /sys/block/vda/vda1/start)"
    say "part_sectors=$(cat /sys/block/vda/vda1/size)"
    [ "$(cat /sys/block/vda/vda1/start)" = "$PART_START" ] || fail "vda1 does not start at $PART_START"
    [ "$(cat /sys/block/vda/vda1/size)" = "$PART_SECTORS" ] || fail "vda1 is not $PART_SECTORS sectors"

    mke2fs -L lungate-vm /dev/vda1 >/dev/null 2>&1 || fail "mke2fs /dev/vda1"
    say "mkfs=ext2"
    mount -t ext2 /dev/vda1 /mnt || fail "mount /dev/vda1"

    # Content the host can rebuild (hello.txt, seq.txt), content only the
    # guest knows (random.bin, checked through its sum), and a directory of
    # small files for metadata.
    echo "hello from the lungate guest" >/mnt/hello.txt
    seq 1 200000 >/mnt/seq.txt
    dd if=/dev/urandom of=/mnt/random.bin bs=65536 count=64 2>/dev/null || fail "writing random.bin"
    mkdir /mnt/small || fail "mkdir small"
    i=0
    while [ "$i" -lt 100 ]; do
        echo "small file $i" >"/mnt/small/$i"
        i=$((i + 1))
    done
    (cd /mnt && sha256sum $FILES >SHA256SUMS) || fail "sha256sum"
    while read -r sum name; do
        say "sum.$name=$sum"
    done </mnt/SHA256SUMS
    sync
    umount /mnt || fail "umount /mnt"
    blockdev --flushbufs /dev/vda || fail "flushing /dev/vda"
    say "files=written"
}

phase2() {
    tail=$(dd if=/dev/vda bs=512 skip=$((SECTORS - 1)) count=1 2>/dev/null | head -n 1)
    [ "$tail" = "$TAIL" ] || fail "tail marker is '$tail', expected '$TAIL'"
    say "tail=ok"

    wait_for /dev/vda1
    say "part_start=$(cat /sys/block/vda/vda1/start)"
    say "part_sectors=$(cat /sys/block/vda/vda1/size)"
    mount -t ext2 /dev/vda1 /mnt || fail "mount /dev/vda1"
    (cd /mnt && sha256sum -c SHA256SUMS >/dev/null 2>&1) || fail "sha256sum -c SHA256SUMS"
    while read -r sum name; do
        say "sum.$name=$(sha256sum "/mnt/$name" | cut -d ' ' -f 1)"
    done </mnt/SHA256SUMS
    [ "$(cat /mnt/hello.txt)" = "hello from the lungate guest" ] || fail "hello.txt changed"
    i=0
    while [ "$i" -lt 100 ]; do
        [ "$(cat "/mnt/small/$i")" = "small file $i" ] || fail "small/$i changed"
        i=$((i + 1))
    done
    say "files=ok"
    # Let the filesystem discard its free space, random.bin's included.
    rm /mnt/random.bin || fail "rm random.bin"
    fstrim /mnt || fail "fstrim /mnt"
    say "fstrim=ok"
    # A write in the second boot, so the host also sees a filesystem that
    # was mounted, changed and unmounted twice.
    echo "second boot" >/mnt/phase2.txt || fail "writing phase2.txt"
    sync
    umount /mnt || fail "umount /mnt"
    blockdev --flushbufs /dev/vda || fail "flushing /dev/vda"
    say "phase2_write=ok"
}

# Phase 3: raw writes while the host migrates the disk's LUN to another
# gateway. Block 256+i (4 KiB, direct I/O, each write flushed) gets
# "LGSEQ i" for i < WRITES; after the first 20 the guest says so, so the
# host starts the migration while it writes. Then every block is read back
# (direct I/O: from the device, not the page cache).
phase3() {
    n=${WRITES:-300}
    i=0
    while [ "$i" -lt "$n" ]; do
        printf 'LGSEQ %08d\n' "$i" \
            | dd of=/dev/vda bs=4096 count=1 seek=$((256 + i)) conv=sync,notrunc,fsync oflag=direct 2>/dev/null \
            || fail "write of block $((256 + i))"
        i=$((i + 1))
        [ "$i" = 20 ] && say "writing=1"
    done
    say "written=$n"
    i=0
    while [ "$i" -lt "$n" ]; do
        got=$(dd if=/dev/vda bs=4096 count=1 skip=$((256 + i)) iflag=direct 2>/dev/null | head -c 14)
        want=$(printf 'LGSEQ %08d' "$i")
        [ "$got" = "$want" ] || fail "block $((256 + i)) reads '$got', not '$want'"
        i=$((i + 1))
    done
    say "verified=$n"
}

case "$PHASE" in
    1) phase1 ;;
    2) phase2 ;;
    3) phase3 ;;
    *) fail "unknown phase $PHASE" ;;
esac

say "done=$PHASE"
sync
poweroff -f
while :; do sleep 1; done
