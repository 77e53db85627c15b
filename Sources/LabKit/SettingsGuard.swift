#if canImport(Glibc)
import Glibc
#endif
import Foundation
import LinuxMM
import Synchronization

/// A process a memlab started (a repetition's child), recorded so that whoever restores a dead
/// memlab's settings first makes sure it is gone: a child still holding a hugetlb page or a
/// cgroup would make the restore fail half-way.
public struct ProcessRecord: Codable, Sendable, Equatable {
    public var pid: Int32
    /// /proc/PID/stat start time, so a reused pid is never taken for it.
    public var start: UInt64
    public init(pid: Int32, start: UInt64) {
        self.pid = pid
        self.start = start
    }
    public var isAlive: Bool {
        guard let stat = try? ProcStat.read(pid: pid) else { return false }
        return stat.startTimeTicks == start && stat.state != "Z" && stat.state != "X"
    }
}

/// The journal of borrowed machine-wide settings: written (and fsync'd) *before* the first
/// change, so that whoever finds it after a crash knows what to give back.
public struct Journal: Codable, Sendable, Equatable {
    public struct Entry: Codable, Sendable, Equatable {
        public var path: String
        public var original: String
        public var value: String
    }
    public var ownerPID: Int32
    /// /proc/PID/stat start time of the owner, so a reused pid is not mistaken for it.
    public var ownerStart: UInt64
    public var command: String
    public var entries: [Entry] = []
    /// Directories memlab created (memory cgroups), removed on restore.
    public var createdDirectories: [String] = []
    /// Files memlab created (swap files), unlinked on restore. Optional: absent in journals
    /// written before these existed.
    public var createdFiles: [String]?
    /// zram devices memlab added (hot_add), reset and removed on restore.
    public var zramDevices: [Int]?
    /// Swap areas memlab activated, swapped off on restore (before their file or device goes).
    public var swapAreas: [String]?
    /// tmpfs mounts memlab made (their mount points, directories it created beside the
    /// journal): unmounted and removed on restore. Optional: absent in older journals.
    public var mounts: [String]?
    /// cgroup v2 subtree_control files memlab wrote "+CONTROLLER" to ("path|memory"),
    /// given back with "-CONTROLLER" after the cgroups under them are removed.
    public var enabledControllers: [String]?
    /// DAMON kdamonds memlab added (their directories, …/kdamonds/N): turned off and removed
    /// (nr_kdamonds written back to N) on restore, before the swap areas go.
    public var kdamonds: [String]?
    /// Children running when the journal was last written: killed and waited for before a
    /// recovery restores anything.
    public var processes: [ProcessRecord]?
    /// Pids of earlier owners whose journal this one took over (their recovery failed).
    public var adoptedFrom: [Int32]?
    /// /proc/sys/kernel/random/boot_id when written: after a reboot the knobs, swap areas,
    /// zram devices and cgroups it names went with the old boot, and only its files remain.
    public var bootID: String?

    enum CodingKeys: String, CodingKey {
        case entries, command, processes
        case ownerPID = "owner_pid"
        case ownerStart = "owner_start"
        case createdDirectories = "created_directories"
        case createdFiles = "created_files"
        case zramDevices = "zram_devices"
        case swapAreas = "swap_areas"
        case mounts
        case enabledControllers = "enabled_controllers"
        case adoptedFrom = "adopted_from"
        case kdamonds
        case bootID = "boot_id"
    }

    public var ownerIsAlive: Bool {
        guard kill(ownerPID, 0) == 0 || errno == EPERM else { return false }
        return ProcessRecord(pid: ownerPID, start: ownerStart).isAlive
    }

    /// Written by this very process: same pid *and* start time (a pid alone recurs, e.g. as 1
    /// in every container).
    public var ownedByThisProcess: Bool {
        ownerPID == getpid() && ownerStart == SettingsGuard.ownStart
    }

