#if canImport(Glibc)
import Glibc
#endif
import Foundation
import LinuxMM
import Synchronization

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
    /// cgroup v2 subtree_control files memlab wrote "+CONTROLLER" to ("path|memory"),
    /// given back with "-CONTROLLER" after the cgroups under them are removed.
    public var enabledControllers: [String]?

    enum CodingKeys: String, CodingKey {
        case entries, command
        case ownerPID = "owner_pid"
        case ownerStart = "owner_start"
        case createdDirectories = "created_directories"
        case createdFiles = "created_files"
        case zramDevices = "zram_devices"
        case swapAreas = "swap_areas"
        case enabledControllers = "enabled_controllers"
    }

    public var ownerIsAlive: Bool {
        guard kill(ownerPID, 0) == 0 || errno == EPERM else { return false }
        guard let stat = try? ProcStat.read(pid: ownerPID) else { return false }
        // A zombie has exited: it will never restore anything.
        return stat.startTimeTicks == ownerStart && stat.state != "Z" && stat.state != "X"
    }
}

/// What a restore did.
public struct RestoreReport: Sendable {
    public var changed: [String: SettingChange] = [:]
    public var restoredLines: [String] = []
    public var failures: [String] = []
    public var restored: Bool { failures.isEmpty }
}

/// Borrows machine-wide knobs and gives them back: journal first, restore always — on normal
/// exit, on error, on SIGINT/SIGTERM (see SignalCleanup), and, after a SIGKILL, on the next
/// memlab start (`recoverStale`). A flock keeps two memlab processes from changing knobs at
/// once.
public final class SettingsGuard: @unchecked Sendable {
    public let stateDirectory: String
    public var journalPath: String { "\(stateDirectory)/journal.json" }
    /// The lock is machine-wide even when the journal's directory is not: the knobs it
    /// protects are machine-wide, so two memlabs with different MEMLAB_STATE_DIRs must still
    /// take turns (else one could journal the other's borrowed value as "original").
    public var lockPath: String {
        if let p = ProcessInfo.processInfo.environment["MEMLAB_LOCK_FILE"] { return p }
        return ProcFile.exists("/run") ? "/run/memlab.lock" : "\(stateDirectory)/lock"
    }

    private let state: Mutex<Journal?> = Mutex(nil)
    private let lockFD: Mutex<Int32> = Mutex(-1)
    private let command: String

    public static var defaultStateDirectory: String {
        ProcessInfo.processInfo.environment["MEMLAB_STATE_DIR"] ?? "/var/lib/memlab"
    }

    public init(stateDirectory: String = SettingsGuard.defaultStateDirectory, command: String = CommandLine.arguments.joined(separator: " ")) {
        self.stateDirectory = stateDirectory
        self.command = command
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
        do { try ensureStateDirectory() } catch { throw .system(error) }
        let fd = open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        if fd < 0 { throw .system(SystemError.current("open", path: lockPath)) }
        if flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let owner = (ProcFile.readIfPresent(lockPath) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
            let who = owner.isEmpty ? "unknown process" : owner
            if !wait { close(fd); throw .busy(owner: who) }
            say("memlab: waiting for the settings lock held by \(who)")
            while flock(fd, LOCK_EX) != 0 {
                if errno != EINTR { close(fd); throw .system(SystemError.current("flock", path: lockPath)) }
            }
        }
        let info = "pid \(getpid()) (\(command))\n"
        _ = ftruncate(fd, 0)
        _ = info.withCString { pwrite(fd, $0, strlen($0), 0) }
        lockFD.withLock { $0 = fd }
    }

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

    /// Creates the state directory and any missing parents (`$MEMLAB_STATE_DIR` may be nested).
    private func ensureStateDirectory() throws(SystemError) {
        var path = stateDirectory.hasPrefix("/") ? "" : "."
        for part in stateDirectory.split(separator: "/", omittingEmptySubsequences: true) {
            path += "/" + part
            if mkdir(path, 0o755) != 0 && errno != EEXIST {
                throw SystemError.current("mkdir", path: path)
            }
        }
    }

    // MARK: borrowing

    /// Sets a knob, journaling its original value first. The value is read back: a kernel
    /// that silently ignores the write is an error, not a surprise in the numbers.
    public func set(_ knob: Knob, to value: String) throws(SystemError) {
        try state.withLock { (journal) throws(SystemError) in
            let current = try knob.read()
            var j = journal ?? newJournal()
            if let i = j.entries.firstIndex(where: { $0.path == knob.path }) {
                j.entries[i].value = value
            } else {
                if current == value { return }    // nothing to borrow
                j.entries.append(.init(path: knob.path, original: current, value: value))
            }
            try writeJournal(j)
            journal = j
            try knob.write(value)
            let readBack = try knob.read()
            if readBack != value {
                throw SystemError(errno: 0, call: "the kernel accepted '\(value)' but reads back '\(readBack)'" + (knob.path.contains("hugepages") ? ": the pool could not grow that far (not enough free, contiguous memory)" : ""), path: knob.path)
            }
        }
    }

