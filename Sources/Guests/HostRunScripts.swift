/// The two scripts of a `memlab run --guest` guest (the image's `/init` and `/guest-run.sh`).
///
/// `/init` (busybox, PID 1) loads the modules for 9p and the scratch disk, mounts the host's
/// root read-only over 9p at /host and makes it PID 1's root with `exec chroot`: PID 1 shares
/// its fs_struct with kthreadd, so the kernel's own helpers (module autoloading through
/// /sbin/modprobe) then run in the host's tree too, with its /lib/modules for this kernel.
/// `/guest-run.sh` (the host's /bin/sh, still PID 1) gives that tree what a booted system has —
/// /proc, /sys, /dev, tmpfs where it is written, the job directory (9p, read-write), the
/// state directory on the scratch disk (swap files need a block device's filesystem) and the
/// memory cgroup asked for — runs `memlab _guest-run`, and powers the guest off.
///
/// The console lines that start with `memlab-guest:` are the host's to read (GuestRunner):
/// "ready", "unusable: WHY" (this kernel cannot do it: the runs are skipped with WHY),
/// "running", "progress N LABEL" (from memlab), "memlab ended (STATUS)".
enum HostRunScripts {
    static let hostTag = "memlab-host"
    static let jobTag = "memlab-job"
    /// Where the job directory sits inside the guest.
    static let jobMount = "/run/memlab-job"
    static let prefix = "memlab-guest:"

    static func initScript(modules: [String]) -> String {
        GuestImage.initPrologue(modules: modules) + """
        if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose \(hostTag) /host; then
          echo "\(prefix) unusable: kernel $(uname -r) cannot mount the host's filesystem over 9p (it needs CONFIG_9P_FS and CONFIG_NET_9P_VIRTIO, built in or as modules on the host under /lib/modules/$(uname -r))"
          echo o > /proc/sysrq-trigger; sleep 30; poweroff -f
        fi
        exec chroot /host /bin/sh -c "$(cat /guest-run.sh)"
        """
    }

    static let runScript = """
        export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
        say() { echo "\(prefix) $*"; }
        off() { sync; echo o > /proc/sysrq-trigger; sleep 30; }
        mount -t proc proc /proc && mount -t sysfs sys /sys && mount -t devtmpfs dev /dev || { say "unusable: cannot mount /proc, /sys and /dev in the host's tree"; off; }
        mkdir -p /dev/pts /dev/shm
        mount -t devpts devpts /dev/pts
        mount -t tmpfs -o mode=0755 tmpfs /run && mount -t tmpfs -o mode=1777 tmpfs /dev/shm || say "cannot mount a tmpfs on /run or /dev/shm"
        mkdir -p \(jobMount)
        mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 \(jobTag) \(jobMount) || { say "unusable: cannot mount the job directory over 9p"; off; }
        . \(jobMount)/guest.env
        # A kernel unpacked from its package has its modules beside it, not in the host's
        # /lib/modules: laid over it (read-only overlay) before anything autoloads a module.
        if [ -n "${MEMLAB_MODULES:-}" ] && [ ! -d /lib/modules/$(uname -r) ]; then
          mount -t overlay overlay -o lowerdir=/lib/modules:"${MEMLAB_MODULES%/*}" /lib/modules || say "cannot show the modules in $MEMLAB_MODULES under /lib/modules: modules this kernel autoloads are missing"
        fi
        # /tmp, /var/tmp and /root keep the host's files (memlab itself may live there: a
        # clone in /tmp) under a writable tmpfs layer: overlayfs, the host's tree below.
        for d in /tmp /var/tmp /root; do
          mkdir -p /run/memlab-overlay$d/upper /run/memlab-overlay$d/work
          mount -t overlay overlay -o lowerdir=$d,upperdir=/run/memlab-overlay$d/upper,workdir=/run/memlab-overlay$d/work $d \\
            || { mount -t tmpfs -o mode=1777 tmpfs "$d" && say "no overlayfs: $d is an empty tmpfs"; }
        done
        if [ -b /dev/vda ] && mkfs.ext4 -q -F -O ^has_journal -E nodiscard,lazy_itable_init=1 /dev/vda && mount -t ext4 /dev/vda /var/lib/memlab; then
          :
        else
          mount -t tmpfs -o mode=0755 tmpfs /var/lib/memlab; say "no scratch disk: swap areas cannot be made here"
        fi
        case "$MEMLAB_CGROUP" in
          v2) mount -t cgroup2 cgroup2 /sys/fs/cgroup || say "cannot mount cgroup2" ;;
          v1) { mount -t tmpfs -o mode=0755 cgroup /sys/fs/cgroup && mkdir /sys/fs/cgroup/memory && mount -t cgroup -o memory memory /sys/fs/cgroup/memory; } || say "cannot mount the cgroup v1 memory controller" ;;
        esac
        [ -x "$MEMLAB_BIN" ] || { say "error: $MEMLAB_BIN is not visible in the guest (its directory is covered by one of the guest's own mounts)"; off; }
        say "running uptime $(cut -d' ' -f1 /proc/uptime)"
        "$MEMLAB_BIN" _guest-run --job \(jobMount) </dev/null
        say "memlab ended ($?)"
        umount \(jobMount)
        off
        """
}