    public static var currentBootID: String? {
        ProcFile.readIfPresent("/proc/sys/kernel/random/boot_id")?.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Nothing to give back.
    var isEmpty: Bool {
        entries.isEmpty && createdDirectories.isEmpty && (createdFiles ?? []).isEmpty && (zramDevices ?? []).isEmpty
            && (swapAreas ?? []).isEmpty && (enabledControllers ?? []).isEmpty && (kdamonds ?? []).isEmpty && (mounts ?? []).isEmpty
    }

    /// A journal found on disk names paths that root will write or remove. One that asks for
    /// anything outside what memlab borrows — the knobs of `WatchedSettings`, its own
    /// memlab-* cgroups and their parents' subtree_control, swap files beside the journal,
    /// zram devices — was not written by memlab and is refused, not followed.
    func untrustedPath(stateDirectory: String) -> String? {
        func under(_ p: String, _ roots: [String]) -> Bool {
            !p.contains("/../") && !p.contains("/./") && !p.hasSuffix("/..") && roots.contains { p.hasPrefix($0) }
        }
        if let e = entries.first(where: { !WatchedSettings.watches($0.path) }) { return e.path }
        if let d = createdDirectories.first(where: { !under($0, ["/sys/fs/cgroup/"]) || !AtomicFile.basename(of: $0).hasPrefix("memlab-") }) { return d }
        if let f = (createdFiles ?? []).first(where: { !under($0, [stateDirectory + "/"]) }) { return f }
        if let s = (swapAreas ?? []).first(where: { !under($0, [stateDirectory + "/", "/dev/zram"]) }) { return s }
        if let m = (mounts ?? []).first(where: { !under($0, [stateDirectory + "/"]) || !AtomicFile.basename(of: $0).hasPrefix("memlab-tmpfs-") }) { return m }
        if let c = (enabledControllers ?? []).first(where: { !under($0, ["/sys/fs/cgroup/"]) || !$0.hasSuffix("/cgroup.subtree_control|memory") }) { return c }
        if let k = (kdamonds ?? []).first(where: { Journal.kdamondIndex($0) == nil }) { return k }
        return nil
    }

    /// N of a kdamond directory \(Damon.kdamonds)/N, or nil for any other path.
    static func kdamondIndex(_ dir: String) -> Int? {
        let prefix = Damon.kdamonds + "/"
        guard dir.hasPrefix(prefix) else { return nil }
        let rest = dir.dropFirst(prefix.count)
        guard !rest.isEmpty, rest.count <= 4, rest.allSatisfy({ $0 >= "0" && $0 <= "9" }) else { return nil }
        return Int(rest)
    }
}

/// What a restore did.
public struct RestoreReport: Sendable {
    public var changed: [String: SettingChange] = [:]
    public var restoredLines: [String] = []
    public var failures: [String] = []
    public var restored: Bool { failures.isEmpty }
}

/// Why the settings guard did not borrow something. A system call the kernel failed keeps
/// its errno (`system`); everything else is a case of its own, never a made-up errno.
public enum GuardError: Error, CustomStringConvertible, Sendable, Equatable {
    /// A system call failed, with the errno the kernel gave.
    case system(SystemError)
    /// The kernel took the write but the knob reads back otherwise: nothing failed, the
    /// kernel did less than asked (a hugetlb pool that could not grow that far).
    case readBack(knob: String, wrote: String, read: String)
    /// A knob outside `WatchedSettings`: borrowing it is refused.
    case notWatched(knob: String)
    /// memlab is stopping (a signal): nothing more is borrowed.
    case stopping(reason: String)
    /// A journal in the state directory this guard will not write over: unreadable, or a
    /// live memlab's. `why` says which.
    case journalInTheWay(path: String, why: String)
    /// The journal could not be encoded.
    case journalEncoding(String)

    /// The kernel's errno, where a system call failed.
    public var errno: Int32? {
        if case .system(let e) = self { return e.errno }
        return nil
    }

    /// What the kernel did instead of what was asked, for `readBack` (without the knob's path).
    public var shortfall: String? {
        guard case .readBack(let knob, let wrote, let read) = self else { return nil }
        return "the kernel accepted '\(wrote)' but reads back '\(read)'"
            + (knob.contains("hugepages") ? ": the pool could not grow that far (not enough free, contiguous memory)" : "")
    }

    public var description: String {
        switch self {
        case .system(let e): return e.description
        case .readBack(let knob, _, _): return "\(shortfall ?? "") (\(knob))"
        case .notWatched(let knob): return "\(knob): borrowing a setting memlab does not watch is refused (add it to WatchedSettings)"
        case .stopping(let reason): return "nothing more is borrowed: memlab is stopping (\(reason))"
        case .journalInTheWay(_, let why): return why
        case .journalEncoding(let why): return "cannot encode the settings journal: \(why)"
        }
    }
}

/// A system call's failure as the guard's error, its errno kept.
private func system<T>(_ body: () throws(SystemError) -> T) throws(GuardError) -> T {
    do { return try body() } catch { throw .system(error) }
}

/// Borrows machine-wide knobs and gives them back: journal first, restore always — on normal
/// exit, on error, on SIGINT/SIGTERM/SIGHUP (see SignalCleanup), and, after a SIGKILL, on the
/// next memlab start (`recoverStale`). One flock, at a fixed path, keeps two memlab processes
/// from changing knobs at once; every journal is registered in one fixed, root-only place, so
/// the next start finds it whatever `$MEMLAB_STATE_DIR` the dead run had.
public final class SettingsGuard: Sendable {
    public let stateDirectory: String
    public var journalPath: String { "\(stateDirectory)/journal.json" }