    /// Creates a directory (a memory cgroup) that restore will remove.
    public func createDirectory(_ path: String) throws(SystemError) {
        try state.withLock { (journal) throws(SystemError) in
            var j = journal ?? newJournal()
            j.createdDirectories.append(path)
            try writeJournal(j)
            journal = j
            if mkdir(path, 0o755) != 0 && errno != EEXIST { throw SystemError.current("mkdir", path: path) }
        }
    }

    /// cgroup v2: enables a controller for the children of a cgroup (writes "+NAME" to its
    /// cgroup.subtree_control), journaled first; restore writes "-NAME". Once per file per run.
    public func enableController(_ name: String, subtreeControl path: String) throws(SystemError) {
        try state.withLock { (journal) throws(SystemError) in
            var j = journal ?? newJournal()
            let entry = "\(path)|\(name)"
            if (j.enabledControllers ?? []).contains(entry) { return }
            j.enabledControllers = (j.enabledControllers ?? []) + [entry]
            try writeJournal(j)
            journal = j
            try ProcFile.write(path, "+\(name)")
        }
    }

    /// Removes a directory created by `createDirectory` now (and forgets it).
    public func removeDirectory(_ path: String) throws(SystemError) {
        try state.withLock { (journal) throws(SystemError) in
            if rmdir(path) != 0 && errno != ENOENT { throw SystemError.current("rmdir", path: path) }
            guard var j = journal else { return }
            j.createdDirectories.removeAll { $0 == path }
            try writeJournal(j)
            journal = j
        }
    }

    // MARK: swap areas, files, zram devices

    /// Creates a file through `make` (a swap file), journaled first so restore unlinks it.
    public func createFile(_ path: String, _ make: (String) throws(SystemError) -> Void) throws(SystemError) {
        try state.withLock { (journal) throws(SystemError) in
            var j = journal ?? newJournal()
            j.createdFiles = (j.createdFiles ?? []) + [path]
            try writeJournal(j)
            journal = j
            do throws(SystemError) { try make(path) } catch {
                // Someone else's file by that name: not ours to remove.
                if error.errno == EEXIST {
                    j.createdFiles?.removeAll { $0 == path }
                    try? writeJournal(j)
                    journal = j
                }
                throw error
            }
        }
    }

    /// Adds a zram device (hot_add) and journals it at once; restore resets and removes it.
    /// (Its number is known only after hot_add: a crash in between leaves an empty device.)
    public func addZramDevice() throws(SystemError) -> Int {
        try state.withLock { (journal) throws(SystemError) in
            var j = journal ?? newJournal()
            try writeJournal(j)
            let id = try Zram.hotAdd()
            j.zramDevices = (j.zramDevices ?? []) + [id]
            try writeJournal(j)
            journal = j
            return id
        }
    }

    /// swapon(2) of a file or device, journaled first so restore swaps it off.
    public func activateSwap(_ path: String, priority: Int = 32000) throws(SystemError) {
        try state.withLock { (journal) throws(SystemError) in
            var j = journal ?? newJournal()
            j.swapAreas = (j.swapAreas ?? []) + [path]
            try writeJournal(j)
            journal = j
            try Swap.activate(path: path, priority: priority)
        }
    }

    /// What the journal holds besides knobs, for a run's notes.
    public var createdResources: (swapAreas: [String], files: [String], zram: [Int]) {
        state.withLock { j in (j?.swapAreas ?? [], j?.createdFiles ?? [], j?.zramDevices ?? []) }
    }

    /// Gives back everything borrowed, verifies each knob reads its original value, and
    /// deletes the journal when all is back.
    @discardableResult
    public func restoreAll() -> RestoreReport {
        state.withLock { journal in
            guard let j = journal else { return RestoreReport() }
            let report = SettingsGuard.restore(j)
            if report.restored {
                unlink(journalPath)
                journal = nil
            }
            lastRestore.withLock { $0 = report }
            return report
        }
    }

    /// The most recent restore's report: a signal handler that finds nothing left to restore
    /// (the run's own restore got there first) can still say what was given back.
    public var lastRestoreReport: RestoreReport? { lastRestore.withLock { $0 } }
    private let lastRestore = Mutex<RestoreReport?>(nil)

    /// What has been changed so far (path -> from/to).
    public var changes: [String: SettingChange] {
        state.withLock { j in
            var out: [String: SettingChange] = [:]
            for e in j?.entries ?? [] { out[e.path] = SettingChange(from: e.original, to: e.value) }
            return out
        }
    }

