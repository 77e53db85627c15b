#if canImport(Glibc)
import Glibc
#endif
import Foundation
import LinuxMM
import Synchronization

/// Every file a run makes for itself (the children's specs, outputs and logs, a page source's
/// socket and log, a snapshot file) lives under one directory per run and file system:
/// `BASE/memlab-run-PID-START`, named after the runner (its pid and /proc start time). The
/// runner removes its directories when it ends, the signal path before it exits, and any
/// memlab that starts removes those whose runner is gone (SIGKILL, power loss). Nothing is
/// left behind.
public enum RunDirectory {
    static let prefix = "memlab-run-"

    /// The runner the directories belong to: this process, or — in a repetition's child —
    /// the runner that started it (set from the child's spec).
    private static let ownerTag = Lock<String?>(nil)

    public static var owner: String {
        ownerTag.withLock { tag in
            if let tag { return tag }
            let start = (try? ProcStat.read(pid: getpid()))?.startTimeTicks ?? 0
            let t = "\(getpid())-\(start)"
            tag = t
            return t
        }
    }

    /// Makes this run's files belong to `tag` (a runner's "PID-START").
    public static func adopt(owner tag: String) {
        guard parse(tag) != nil else { return }
        ownerTag.withLock { $0 = tag }
    }

    /// The bases run directories may live under: the temporary directory, and the two others
    /// a scenario may pick for a file (the disk's /var/tmp, memory's /dev/shm).
    public static var bases: [String] {
        var out: [String] = []
        let tmp = ProcessInfo.processInfo.environment["TMPDIR"].map { $0.hasSuffix("/") && $0.count > 1 ? String($0.dropLast()) : $0 }
        for b in [tmp, "/tmp", "/var/tmp", "/dev/shm"].compactMap({ $0 }) where !b.isEmpty && !out.contains(b) { out.append(b) }
        return out
    }

    /// This run's directory under `base` (default: the temporary directory), made on first use
    /// (mode 0700: other users have no business in it).
    public static func make(base: String? = nil) throws(SystemError) -> String {
        let dir = "\(base ?? bases[0])/\(prefix)\(owner)"
        if mkdir(dir, 0o700) != 0 && errno != EEXIST { throw SystemError.current("mkdir", path: dir) }
        var st = stat()
        if lstat(dir, &st) != 0 { throw SystemError.current("lstat", path: dir) }
        // Someone else's file by that name (a guess at our pid in /tmp) is not ours to use.
        if (st.st_mode & S_IFMT) != S_IFDIR || st.st_uid != geteuid() {
            throw SystemError(errno: EEXIST, call: "a run directory that is not ours", path: dir)
        }
        return dir
    }

    /// Removes this runner's directories (call as the runner ends).
    public static func removeOwn() {
        for base in bases { removeTree("\(base)/\(prefix)\(owner)") }
    }

    /// Removes run directories whose runner is gone; returns what was removed.
    @discardableResult
    public static func sweepStale() -> [String] {
        var removed: [String] = []
        for base in bases {
            for name in ProcFile.list(base) where name.hasPrefix(prefix) {
                guard let (pid, start) = parse(String(name.dropFirst(prefix.count))) else { continue }
                if ProcessRecord(pid: pid, start: start).isAlive { continue }
                let path = "\(base)/\(name)"
                var st = stat()
                // Only real directories of our own user: never follow a link someone planted.
                guard lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR, st.st_uid == geteuid() else { continue }
                removeTree(path)
                if !ProcFile.exists(path) { removed.append(path) }
            }
        }
        return removed
    }

    static func parse(_ tag: String) -> (Int32, UInt64)? {
        let parts = tag.split(separator: "-")
        guard parts.count == 2, let pid = Int32(parts[0]), pid > 0, let start = UInt64(parts[1]) else { return nil }
        return (pid, start)
    }

    /// rm -r without following links.
    static func removeTree(_ path: String) {
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        if (st.st_mode & S_IFMT) == S_IFDIR {
            for name in ProcFile.list(path) { removeTree("\(path)/\(name)") }
            rmdir(path)
        } else {
            unlink(path)
        }
    }
}