    /// The lock is machine-wide and fixed: the knobs it protects are the machine's, so no
    /// environment variable may give two memlabs two locks (one would journal the other's
    /// borrowed value as "original").
    public static var lockPath: String {
        var st = stat()
        return stat("/run", &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR ? "/run/memlab.lock" : "/var/lib/memlab/lock"
    }
    public var lockPath: String { Self.lockPath }

    /// Where every journal is registered (one small file per journal naming its path): fixed,
    /// root-only, on disk (swap files a dead run made outlive a reboot).
    public static let registryDirectory = "/var/lib/memlab/journals"

    private struct State {
        var journal: Journal?
        /// Set once memlab is stopping (a signal): nothing more may be borrowed.
        var sealed: String?
        /// Children running now; written into the journal with its next write.
        var processes: [ProcessRecord] = []
    }
    private let state = Lock(State())
    private let lockFD: Lock<Int32> = Lock(-1)
    private let command: String

    /// This process's start time (/proc/self/stat), what journals record beside the pid.
    static let ownStart: UInt64 = (try? ProcStat.read(pid: getpid()))?.startTimeTicks ?? 0

    /// A journal file as found: absent, or read and decoded, or not to be followed (and why).
    enum JournalFile {
        case absent
        case loaded(Journal)
        case unreadable(String)
    }

    /// Reads a journal without trusting it: no link is followed, a FIFO does not block, only
    /// a regular file up to 1 MiB is read — from the descriptor that was checked, so it cannot
    /// be swapped in between — and, as root, only one owned by root and writable by no one
    /// else that names nothing memlab never borrows.
    static func loadJournal(_ path: String) -> JournalFile {
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        if fd < 0 {
            if errno == ENOENT || errno == ENOTDIR { return .absent }
            if errno == ELOOP { return .unreadable("the settings journal at \(path) is a symbolic link; not following it — inspect and remove it") }
            return .unreadable("a settings journal exists at \(path) but cannot be opened (\(SystemError.current("open").errnoName)); run `memlab restore` as root")
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else {
            return .unreadable("the settings journal at \(path) is not a regular file; not following it — inspect and remove it")
        }
        if geteuid() == 0 && (st.st_uid != 0 || st.st_mode & 0o022 != 0) {
            return .unreadable("the settings journal at \(path) is not root's own (owner uid \(st.st_uid), mode \(String(st.st_mode & 0o777, radix: 8))); not following it — inspect and remove it")
        }
        let limit = 1 << 20
        guard st.st_size <= limit else { return .unreadable("the settings journal at \(path) is \(st.st_size) bytes; a journal is far smaller — inspect and remove it") }
        var bytes = [UInt8](repeating: 0, count: Int(st.st_size) + 1)
        var got = 0
        while got < bytes.count {
            let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress! + got, $0.count - got) }
            if n < 0 { if errno == EINTR { continue }; return .unreadable("cannot read the settings journal at \(path) (\(SystemError.current("read").errnoName))") }
            if n == 0 { break }
            got += n
        }
        guard got <= limit, let j = try? JSONDecoder().decode(Journal.self, from: Data(bytes[..<got])) else {
            return .unreadable("the settings journal at \(path) is malformed; inspect it and restore by hand, then remove it")
        }
        if geteuid() == 0, let bad = j.untrustedPath(stateDirectory: AtomicFile.directory(of: path)) {
            return .unreadable("the settings journal at \(path) names \(bad), which memlab never borrows; not following it — inspect and remove it")
        }
        return .loaded(j)
    }

    public static var defaultStateDirectory: String {
        ProcessInfo.processInfo.environment["MEMLAB_STATE_DIR"] ?? "/var/lib/memlab"
    }

    public init(stateDirectory: String = SettingsGuard.defaultStateDirectory, command: String = CommandLine.arguments.joined(separator: " ")) {
        self.stateDirectory = SettingsGuard.absolute(stateDirectory)
        self.command = command
    }

    /// The registry records absolute paths: a relative state directory is resolved against
    /// the working directory now.
    static func absolute(_ path: String) -> String {
        var p = path.isEmpty ? "." : path
        if !p.hasPrefix("/") { p = FileManager.default.currentDirectoryPath + "/" + p }
        var parts: [Substring] = []
        for c in p.split(separator: "/") where c != "." {
            if c == ".." { if !parts.isEmpty { parts.removeLast() } } else { parts.append(c) }
        }
        return "/" + parts.joined(separator: "/")
    }

    // MARK: lock

    public enum LockError: Error, CustomStringConvertible {
        case busy(owner: String)
        case system(SystemError)
        public var description: String {
            switch self {
            case .busy(let owner): return "another memlab is changing machine-wide settings: \(owner); wait for it or run without --no-wait"
            case .system(let e): return "cannot take the settings lock: \(e)"
            }
        }
    }

    /// Takes the settings lock. If another memlab holds it, says for whom and waits, or with
    /// `wait: false` fails at once.
    public func acquireLock(wait: Bool, say: (String) -> Void) throws(LockError) {
        if lockFD.withLock({ $0 }) >= 0 { return }
        let path = lockPath
        do { try SettingsGuard.makeDirectory(AtomicFile.directory(of: path), mode: 0o755) } catch { throw .system(error) }
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        if fd < 0 { throw .system(SystemError.current("open", path: path)) }
        if flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let owner = (ProcFile.readIfPresent(path) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
            let who = owner.isEmpty ? "unknown process" : owner
            if !wait { close(fd); throw .busy(owner: who) }
            say("memlab: waiting for the settings lock held by \(who)")
            while flock(fd, LOCK_EX) != 0 {
                if errno != EINTR { close(fd); throw .system(SystemError.current("flock", path: path)) }
            }
        }
        let info = "pid \(getpid()) (\(command))\n"
        _ = ftruncate(fd, 0)
        _ = info.withCString { pwrite(fd, $0, strlen($0), 0) }
        lockFD.withLock { $0 = fd }
    }

    public var holdsLock: Bool { lockFD.withLock { $0 } >= 0 }

    public func releaseLock() {
        lockFD.withLock { fd in
            if fd >= 0 {
                _ = ftruncate(fd, 0)
                flock(fd, LOCK_UN)
                close(fd)
                fd = -1
            }
        }
    }

    /// Creates a directory and any missing parents (`$MEMLAB_STATE_DIR` may be nested).
    public static func makeDirectory(_ dir: String, mode: mode_t) throws(SystemError) {
        var path = dir.hasPrefix("/") ? "" : "."
        for part in dir.split(separator: "/", omittingEmptySubsequences: true) {
            path += "/" + part
            if mkdir(path, mode) != 0 && errno != EEXIST {
                throw SystemError.current("mkdir", path: path)
            }
        }
    }

    // MARK: borrowing

    /// No more borrowing from now on: memlab is stopping. Whatever thread is borrowing at this
    /// moment finishes first (the state lock), and every later attempt fails with `reason`.
    public func seal(_ reason: String) {
        state.withLock { $0.sealed = reason }
    }

