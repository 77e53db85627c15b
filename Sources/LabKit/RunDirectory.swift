#if canImport(Glibc)
import Glibc
#endif
import Foundation
import LinuxMM

/// Every file a run makes for itself (the children's specs, outputs and logs, a page source's
/// socket and log, a snapshot file) lives under one directory per run and file system:
/// `BASE/memlab-run-PID-START.XXXXXX`, named after the runner (its pid and /proc start time)
/// with a random suffix (mkdtemp), mode 0700, so nobody can guess the name ahead of a run or
/// slip a file or a link into it. The runner removes its directories when it ends, the signal
/// path before it exits, and any memlab that starts removes those whose runner is gone
/// (SIGKILL, power loss). Nothing is left behind.
public enum RunDirectory {
    static let prefix = "memlab-run-"

    /// The runner the directories belong to: this process, or — in a repetition's child —
    /// the runner that started it (set from the child's spec).
    private static let ownerTag = Lock<String?>(nil)
    /// The directories made or found so far, by base.
    private static let made = Lock<[String: String]>([:])

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

    /// This run's directory under `base` (default: the temporary directory): the one this
    /// run already has there — ours by owner, uid and mode, never a look-alike someone else
    /// made — or a new one.
    public static func make(base: String? = nil) throws(SystemError) -> String {
        let b = base ?? bases[0]
        let tag = owner
        return try made.withLock { (m) throws(SystemError) -> String in
            if let d = m[b], isOurs(d) { return d }
            for name in ProcFile.list(b) where name.hasPrefix("\(prefix)\(tag).") && isOurs("\(b)/\(name)") {
                m[b] = "\(b)/\(name)"
                return "\(b)/\(name)"
            }
            var template = Array("\(b)/\(prefix)\(tag).XXXXXX".utf8CString)
            guard let p = mkdtemp(&template) else { throw SystemError.current("mkdtemp", path: "\(b)/\(prefix)\(tag).XXXXXX") }
            let d = String(cString: p)
            m[b] = d
            return d
        }
    }

    /// A real directory (not a link) of this user's, mode 0700.
    static func isOurs(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR && st.st_uid == geteuid() && st.st_mode & 0o077 == 0
    }

    /// Removes this runner's directories (call as the runner ends).
    public static func removeOwn() {
        let tag = owner
        for base in bases {
            for name in ProcFile.list(base) where name.hasPrefix("\(prefix)\(tag).") && isOurs("\(base)/\(name)") {
                // A guest a repetition's child started is gone before memlab is (it dies
                // with the child, but a SIGKILLed QEMU takes a moment to exit).
                let records = processRecords(in: "\(base)/\(name)")
                _ = SettingsGuard.killAndWait(records)
                // Reaped here when it is ours (the signal path made this process a subreaper).
                for r in records { var st: Int32 = 0; _ = waitpid(r.pid, &st, WNOHANG) }
                removeTree("\(base)/\(name)")
            }
        }
        made.withLock { $0 = [:] }
    }

    /// Removes run directories whose runner is gone; returns what was removed.
    @discardableResult
    public static func sweepStale() -> [String] {
        var removed: [String] = []
        for base in bases {
            for name in ProcFile.list(base) where name.hasPrefix(prefix) {
                let rest = name.dropFirst(prefix.count)
                guard let dot = rest.lastIndex(of: "."), let (pid, start) = parse(String(rest[..<dot])) else { continue }
                if ProcessRecord(pid: pid, start: start).isAlive { continue }
                let path = "\(base)/\(name)"
                // Only real directories of our own user: never follow a link someone planted.
                guard isOurs(path) else { continue }
                // A process the dead run started (a QEMU guest) dies before its files go.
                _ = SettingsGuard.killAndWait(processRecords(in: path))
                removeTree(path)
                if !ProcFile.exists(path) { removed.append(path) }
            }
        }
        return removed
    }

    /// Names `pid` in this run's directory (`proc-PID-START`): whichever memlab next finds
    /// the run dead kills it before removing the directory. For what a repetition's child
    /// starts (a guest), which the runner's journal does not see; the child removes the
    /// record once it has reaped the process.
    /// Only inside a run (its directory already made): outside one (a test, a one-off tool)
    /// nothing would sweep a directory made here.
    public static func recordProcess(_ pid: pid_t) -> String? {
        let existing = made.withLock { $0[bases[0]] }
        guard let dir = existing, isOurs(dir), let start = (try? ProcStat.read(pid: pid))?.startTimeTicks else { return nil }
        let path = "\(dir)/proc-\(pid)-\(start)"
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return nil }
        close(fd)
        return path
    }

    static func processRecords(in dir: String) -> [ProcessRecord] {
        ProcFile.list(dir).compactMap { name in
            guard name.hasPrefix("proc-"), let (pid, start) = parse(String(name.dropFirst(5))) else { return nil }
            return ProcessRecord(pid: pid, start: start)
        }
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
