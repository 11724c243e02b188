#!/usr/bin/env bash
# Make a real Linux memory image for kscope's Linux colorer, with the guest's own ground truth.
#
#   colorer/linux/make-image.sh [--kernel latest|oldest|PACKAGE] [--workload files|anon]
#                               [--mem MIB] [--out DIR]
#
# Boots a Debian cloud kernel (linux-image-*-cloud-amd64, fetched with `apt-get download` and
# unpacked, never installed) under qemu's software emulation (TCG: Linux does not run under
# KVM on PVM hosts), with a busybox initramfs and an ext4 data disk (data files, static and
# dynamic executables, shared libraries). The workload fills the page cache and runs
# processes with code, heap, stack and file mappings. Then `ktruth` reads the ground truth
# inside the guest (/proc/kpageflags, /proc/PID/maps + pagemap, /proc/iomem, page cache of
# every file) onto a second disk, and the host takes an ELF memory image with
# `dump-guest-memory` (the `vmcoreinfo` device makes it carry VMCOREINFO).
#
# Output (cached; rebuilt only if missing or if this script or its C sources changed):
#   DIR/image.elf   the memory image     DIR/truth.bin  the ground truth (format: ktruth.c)
#   DIR/console.log the guest console    DIR/kernel     the kernel package name
# Default DIR: ${KSCOPE_LINUX_CACHE:-$HOME/.cache/kscope/linux}/<package>-<workload>-<mem>M.
# Prints DIR on the last line of stdout. Needs root for apt-get only if packages are missing.
# Exit status 3: a package or the kernel could not be installed/fetched (callers may skip);
# 4: the guest failed; 2: bad arguments.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
kernel=latest
workload=files
mem=256
out=
while [ $# -gt 0 ]; do
    case $1 in
    --kernel) kernel=$2; shift 2 ;;
    --workload) workload=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "make-image.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
case $workload in files | anon) ;; *) echo "make-image.sh: workload must be files or anon" >&2; exit 2 ;; esac

log() { echo "make-image: $*" >&2; }
cache=${KSCOPE_LINUX_CACHE:-$HOME/.cache/kscope/linux}
mkdir -p "$cache"
# One image build at a time per cache (tests run in parallel).
exec 8>"$cache/.lock"
flock 8