    public var isSealed: Bool { state.withLock { $0.sealed != nil } }

    /// The journal to extend: this run's, or a new one. A new one takes over a journal left in
    /// this state directory by a dead memlab whose recovery failed (a cgroup was still busy),
    /// so its original values are kept and given back with ours, never overwritten.
    private func current(_ s: inout State) throws(GuardError) -> Journal {
        if let reason = s.sealed { throw .stopping(reason: reason) }
        if let j = s.journal { return j }
        var j = Journal(ownerPID: getpid(), ownerStart: SettingsGuard.ownStart, command: command)
        j.bootID = Journal.currentBootID
        switch SettingsGuard.loadJournal(journalPath) {
        case .absent:
            break
        case .unreadable(let why):
            // Never overwritten: it may be the only record of what some memlab changed.
            throw .journalInTheWay(path: journalPath, why: "\(why) (memlab will not write over it)")
        case .loaded(let old) where !old.ownedByThisProcess:
            if old.ownerIsAlive {
                throw .journalInTheWay(path: journalPath, why: "\(journalPath) belongs to pid \(old.ownerPID) (\(old.command)), which is still running; use another MEMLAB_STATE_DIR")
            }
            j.entries = old.entries
            j.createdDirectories = old.createdDirectories
            j.createdFiles = old.createdFiles
            j.zramDevices = old.zramDevices
            j.swapAreas = old.swapAreas
            j.mounts = old.mounts
            j.enabledControllers = old.enabledControllers
            j.kdamonds = old.kdamonds
            j.adoptedFrom = (old.adoptedFrom ?? []) + [old.ownerPID]
            if old.bootID != nil && old.bootID != j.bootID {
                // From an earlier boot: only its files are still there to remove.
                j.entries = []; j.createdDirectories = []; j.zramDevices = nil; j.swapAreas = nil; j.enabledControllers = nil; j.kdamonds = nil
            }
        case .loaded:
            break
        }
        return j
    }

    /// Journals `change`, then (with the journal on disk) runs `act`.
    private func borrow<T>(_ change: (inout Journal) -> Bool, _ act: (inout Journal) throws(GuardError) -> T) throws(GuardError) -> T {
        try state.withLock { (s) throws(GuardError) -> T in
            var j = try current(&s)
            if change(&j) {
                j.processes = s.processes.isEmpty ? nil : s.processes
                try writeJournal(j)
            }
            s.journal = j
            var after = j
            defer { s.journal = after }
            return try act(&after)
        }
    }

    /// Sets a knob, journaling its original value first. The value is read back: a kernel
    /// that silently ignores the write is an error (`GuardError.readBack`), not a surprise in
    /// the numbers.
    public func set(_ knob: Knob, to value: String) throws(GuardError) {
        // The one list: a knob outside it would be restored by this run but refused by the
        // next start's recovery (and missed by every before/after check).
        guard WatchedSettings.watches(knob.path) else {
            throw .notWatched(knob: knob.path)
        }
        let current = try system { () throws(SystemError) in try knob.read() }
        // What writing it changes besides (advisor_mode: pages_to_scan), journaled at its
        // value now and before it, so restore gives it back after it.
        var sideEffects: [(Knob, String)] = []
        for k in knob.alsoChanges where current != value {
            guard WatchedSettings.watches(k.path) else { throw .notWatched(knob: k.path) }
            sideEffects.append((k, try system { () throws(SystemError) in try k.read() }))
        }
        try borrow({ j in
            for (k, v) in sideEffects where !j.entries.contains(where: { $0.path == k.path }) {
                j.entries.append(.init(path: k.path, original: v, value: v))
            }
            if let i = j.entries.firstIndex(where: { $0.path == knob.path }) {
                j.entries[i].value = value
                return true
            }
            if current == value { return !sideEffects.isEmpty }    // nothing to borrow
            j.entries.append(.init(path: knob.path, original: current, value: value))
            return true
        }, { (_) throws(GuardError) in
            if current == value { return }
            let readBack = try system { () throws(SystemError) in try knob.apply(value); return try knob.read() }
            if readBack != value { throw .readBack(knob: knob.path, wrote: value, read: readBack) }
        })
    }

    /// Creates a directory (a memory cgroup) that restore will remove.
    public func createDirectory(_ path: String) throws(GuardError) {
        try borrow({ j in j.createdDirectories.append(path); return true }, { (_) throws(GuardError) in
            if mkdir(path, 0o755) != 0 && errno != EEXIST { throw .system(SystemError.current("mkdir", path: path)) }
        })
    }

    /// cgroup v2: enables a controller for the children of a cgroup (writes "+NAME" to its
    /// cgroup.subtree_control), journaled first; restore writes "-NAME". Once per file per run.
    public func enableController(_ name: String, subtreeControl path: String) throws(GuardError) {
        let entry = "\(path)|\(name)"
        var already = false
        try borrow({ j in
            if (j.enabledControllers ?? []).contains(entry) { already = true; return false }
            j.enabledControllers = (j.enabledControllers ?? []) + [entry]
            return true
        }, { (_) throws(GuardError) in
            if !already { try system { () throws(SystemError) in try ProcFile.write(path, "+\(name)") } }
        })
    }

