#if canImport(Glibc)
import Glibc
#endif
import Foundation
import LabKit
import LinuxMM
import Scenarios

/// What every command does first, and what run and suite share: the settings lock, recovery
/// of a journal left by a memlab that died, executing requests, and writing the results.
enum Session {
    /// Restores a journal whose owner is dead, taking the settings lock for it (waiting, and
    /// saying for whom, if another memlab holds it: knobs left changed must not wait for a
    /// later start). Says what it did on stderr.
    static func recoverStaleJournal(_ g: SettingsGuard, holdingLock: Bool) {
        guard System.isRoot else {
            if ProcFile.exists(g.journalPath) {
                writeStderr("memlab: note: a settings journal exists at \(g.journalPath); run `memlab restore` as root\n")
            }
            return
        }
        if !holdingLock {
            guard g.hasStaleJournal else { return }
            do { try g.acquireLock(wait: true, say: { writeStderr($0 + " (to restore a dead memlab's settings)\n") }) } catch { return }
        }
        defer { if !holdingLock { g.releaseLock() } }
        switch g.recoverStale() {
        case .nothing, .ownerAlive: break
        case .unreadable(let why): writeStderr("memlab: warning: \(why)\n")
        case .restored(let j, let report):
            var msg = "memlab: restored settings left changed by pid \(j.ownerPID) (\(j.command)), which is no longer running:\n"
            msg += report.restoredLines.map { "  \($0)\n" }.joined()
            if !report.restored { msg += "memlab: could NOT restore:\n" + report.failures.map { "  \($0)\n" }.joined() }
            writeStderr(msg)
        }
    }

    /// nil when the lock is held; else the exit status to end with.
    static func takeLock(_ g: SettingsGuard, wait: Bool) -> Int32? {
        let result = Result { () throws(SettingsGuard.LockError) in
            try g.acquireLock(wait: wait, say: { writeStderr($0 + "\n") })
        }
        guard case .failure(let e) = result else { return nil }
        writeStderr("memlab: \(e)\n")
        if case .busy = e { return ExitStatus.busy }
        return ExitStatus.failed
    }

    struct Options {
        var jsonPath: String?
        var csvPath: String?
        var resultsDirectory: String
        var label: String
        var noWait: Bool
        var quiet: Bool
    }

    /// Runs the requests under the settings lock and writes the result document; returns the
    /// exit status (1 if any run failed, 3 if every run was skipped).
    static func execute(_ requests: [RunRequest], options: Options) throws -> Int32 {
        let g = SettingsGuard()
        let root = System.isRoot
        if root {
            if let status = takeLock(g, wait: !options.noWait) { return status }
            recoverStaleJournal(g, holdingLock: true)
            SignalCleanup.shared.install(settingsGuard: g)
        }
        defer { if root { g.releaseLock() } }

        let progress = ProgressLine(enabled: !options.quiet && isatty(2) == 1, requests: requests)
        let runner = try Runner(settingsGuard: g, registry: allScenarios, progress: { progress.runner($0) })
        let started = isoTimestamp()
        var runs: [RunResult] = []
        for (i, r) in requests.enumerated() {
            progress.run(i, r)
            runs.append(runner.execute(r))
        }
        progress.finish()

        let doc = ResultDocument(tool: .init(name: "memlab", version: memlabVersion), startedAt: started,
                                 host: .current(), runs: runs)
        print(ResultTable.render(doc), terminator: "")
        let jsonPath = options.jsonPath ?? defaultResultPath(options.resultsDirectory, label: options.label)
        try write(doc.jsonData(), to: jsonPath)
        if !options.quiet { print("\nresult: \(jsonPath)") }
        if let csv = options.csvPath {
            try write(Data(ResultTable.csv(doc).utf8), to: csv)
            if !options.quiet { print("csv:    \(csv)") }
        }
        if runs.contains(where: { $0.status == .failed }) { return ExitStatus.failed }
        if runs.allSatisfy({ $0.status == .skipped }) { return ExitStatus.skipped }
        return ExitStatus.ok
    }

    static func defaultResultPath(_ dir: String, label: String) -> String {
        let stamp = isoTimestamp().replacingOccurrences(of: "-", with: "").replacingOccurrences(of: ":", with: "")
        let safe = label.map { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" ? $0 : "-" }
        return "\(dir)/\(stamp)-\(String(safe)).json"
    }

    /// Fails before anything runs when an output file could not be written later.
    static func checkWritable(_ path: String) throws {
        let dir = (path as NSString).deletingLastPathComponent
        let fm = FileManager.default
        var isDir: ObjCBool = false
        if !dir.isEmpty && !fm.fileExists(atPath: dir, isDirectory: &isDir) {
            do { try fm.createDirectory(atPath: dir, withIntermediateDirectories: true) } catch {
                throw UsageError("cannot create directory \(dir) for \(path): \(error.localizedDescription)")
            }
            return
        }
        if !dir.isEmpty && !isDir.boolValue { throw UsageError("\(dir) is not a directory (for \(path))") }
        if access(dir.isEmpty ? "." : dir, W_OK) != 0 { throw UsageError("cannot write into \(dir.isEmpty ? "." : dir) (for \(path))") }
        if fm.fileExists(atPath: path) && access(path, W_OK) != 0 { throw UsageError("cannot overwrite \(path)") }
    }

    static func write(_ data: Data, to path: String) throws {
        let dir = (path as NSString).deletingLastPathComponent
        if !dir.isEmpty { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) }
        do {
            try data.write(to: URL(fileURLWithPath: path))
        } catch {
            throw UsageError("cannot write \(path): \(error.localizedDescription)")
        }
    }

    /// "0,2-3" -> [0, 2, 3], each an online CPU.
    static func parseCPUList(_ text: String) throws(UsageError) -> [Int] {
        var cpus: [Int] = []
        for part in text.split(separator: ",") {
            let bounds = part.split(separator: "-", maxSplits: 1)
            guard let lo = Int(bounds[0]), let hi = Int(bounds.count == 2 ? bounds[1] : bounds[0]), lo >= 0, lo <= hi else {
                throw UsageError("--cpus '\(text)': expected a list like 0 or 0,1 or 0-1")
            }
            cpus.append(contentsOf: lo...hi)
        }
        let online = System.onlineCPUs
        if let bad = cpus.first(where: { $0 >= online }) {
            throw UsageError("--cpus: CPU \(bad) does not exist; this machine has CPUs 0-\(online - 1)")
        }
        if cpus.isEmpty { throw UsageError("--cpus: empty list") }
        return cpus
    }
}