apt_updated=
need_pkg() { # need_pkg COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing $2 (for $1)"
    if [ -z "$apt_updated" ] && ! apt-cache show "$2" >/dev/null 2>&1; then
        apt-get update -qq >&2; apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >&2 ||
        { log "cannot install $2 (root and a Debian apt source are needed)"; exit 3; }
}
need_pkg qemu-system-x86_64 qemu-system-x86
need_pkg gcc gcc
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need_pkg /nonexistent/libc.a libc6-dev
need_pkg cpio cpio
need_pkg mkfs.ext4 e2fsprogs
if ! [ -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then
    log "installing busybox-static"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox-static >&2 ||
        { log "cannot install busybox-static"; exit 3; }
fi

# Resolve the kernel package.
if [ "$kernel" = latest ] || [ "$kernel" = oldest ]; then
    list=$(apt-cache search --names-only '^linux-image-[0-9.]+-[0-9]+-cloud-amd64$' | awk '{print $1}' | sort -V)
    if [ -z "$list" ] && [ -z "$apt_updated" ]; then
        apt-get update -qq >&2; apt_updated=1
        list=$(apt-cache search --names-only '^linux-image-[0-9.]+-[0-9]+-cloud-amd64$' | awk '{print $1}' | sort -V)
    fi
    [ -n "$list" ] || { log "no linux-image-*-cloud-amd64 package in the apt sources"; exit 3; }
    if [ "$kernel" = latest ]; then kernel=$(echo "$list" | tail -1); else kernel=$(echo "$list" | head -1); fi
fi
kdir=$cache/kernels/$kernel
if [ ! -f "$kdir/ok" ]; then
    log "fetching $kernel"
    rm -rf "$kdir"; mkdir -p "$kdir/deb"
    (cd "$kdir" && apt-get download "$kernel" >&2) || { log "apt-get download $kernel failed"; exit 3; }
    dpkg-deb -x "$kdir"/*.deb "$kdir/deb"
    rm -f "$kdir"/*.deb
    touch "$kdir/ok"
fi
vmlinuz=$(ls "$kdir"/deb/boot/vmlinuz-*)
moddir=$(ls -d "$kdir"/deb/lib/modules/*)

stamp=$(cat "$0" "$here/ktruth.c" "$here/kwork.c" | sha256sum | cut -c1-16)
[ -n "$out" ] || out=$cache/$kernel-$workload-${mem}M
if [ -f "$out/image.elf" ] && [ -f "$out/truth.bin" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
    log "cached: $out"
    echo "$out"
    exit 0
fi
rm -rf "$out"; mkdir -p "$out"
work=$out/build; mkdir -p "$work"

log "building ktruth and kwork (static)"
gcc -O2 -static -o "$work/ktruth" "$here/ktruth.c"
gcc -O2 -static -o "$work/kwork" "$here/kwork.c"

log "building the initramfs"
ird=$work/initramfs; mkdir -p "$ird"/{bin,dev,proc,sys,mnt,tmp,lib/mod}
cp /bin/busybox "$ird/bin/busybox"
cp "$work/ktruth" "$ird/bin/ktruth"
for m in virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk qemu_fw_cfg; do
    f=$(find "$moddir" -name "$m.ko*" | head -1)
    [ -n "$f" ] || { log "module $m not in $kernel"; exit 3; }
    cp "$f" "$ird/lib/mod/"
done
cat >"$ird/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
# Dependency order differs between kernel builds: retry until every module is in.
for round in 1 2 3 4 5; do
    for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk qemu_fw_cfg; do
        [ -d /sys/module/$m ] || insmod /lib/mod/$m.ko* 2>/dev/null
    done
done
for m in virtio_blk qemu_fw_cfg; do [ -d /sys/module/$m ] || echo "init: module $m did not load"; done
W=files
for a in $(cat /proc/cmdline); do case $a in kscope.workload=*) W=${a#*=} ;; esac; done
mount -t ext4 /dev/vda /mnt || { echo "KSCOPE-FAIL no data disk"; poweroff -f; }
echo "init: workload $W"
if [ "$W" = files ]; then
    chroot /mnt /usr/bin/sha256sum /data/d1.bin /data/d2.bin /data/text.txt
    chroot /mnt /usr/bin/sort /data/text.txt | chroot /mnt /bin/gzip -1 > /dev/null
    /mnt/bin/kwork run 8 /mnt/data/d1.bin 1 > /tmp/kwork.1 &
    /mnt/bin/kwork run 6 /mnt/data/text.txt 2 > /tmp/kwork.2 &
    /mnt/bin/kwork run 4 /mnt/data/d3.bin 3 > /tmp/kwork.3 &
    chroot /mnt /usr/bin/sleep 100000 &
else
    chroot /mnt /usr/bin/sha256sum /data/d3.bin
    /mnt/bin/kwork run 24 /mnt/data/d3.bin 11 > /tmp/kwork.11 &
    /mnt/bin/kwork run 20 /mnt/data/d4.bin 12 > /tmp/kwork.12 &
    /mnt/bin/kwork run 16 /mnt/data/d3.bin 13 > /tmp/kwork.13 &
    /mnt/bin/kwork run 12 /mnt/data/d4.bin 14 > /tmp/kwork.14 &
    chroot /mnt /usr/bin/sleep 100000 &
fi
# wait until every kwork has built its memory
i=0
while [ $(cat /tmp/kwork.* 2>/dev/null | grep -c "kwork ready") -lt $(ls /tmp/kwork.* | wc -l) ] && [ $i -lt 600 ]; do
    sleep 1; i=$((i + 1))
done
cat /tmp/kwork.*
sleep 2
sync
echo "init: collecting ground truth"
exec /bin/ktruth /dev/vdb / /mnt
INIT
chmod +x "$ird/init"
(cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initramfs.cpio.gz"

log "building the data disk"
dd=$work/disk; mkdir -p "$dd"/{bin,usr/bin,data,lib/x86_64-linux-gnu,lib64}
cp "$work/kwork" "$dd/bin/kwork"
cp /bin/busybox "$dd/bin/busybox"
for b in /usr/bin/sha256sum /usr/bin/sort /bin/gzip /usr/bin/sleep; do
    cp "$(readlink -f $b)" "$dd/usr/bin/$(basename $b)"
    for l in $(ldd "$b" | grep -o '/[^ ]*'); do
        mkdir -p "$dd/$(dirname "$l")"
        cp -L "$l" "$dd/$l"
    done
done
ln -s ../usr/bin/gzip "$dd/bin/gzip"
"$work/kwork" gen "$dd/data/d1.bin" 16 1
"$work/kwork" gen "$dd/data/d2.bin" 12 2
"$work/kwork" gen "$dd/data/d3.bin" 8 3
"$work/kwork" gen "$dd/data/d4.bin" 8 4
"$work/kwork" text "$dd/data/text.txt" 6
mkfs.ext4 -q -F -d "$dd" "$work/data.img" 96M >&2
truncate -s 16M "$work/truth.img"

log "booting $kernel under TCG ($workload, ${mem} MiB)"
rm -f "$work/mon.in" "$work/mon.out"; mkfifo "$work/mon.in" "$work/mon.out"
qemu-system-x86_64 -machine pc -accel tcg -cpu qemu64 -smp 1 -m "${mem}M" \
    -kernel "$vmlinuz" -initrd "$work/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 kscope.workload=$workload" \
    -drive "file=$work/data.img,if=virtio,format=raw,snapshot=on" \
    -drive "file=$work/truth.img,if=virtio,format=raw" \
    -device vmcoreinfo -display none -no-reboot \
    -serial "file:$out/console.log" -monitor "pipe:$work/mon" &
qpid=$!
exec 9>"$work/mon.in"
cat "$work/mon.out" >"$work/monitor.log" &
catpid=$!
deadline=$((SECONDS + ${KSCOPE_LINUX_BOOT_TIMEOUT:-600}))
until grep -q KSCOPE-TRUTH-READY "$out/console.log" 2>/dev/null; do
    if ! kill -0 $qpid 2>/dev/null || grep -q KSCOPE-FAIL "$out/console.log" 2>/dev/null || [ $SECONDS -gt $deadline ]; then
        log "the guest did not reach KSCOPE-TRUTH-READY; console:"; tail -30 "$out/console.log" >&2
        kill $qpid 2>/dev/null || true; exit 4
    fi
    sleep 1
done
log "guest ready after ${SECONDS}s: $(grep KSCOPE-TRUTH-READY "$out/console.log")"
echo "stop" >&9
echo "dump-guest-memory $out/image.elf" >&9
echo "quit" >&9
exec 9>&-
wait $qpid || true
kill $catpid 2>/dev/null || true
[ -s "$out/image.elf" ] || { log "dump-guest-memory wrote nothing; monitor:"; cat "$work/monitor.log" >&2; exit 4; }
cp "$work/truth.img" "$out/truth.bin"
echo "$kernel" >"$out/kernel"
rm -rf "$work/initramfs" "$work/disk" "$work/data.img" "$work/truth.img"
echo "$stamp" >"$out/stamp"
log "image $(du -h "$out/image.elf" | cut -f1) in $out (${SECONDS}s)"
echo "$out"