    /// Removes a directory created by `createDirectory` now (and forgets it).
    public func removeDirectory(_ path: String) throws(GuardError) {
        try state.withLock { (s) throws(GuardError) in
            if rmdir(path) != 0 && errno != ENOENT { throw .system(SystemError.current("rmdir", path: path)) }
            guard var j = s.journal else { return }
            j.createdDirectories.removeAll { $0 == path }
            try writeJournal(j)
            s.journal = j
        }
    }

    // MARK: swap areas, files, zram devices

    /// Creates a file through `make` (a swap file), journaled first so restore unlinks it.
    public func createFile(_ path: String, _ make: (String) throws(SystemError) -> Void) throws(GuardError) {
        try borrow({ j in j.createdFiles = (j.createdFiles ?? []) + [path]; return true }, { (j) throws(GuardError) in
            do throws(SystemError) { try make(path) } catch {
                // Someone else's file by that name: not ours to remove.
                if error.errno == EEXIST {
                    j.createdFiles?.removeAll { $0 == path }
                    try? writeJournal(j)
                }
                throw .system(error)
            }
        })
    }

    /// Adds a zram device (hot_add) and journals it at once; restore resets and removes it.
    /// (Its number is known only after hot_add: a crash in between leaves an empty device.)
    public func addZramDevice() throws(GuardError) -> Int {
        try borrow({ _ in true }, { (j) throws(GuardError) -> Int in
            let id = try system { () throws(SystemError) in try Zram.hotAdd() }
            j.zramDevices = (j.zramDevices ?? []) + [id]
            try writeJournal(j)
            return id
        })
    }

    /// swapon(2) of a file or device, journaled first so restore swaps it off.
    public func activateSwap(_ path: String, priority: Int = 32000) throws(GuardError) {
        try borrow({ j in j.swapAreas = (j.swapAreas ?? []) + [path]; return true }, { (_) throws(GuardError) in
            try system { () throws(SystemError) in try Swap.activate(path: path, priority: priority) }
        })
    }

    // MARK: DAMON

    /// Adds a kdamond (nr_kdamonds 0 -> 1), journaled first, and returns its index. Only where
    /// none is configured: writing nr_kdamonds rebuilds every kdamond directory (someone
    /// else's configuration would be lost), so any other count is refused with EBUSY.
    public func addKdamond() throws(GuardError) -> Int {
        let current = try system { () throws(SystemError) in try ProcFile.read(Damon.nrKdamonds) }.trimmingCharacters(in: .whitespacesAndNewlines)
        guard current == "0" else {
            throw .system(SystemError(errno: EBUSY, call: "DAMON already has \(current) kdamond(s) configured (nr_kdamonds); memlab adds one only where there are none", path: Damon.nrKdamonds))
        }
        let dir = "\(Damon.kdamonds)/0"
        try borrow({ j in j.kdamonds = (j.kdamonds ?? []) + [dir]; return true }, { (_) throws(GuardError) in
            try system { () throws(SystemError) in try ProcFile.write(Damon.nrKdamonds, "1") }
        })
        return 0
    }