    private func newJournal() -> Journal {
        let start = (try? ProcStat.read(pid: getpid()))?.startTimeTicks ?? 0
        return Journal(ownerPID: getpid(), ownerStart: start, command: command)
    }

    private func writeJournal(_ j: Journal) throws(SystemError) {
        try ensureStateDirectory()
        let data: Data
        do { data = try JSONEncoder().encode(j) } catch { throw SystemError(errno: EINVAL, call: "encode journal") }
        try SettingsGuard.writeDurably(data, to: journalPath)
    }

    /// tmp + fsync + rename + fsync(dir): the journal is either the old or the new one, never
    /// half of one, even across a crash.
    static func writeDurably(_ data: Data, to path: String) throws(SystemError) {
        let tmp = path + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        if fd < 0 { throw SystemError.current("open", path: tmp) }
        let written = data.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if written != data.count { close(fd); throw SystemError.current("write", path: tmp) }
        if fsync(fd) != 0 { close(fd); throw SystemError.current("fsync", path: tmp) }
        close(fd)
        if rename(tmp, path) != 0 { throw SystemError.current("rename", path: path) }
        let dir = String(path[..<(path.lastIndex(of: "/") ?? path.endIndex)])
        let dfd = open(dir.isEmpty ? "." : dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dfd >= 0 { fsync(dfd); close(dfd) }
    }

    /// Restores a journal's entries in reverse order and reads each back.
    static func restore(_ j: Journal) -> RestoreReport {
        var report = RestoreReport()
        for e in j.entries.reversed() {
            let knob = Knob(e.path)
            report.changed[e.path] = SettingChange(from: e.original, to: e.value)
            do {
                let current = try knob.read()
                if current != e.original {
                    for v in knob.restoreSequence(to: e.original, current: current) { try knob.write(v) }
                }
                let back = try knob.read()
                if back == e.original {
                    report.restoredLines.append("\(e.path): \(current) -> \(e.original)")
                } else {
                    report.failures.append("\(e.path) reads '\(back)' after restoring '\(e.original)'")
                }
            } catch {
                report.failures.append("\(e.path): \(error)")
            }
        }
        // Swap areas first (swapoff brings their pages back), then the devices and files
        // behind them.
        for area in (j.swapAreas ?? []).reversed() {
            do {
                try Swap.deactivate(path: area)
                report.restoredLines.append("swapoff \(area)")
            } catch {
                report.failures.append(error.description)
            }
        }
        for id in (j.zramDevices ?? []).reversed() {
            do {
                try Zram.hotRemove(id)
                report.restoredLines.append("removed zram\(id)")
            } catch {
                report.failures.append(error.description)
            }
        }
        for file in (j.createdFiles ?? []).reversed() {
            if unlink(file) != 0 && errno != ENOENT {
                report.failures.append(SystemError.current("unlink", path: file).description)
            } else {
                report.restoredLines.append("removed \(file)")
            }
        }
        for dir in j.createdDirectories.reversed() {
            if rmdir(dir) != 0 && errno != ENOENT {
                report.failures.append(SystemError.current("rmdir", path: dir).description)
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
            }
        }
        return report
    }

    // MARK: recovery

    public enum Recovery {
        case nothing
        case ownerAlive(Journal)
        case restored(Journal, RestoreReport)
        case unreadable(String)
    }

    /// Whether a journal exists whose owner is gone (or which cannot be read): a cheap look,
    /// without the lock, to decide whether recovery must wait for it.
    public var hasStaleJournal: Bool {
        guard ProcFile.exists(journalPath) else { return false }
        guard let text = ProcFile.readIfPresent(journalPath),
              let j = try? JSONDecoder().decode(Journal.self, from: Data(text.utf8)) else { return true }
        return j.ownerPID != getpid() && !j.ownerIsAlive
    }

    /// Finds a journal left by a memlab that died and restores it. Call with the lock held
    /// (or after taking it without waiting): a live owner keeps its journal.
    public func recoverStale() -> Recovery {
        guard ProcFile.exists(journalPath) else { return .nothing }
        guard let text = ProcFile.readIfPresent(journalPath) else {
            return .unreadable("a settings journal exists at \(journalPath) but cannot be read; run `memlab restore` as root")
        }
        guard let j = try? JSONDecoder().decode(Journal.self, from: Data(text.utf8)) else {
            return .unreadable("the settings journal at \(journalPath) is malformed; inspect it and restore by hand, then remove it")
        }
        if j.ownerPID == getpid() { return .nothing }
        if j.ownerIsAlive { return .ownerAlive(j) }
        let report = SettingsGuard.restore(j)
        if report.restored { unlink(journalPath) }
        return .restored(j, report)
    }
}
