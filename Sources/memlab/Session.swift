#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Foundation
import Guests
import LabKit
import LinuxMM
import Scenarios

/// What every command does first, and what run and suite share: the settings lock, recovery
/// of a journal left by a memlab that died, executing requests, and writing the results.
enum Session {
    /// What every memlab start does first, before it even reads its arguments: removes the
    /// files of runs whose runner is gone, and restores every journal whose owner is dead —
    /// in this state directory or anywhere the registry knows — taking the settings lock for
    /// it (waiting, and saying for whom, if another memlab holds it: knobs left changed must
    /// not wait for a later start). Says what it did on stderr.
    static func startup() {
        RunDirectory.sweepStale()
        recoverStaleJournals(SettingsGuard(), holdingLock: false)
    }

    /// Restores journals whose owner is dead; returns what was found (for `memlab restore`).
    @discardableResult
    static func recoverStaleJournals(_ g: SettingsGuard, holdingLock: Bool, quietWhenNothing: Bool = true) -> [SettingsGuard.Recovered] {
        guard System.isRoot else {
            if ProcFile.exists(g.journalPath) {
                writeStderr("memlab: note: a settings journal exists at \(g.journalPath); run `memlab restore` as root\n")
            }
            return []
        }
        if !holdingLock {
            let stale = g.hasStaleJournal
            // A registry entry whose journal is gone (a run killed between registering and
            // writing it) borrows nothing: it is pruned when the lock is free, silently.
            // So is the temporary file of a journal write a SIGKILL cut short.
            guard stale || SettingsGuard.hasDanglingRegistration || g.hasJournalTemporaries else { return [] }
            // Never wait here: every command (--help too) starts with this. While another
            // memlab holds the lock, the journal waits for a later start (or that memlab's
            // own next run), and this command goes on.
            do { try g.acquireLock(wait: false, say: { _ in }) } catch {
                if !stale { return [] }
                if case .busy(let owner) = error {
                    writeStderr("memlab: note: a dead memlab's settings journal waits to be restored; the settings lock is held by \(owner), so the next memlab start (or `memlab restore`) will do it\n")
                } else {
                    writeStderr("memlab: warning: a dead memlab's settings are left changed: \(error)\n")
                }
                return []
            }
        }
        defer { if !holdingLock { g.releaseLock() } }
        let found = g.recoverStale(retryingFailed: !holdingLock)
        for r in found {
            switch r.outcome {
            case .nothing, .ownerAlive: break
            case .unreadable(let why): writeStderr("memlab: warning: \(why)\n")
            case .restored(let j, let report):
                var msg = "memlab: restored settings left changed by pid \(j.ownerPID) (\(j.command)), which is no longer running (journal \(r.journalPath)):\n"
                msg += report.restoredLines.map { "  \($0)\n" }.joined()
                if !report.restored {
                    msg += "memlab: could NOT restore (the journal stays at \(r.journalPath); the next memlab start retries it):\n"
                        + report.failures.map { "  \($0)\n" }.joined()
                }
                writeStderr(msg)
            }
        }
        return found
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

    /// Runs the requests in each guest in turn (none: on this machine), one result document
    /// each. Every guest is checked (its kernel file, its topology) before anything runs.
    static func execute(_ requests: [RunRequest], options: Options, guests: [GuestSpec]) throws -> Int32 {
        if guests.isEmpty { return try execute(requests, options: options) }
        for g in guests where !g.isHost { try GuestRunner.check(g) }
        var statuses: [Int32] = []
        // One file per guest, named by its kernel; guests of one kernel (other parameters or
        // topology) are numbered, else each document would replace the one before.
        let releases = guests.map { g in g.isHost ? "host" : ((try? BzImage.release(of: g.kernel)) ?? "guest") }
        var seen: [String: Int] = [:]
        let tags = releases.map { r in
            guard releases.filter({ $0 == r }).count > 1 else { return r }
            seen[r, default: 0] += 1
            return "\(r)-\(seen[r]!)"
        }
        for (g, tag) in zip(guests, tags) {
            var o = options
            if guests.count > 1 {
                o.label += "-" + tag
                if let j = o.jsonPath { o.jsonPath = j.hasSuffix(".json") ? String(j.dropLast(5)) + "-\(tag).json" : j + "-\(tag)" }
                if let c = o.csvPath { o.csvPath = c.hasSuffix(".csv") ? String(c.dropLast(4)) + "-\(tag).csv" : c + "-\(tag)" }
            }
            statuses.append(try execute(requests, options: o, guest: g.isHost ? nil : g))
        }
        if statuses.contains(ExitStatus.failed) { return ExitStatus.failed }
        if statuses.allSatisfy({ $0 == ExitStatus.skipped }) { return ExitStatus.skipped }
        return statuses.first { $0 != ExitStatus.ok && $0 != ExitStatus.skipped } ?? ExitStatus.ok
    }

    /// Runs the requests under the settings lock and writes the result document; returns the
    /// exit status (1 if any run failed, 3 if every run was skipped).
    static func execute(_ requests: [RunRequest], options: Options, guest: GuestSpec? = nil) throws -> Int32 {
        let g = SettingsGuard()
        let root = System.isRoot
        if root {
            if let status = takeLock(g, wait: !options.noWait) { return status }
            recoverStaleJournals(g, holdingLock: true)
        }
        // Also without root: Ctrl-C kills the child and removes the run's files.
        SignalCleanup.shared.install(settingsGuard: g)
        defer { if root { g.releaseLock() } }

        let progress = ProgressLine(enabled: !options.quiet && isatty(2) == 1, requests: requests)
        let started = isoTimestamp()
        var runs: [RunResult] = []
        var host = ResultDocument.Host.current()
        if let guest {
            do {
                let gr = try GuestRunner(spec: guest, settingsGuard: root ? g : nil, progress: { progress.runner($0) })
                if !options.quiet && isatty(2) != 1 { writeStderr("memlab: booting a guest: Linux \(gr.image.kernelRelease), \(guest.topologyDescription), \(gr.accelerator.rawValue)\n") }
                progress.run(0, requests[0])
                runs = gr.execute(requests)
                host = gr.documentHost
            } catch let e as UsageError {
                progress.finish()
                throw e
            } catch {
                runs = requests.map { r in
                    var out = RunResult(scenario: r.scenario.id, variant: r.variant, params: r.params, placement: r.placement, status: .skipped,
                                        reason: "no guest can run here: \(error)", settings: SettingsRecord(), repetitions: 0, warmup: r.warmup)
                    out.sweep = r.sweep
                    return out
                }
            }
        } else {
            let runner = try Runner(settingsGuard: g, registry: allScenarios, progress: { progress.runner($0) })
            for (i, r) in requests.enumerated() {
                progress.run(i, r)
                runs.append(runner.execute(r))
            }
        }
        progress.finish()

        SignalCleanup.shared.checkpoint()
        let doc = ResultDocument(tool: .init(name: "memlab", version: memlabVersion), startedAt: started,
                                 host: host, runs: runs)
        print(ResultTable.render(doc), terminator: "")
        fflush(nil)
        let jsonPath = options.jsonPath ?? defaultResultPath(options.resultsDirectory, label: options.label)
        // A result that cannot go where it was asked goes to a fallback (printed), and the
        // exit status says so: an experiment's numbers are never dropped.
        var lost = false
        do {
            try ResultOutput.write(try doc.jsonData(), to: jsonPath, what: "the result document")
            if !options.quiet { print("\nresult: \(jsonPath)") }
        } catch let e as OutputError {
            _ = e   // said on stderr, with where the document went
            lost = true
        } catch {
            writeStderr("memlab: the result document could not be encoded: \(error)\n")
            lost = true
        }
        if let csv = options.csvPath {
            do {
                try ResultOutput.write(Data(ResultTable.csv(doc).utf8), to: csv, what: "the CSV")
                if !options.quiet { print("csv:    \(csv)") }
            } catch { lost = true }
        }
        // A setting left changed is a failure whatever the measurements said (its journal
        // stays; the next memlab start retries it).
        let unrestored = runs.contains { !$0.settings.restored }
        if unrestored { writeStderr("memlab: some settings could NOT be restored (see the notes); the journal stays at \(g.journalPath) and the next memlab start retries it\n") }
        if lost || unrestored || runs.contains(where: { $0.status == .failed }) { return ExitStatus.failed }
        if runs.allSatisfy({ $0.status == .skipped }) { return ExitStatus.skipped }
        return ExitStatus.ok
    }

    static func defaultResultPath(_ dir: String, label: String) -> String {
        let stamp = isoTimestamp().replacingOccurrences(of: "-", with: "").replacingOccurrences(of: ":", with: "")
        let safe = label.map { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" ? $0 : "-" }
        return "\(dir)/\(stamp)-\(String(safe)).json"
    }

    /// Fails (exit 2) before anything runs when an output file could not be written later.
    static func checkWritable(_ path: String, what: String, acceptDevice: Bool = false) throws {
        try ResultOutput.check(path, what: what, acceptDevice: acceptDevice)
    }

    /// Writes an output a command was asked for (report, comparison, SVG): atomically, and on
    /// failure to a printed fallback, exiting 1.
    static func write(_ data: Data, to path: String, what: String = "the output") throws {
        do { try ResultOutput.write(data, to: path, what: what) } catch { throw ExitCode(ExitStatus.failed) }
    }
}