    /// Turns a kdamond memlab added off (if it runs) and removes it: nr_kdamonds back to its
    /// index, the count before it was added. Already gone counts as done.
    static func removeKdamond(_ dir: String) throws(SystemError) {
        guard let index = Journal.kdamondIndex(dir) else { throw SystemError(errno: EINVAL, call: "not a kdamond directory", path: dir) }
        guard let n = Int((ProcFile.readIfPresent(Damon.nrKdamonds) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)), n > index else { return }
        let state = (ProcFile.readIfPresent("\(dir)/state") ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
        if state == "on" { try ProcFile.write("\(dir)/state", "off") }
        // The kdamond thread exits asynchronously after "off"; nr_kdamonds is EBUSY until then.
        let until = Clock.nanoseconds() &+ 5_000_000_000
        while true {
            do throws(SystemError) { try ProcFile.write(Damon.nrKdamonds, String(index)); return } catch {
                if error.errno != EBUSY || Clock.nanoseconds() > until { throw error }
                Clock.sleep(nanoseconds: 20_000_000)
            }
        }
    }

    // MARK: mounts

    /// Mounts a tmpfs at `path` (a directory it creates) with `options` (e.g. "huge=always,
    /// size=64m"), journaled first, so restore unmounts it and removes the directory — after
    /// the run, on signals, and by the next start after a crash. `path` must lie in the state
    /// directory and be named memlab-tmpfs-*.
    public func mountTmpfs(at path: String, options: String) throws(GuardError) {
        try borrow({ j in j.mounts = (j.mounts ?? []) + [path]; return true }, { (j) throws(GuardError) in
            if mkdir(path, 0o700) != 0 {
                let e = SystemError.current("mkdir", path: path)
                if e.errno == EEXIST { j.mounts?.removeAll { $0 == path }; try? writeJournal(j) }
                throw .system(e)
            }
            if mount("tmpfs", path, "tmpfs", 0, options) != 0 {
                let e = SystemError.current("mount(tmpfs, \(options))", path: path)
                rmdir(path)
                j.mounts?.removeAll { $0 == path }
                try? writeJournal(j)
                throw .system(e)
            }
        })
    }

    /// What the journal holds besides knobs, for a run's notes.
    public var createdResources: (swapAreas: [String], files: [String], zram: [Int]) {
        state.withLock { s in (s.journal?.swapAreas ?? [], s.journal?.createdFiles ?? [], s.journal?.zramDevices ?? []) }
    }

    // MARK: children

    /// Records a child this memlab started (in the journal's next write, or now if one is on
    /// disk), so a recovery after a SIGKILL kills and waits for it before restoring.
    public func recordProcess(_ pid: pid_t) {
        guard let start = (try? ProcStat.read(pid: pid))?.startTimeTicks else { return }
        state.withLock { s in
            s.processes.append(ProcessRecord(pid: pid, start: start))
            if var j = s.journal {
                j.processes = s.processes
                try? writeJournal(j)
                s.journal = j
            }
        }
    }

    /// The child has been reaped: nothing to wait for (the journal drops it at its next write).
    public func forgetProcess(_ pid: pid_t) {
        state.withLock { s in s.processes.removeAll { $0.pid == pid } }
    }

    // MARK: restore

    /// Gives back everything borrowed, verifies each knob reads its original value, and
    /// deletes the journal when all is back. What could not be given back stays journaled
    /// (the next run or start retries it).
    @discardableResult
    public func restoreAll() -> RestoreReport {
        state.withLock { s in
            guard let j = s.journal else { return RestoreReport() }
            let (report, remaining) = SettingsGuard.restoreKeepingFailures(j)
            if report.restored {
                unlink(journalPath)
                SettingsGuard.unregister(journalPath)
                s.journal = nil
            } else {
                // The journal keeps exactly what is still borrowed, with its original values.
                try? writeJournal(remaining)
                s.journal = remaining
            }
            lastRestore.withLock { $0 = report }
            return report
        }
    }

    /// The most recent restore's report: a signal handler that finds nothing left to restore
    /// (the run's own restore got there first) can still say what was given back.
    public var lastRestoreReport: RestoreReport? { lastRestore.withLock { $0 } }
    private let lastRestore = Lock<RestoreReport?>(nil)

    /// What has been changed so far (path -> from/to).
    public var changes: [String: SettingChange] {
        state.withLock { s in
            var out: [String: SettingChange] = [:]
            for e in s.journal?.entries ?? [] { out[e.path] = SettingChange(from: e.original, to: e.value) }
            return out
        }
    }

    private func writeJournal(_ j: Journal) throws(GuardError) {
        try system { () throws(SystemError) in try SettingsGuard.makeDirectory(stateDirectory, mode: 0o755) }
        let data: Data
        do { data = try JSONEncoder().encode(j) } catch { throw .journalEncoding("\(error)") }
        // Registered before the journal exists: a crash in between leaves an entry that
        // points at nothing (pruned later), never a journal nobody can find.
        SettingsGuard.register(journalPath)
        try system { () throws(SystemError) in try AtomicFile.write([UInt8](data), to: journalPath, mode: 0o600) }
    }

    /// Restores a journal's entries in reverse order and reads each back. A value that reads
    /// back wrong is written again for a short while (a hugetlb pool shrinks only as its
    /// pages are freed by a process that is just exiting); a cgroup still busy is retried the
    /// same way.
    static func restore(_ j: Journal, patience: Double = 3) -> RestoreReport {
        restoreKeepingFailures(j, patience: patience).report
    }

    /// The same, and the journal of what is still to give back (empty when all is back).
    static func restoreKeepingFailures(_ j: Journal, patience: Double = 3) -> (report: RestoreReport, remaining: Journal) {
        var report = RestoreReport()
        var remaining = j
        remaining.entries = []
        remaining.createdDirectories = []
        remaining.createdFiles = nil
        remaining.zramDevices = nil
        remaining.swapAreas = nil
        remaining.enabledControllers = nil
        remaining.kdamonds = nil
        remaining.mounts = nil
        let deadline = Clock.nanoseconds() &+ UInt64(patience * 1e9)
        for e in j.entries.reversed() {
            let knob = Knob(e.path)
            report.changed[e.path] = SettingChange(from: e.original, to: e.value)
            do {
                let first = try knob.read()
                var current = first
                while true {
                    if current != e.original {
                        for v in knob.restoreSequence(to: e.original, current: current) { try knob.apply(v) }
                    }
                    current = try knob.read()
                    if current == e.original || Clock.nanoseconds() > deadline { break }
                    Clock.sleep(nanoseconds: 50_000_000)
                }
                if current == e.original {
                    report.restoredLines.append(first == e.original ? "\(e.path): \(e.original) (already)" : "\(e.path): \(first) -> \(e.original)")
                } else {
                    report.failures.append("\(e.path) reads '\(current)' after restoring '\(e.original)'")
                    remaining.entries.insert(e, at: 0)
                }
            } catch {
                report.failures.append("\(e.path): \(error)")
                remaining.entries.insert(e, at: 0)
            }
        }
        // kdamonds first: one still paging out would keep using the swap area below.
        for dir in (j.kdamonds ?? []).reversed() {
            do {
                try SettingsGuard.removeKdamond(dir)
                report.restoredLines.append("DAMON: \(dir) off and removed")
            } catch {
                report.failures.append("DAMON \(dir): \(error)")
                remaining.kdamonds = [dir] + (remaining.kdamonds ?? [])
            }
        }
        // Swap areas first (swapoff brings their pages back), then the devices and files
        // behind them.
        var left: [String] = []
        for area in (j.swapAreas ?? []).reversed() {
            do {
                try Swap.deactivate(path: area)
                report.restoredLines.append("swapoff \(area)")
            } catch {
                report.failures.append(error.description)
                left.append(area)
                remaining.swapAreas = [area] + (remaining.swapAreas ?? [])
            }
        }
        for id in (j.zramDevices ?? []).reversed() {
            // A zram device still swapped on cannot be removed; its swapoff failure is reported.
            if left.contains("/dev/zram\(id)") { remaining.zramDevices = [id] + (remaining.zramDevices ?? []); continue }
            do {
                try Zram.hotRemove(id)
                report.restoredLines.append("removed zram\(id)")
            } catch {
                report.failures.append(error.description)
                remaining.zramDevices = [id] + (remaining.zramDevices ?? [])
            }
        }
        for file in (j.createdFiles ?? []).reversed() {
            if left.contains(file) { remaining.createdFiles = [file] + (remaining.createdFiles ?? []); continue }
            if unlink(file) != 0 && errno != ENOENT {
                report.failures.append(SystemError.current("unlink", path: file).description)
                remaining.createdFiles = [file] + (remaining.createdFiles ?? [])
            } else {
                report.restoredLines.append("removed \(file)")
            }
        }
        // Mounts: unmounted (lazily: a file still open in it must not keep it), then the
        // directory removed. One not mounted any more (a reboot, an earlier try) just goes.
        for path in (j.mounts ?? []).reversed() {
            if umount2(path, Int32(MNT_DETACH)) != 0 && errno != EINVAL && errno != ENOENT {
                report.failures.append(SystemError.current("umount", path: path).description)
                remaining.mounts = [path] + (remaining.mounts ?? [])
                continue
            }
            if rmdir(path) != 0 && errno != ENOENT {
                report.failures.append(SystemError.current("rmdir", path: path).description)
                remaining.mounts = [path] + (remaining.mounts ?? [])
            } else {
                report.restoredLines.append("unmounted and removed \(path)")
            }
        }
        for dir in j.createdDirectories.reversed() {
            var rc = rmdir(dir)
            // A cgroup is busy until the last task in it is gone.
            while rc != 0 && errno == EBUSY && Clock.nanoseconds() < deadline {
                Clock.sleep(nanoseconds: 50_000_000)
                rc = rmdir(dir)
            }
            if rc != 0 && errno != ENOENT {
                report.failures.append(SystemError.current("rmdir", path: dir).description)
                remaining.createdDirectories.insert(dir, at: 0)
            } else {
                report.restoredLines.append("removed \(dir)")
            }
        }
        // Controllers last: the cgroups that used them are gone now.
        for entry in (j.enabledControllers ?? []).reversed() {
            let parts = entry.split(separator: "|", maxSplits: 1).map(String.init)
            guard parts.count == 2 else { continue }
            do {
                try ProcFile.write(parts[0], "-\(parts[1])")
                report.restoredLines.append("\(parts[0]): -\(parts[1])")
            } catch {
                report.failures.append(error.description)
                remaining.enabledControllers = [entry] + (remaining.enabledControllers ?? [])
            }
        }
        return (report, remaining)
    }

    // MARK: the registry of journals

    /// The registry file for a journal: its path's FNV-1a hash, so each journal has one.
    static func registryEntry(_ journalPath: String) -> String {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in journalPath.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        return "\(registryDirectory)/\(String(h, radix: 16)).path"
    }

    /// Records where a journal lives. Root only (the registry is root's); best effort: the
    /// journal in the state directory is still found by a start with the same directory.
    static func register(_ journalPath: String) {
        guard geteuid() == 0 else { return }
        let entry = registryEntry(journalPath)
        if ProcFile.readIfPresent(entry) == journalPath + "\n" { return }
        do {
            try makeDirectory(registryDirectory, mode: 0o700)
            chmod(registryDirectory, 0o700)
            try AtomicFile.write(Array((journalPath + "\n").utf8), to: entry, mode: 0o600)
        } catch {
            writeStderr("memlab: warning: cannot register the journal \(journalPath) in \(registryDirectory): \(error)\n")
        }
    }

    static func unregister(_ journalPath: String) {
        guard geteuid() == 0 else { return }
        unlink(registryEntry(journalPath))
    }

    /// Journal paths the registry names, if the registry is root's own (owned by root, not
    /// writable by anyone else): a registry anyone could write to would let them choose what
    /// root writes on the next start. Entries whose journal is gone are pruned.
    static func registeredJournals(prune: Bool) -> [String] {
        var st = stat()
        guard stat(registryDirectory, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR, st.st_uid == 0, st.st_mode & 0o022 == 0 else { return [] }
        var out: [String] = []
        for name in ProcFile.list(registryDirectory).sorted() where name.hasSuffix(".path") {
            let entry = "\(registryDirectory)/\(name)"
            guard let text = ProcFile.readIfPresent(entry) else { continue }
            let path = text.trimmingCharacters(in: .whitespacesAndNewlines)
            // Pruned only under the settings lock: a journal is registered just before it is
            // first written, and an unlocked start must not remove that entry meanwhile.
            guard path.hasPrefix("/"), registryEntry(path) == entry else { if prune { unlink(entry) }; continue }
            if !ProcFile.exists(path) { if prune && geteuid() == 0 { unlink(entry) }; continue }
            out.append(path)
        }
        return out
    }

    /// Whether the registry has an entry whose journal is gone: a run killed between
    /// registering its journal and first writing it (or between removing it and its entry).
    /// Nothing is borrowed, but the entry is litter that only a start holding the lock may prune.
    public static var hasDanglingRegistration: Bool {
        for name in ProcFile.list(registryDirectory) where name.hasSuffix(".path") {
            guard let text = ProcFile.readIfPresent("\(registryDirectory)/\(name)") else { continue }
            let path = text.trimmingCharacters(in: .whitespacesAndNewlines)
            if !path.hasPrefix("/") || !ProcFile.exists(path) { return true }
        }
        return false
    }

    /// Every journal to look at: this state directory's and the registered ones.
    func knownJournals() -> [String] {
        var all = [journalPath]
        for p in SettingsGuard.registeredJournals(prune: holdsLock) where !all.contains(p) { all.append(p) }
        return all
    }

    // MARK: recovery

    public enum Recovery {
        case nothing
        case ownerAlive(Journal)
        case restored(Journal, RestoreReport)
        case unreadable(String)
    }

    /// What recovery did with one journal.
    public struct Recovered {
        public let journalPath: String
        public let outcome: Recovery
    }

    /// Whether some journal (this state directory's or a registered one) has an owner that is
    /// gone, or cannot be read: a cheap look, without the lock, to decide whether recovery
    /// must wait for it.
    public var hasStaleJournal: Bool {
        knownJournals().contains { path in
            switch SettingsGuard.loadJournal(path) {
            case .absent: return false
            case .unreadable: return true
            case .loaded(let j): return !j.ownedByThisProcess && !j.ownerIsAlive
            }
        }
    }

    /// Finds every journal left by a memlab that died — in this state directory or anywhere
    /// the registry knows — and restores it: first its children are killed and waited for,
    /// then every setting is given back and read back. A journal fully restored is removed;
    /// one that is not stays (with its registry entry) for the next start, or for the next
    /// run in that directory to take over. Call with the lock held: a live owner keeps its
    /// journal.
    public func recoverStale(retryingFailed: Bool = true) -> [Recovered] {
        let failed = SettingsGuard.failedThisProcess.withLock { $0 }
        return knownJournals().compactMap { path in
            // One failed attempt per process is enough (the start's): a run retries it by
            // taking the journal over.
            if !retryingFailed && failed.contains(path) { return nil }
            let outcome = SettingsGuard.recover(journalAt: path)
            if case .ownerAlive = outcome {} else { SettingsGuard.removeJournalTemporaries(beside: path) }
            if case .nothing = outcome { return nil }
            return Recovered(journalPath: path, outcome: outcome)
        }
    }

    /// The temporary files of journal writes that never reached their rename (a SIGKILL
    /// between AtomicFile's write and rename) in the journal's directory. Only with the lock
    /// held: a live run writes its journal that way.
    static func journalTemporaries(beside journalPath: String) -> [String] {
        let dir = AtomicFile.directory(of: journalPath)
        let prefix = ".\(AtomicFile.basename(of: journalPath)).memlab-"
        return ProcFile.list(dir).filter { $0.hasPrefix(prefix) }.map { "\(dir)/\($0)" }
    }

    static func removeJournalTemporaries(beside journalPath: String) {
        for f in journalTemporaries(beside: journalPath) { unlink(f) }
    }

    /// Whether this state directory holds a journal write's leftover temporary file.
    public var hasJournalTemporaries: Bool { !SettingsGuard.journalTemporaries(beside: journalPath).isEmpty }

    /// Journals this process tried to recover and could not restore fully.
    static let failedThisProcess = Lock<Set<String>>([])

    static func recover(journalAt path: String) -> Recovery {
        let j: Journal
        switch loadJournal(path) {
        case .absent: return .nothing
        case .unreadable(let why): return .unreadable(why)
        case .loaded(let loaded): j = loaded
        }
        if j.ownedByThisProcess { return .nothing }
        if j.ownerIsAlive { return .ownerAlive(j) }
        var toRestore = j
        var rebooted = false
        if let boot = j.bootID, let now = Journal.currentBootID, boot != now {
            // Written before a reboot: its knobs, swap areas, zram devices and cgroups went
            // with that boot (zram0 now may be the system's own). Only its files remain.
            rebooted = true
            toRestore.entries = []; toRestore.createdDirectories = []; toRestore.zramDevices = nil
            toRestore.swapAreas = nil; toRestore.enabledControllers = nil; toRestore.processes = nil; toRestore.kdamonds = nil
        }
        let leftovers = killAndWait(toRestore.processes ?? [])
        var (report, remaining) = restoreKeepingFailures(toRestore)
        if rebooted { report.restoredLines.insert("(written before the last reboot: knobs, swap areas, zram devices and cgroups went with it; only files were removed)", at: 0) }
        for p in leftovers { report.failures.append("pid \(p.pid), a child of the dead memlab, was still running after SIGKILL") }
        if report.restored {
            unlink(path)
            unregister(path)
        } else {
            // Kept, with what is still to give back (the dead owner stays its owner).
            remaining.processes = leftovers.isEmpty ? nil : leftovers
            if let data = try? JSONEncoder().encode(remaining) { try? AtomicFile.write([UInt8](data), to: path, mode: 0o600) }
            failedThisProcess.withLock { _ = $0.insert(path) }
        }
        return .restored(j, report)
    }

    /// SIGKILLs the processes still alive and waits (up to 10 s) until they are gone: their
    /// memory (a hugetlb page, a cgroup's charge) must be freed before the restore. Returns
    /// those still alive after that.
    static func killAndWait(_ processes: [ProcessRecord]) -> [ProcessRecord] {
        var alive = processes.filter(\.isAlive)
        for p in alive { kill(p.pid, SIGKILL) }
        let until = Clock.nanoseconds() &+ 10_000_000_000
        while !alive.isEmpty && Clock.nanoseconds() < until {
            Clock.sleep(nanoseconds: 10_000_000)
            alive = alive.filter(\.isAlive)
        }
        return alive
    }
}
