#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing

extension KernelTests {
    /// The settings guard: whatever happens to the runner, the machine gets its settings back.
    @Suite(.enabled(if: isRoot, "needs root: the guard borrows /sys/kernel/mm/ksm knobs"),
           .enabled(if: hasKSM, "kernel without KSM (no /sys/kernel/mm/ksm)"))
    struct SettingsGuardTests {
        /// A run slow enough to be caught mid-way: ksmd scanning 100 pages per wake-up.
        static let slowRun = ["run", "ksm:merge", "--set", "pages=65536", "--set", "pages_to_scan=100",
                              "--set", "sleep_millisecs=20", "--repeat", "1", "--quiet"]

        static func waitForJournal(_ dir: TempDir) -> Bool {
            waitFor(20) { FileManager.default.fileExists(atPath: dir.file("journal.json")) && KnobSnapshot.take().values["/sys/kernel/mm/ksm/run"] == "1" }
        }

        @Test func sigkillMidRunThenNextStartRestores() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let (p, _, _) = try Memlab.start(Self.slowRun + ["--json", dir.file("r.json")], stateDir: dir.path)
            #expect(Self.waitForJournal(dir), "the run never borrowed the knobs")
            #expect(KnobSnapshot.take() != before, "mid-run the knobs must be borrowed")
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            #expect(p.terminationReason == .uncaughtSignal)
            // The runner is gone; its journal is left behind and the knobs are still changed.
            #expect(FileManager.default.fileExists(atPath: dir.file("journal.json")))
            // The next memlab start (any command) restores them and says so.
            let next = try Memlab.run(["list"], stateDir: dir.path)
            #expect(next.status == 0)
            #expect(next.stderr.contains("restored settings left changed by pid \(p.processIdentifier)"), "stderr: \(next.stderr)")
            #expect(!FileManager.default.fileExists(atPath: dir.file("journal.json")))
            #expect(waitFor(5) { KnobSnapshot.take() == before }, "\(KnobSnapshot.take())")
        }

        @Test(arguments: [SIGINT, SIGTERM])
        func signalMidRunRestoresAtOnce(_ sig: Int32) throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let (p, outPipe, err) = try Memlab.start(Self.slowRun + ["--json", dir.file("r.json")], stateDir: dir.path)
            #expect(Self.waitForJournal(dir))
            let journalText = (try? String(contentsOfFile: dir.file("journal.json"), encoding: .utf8)) ?? "none"
            kill(p.processIdentifier, sig)
            let stderr = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            p.waitUntilExit()
            #expect(p.terminationStatus == 128 + sig)
            #expect(stderr.contains("settings restored"), "stderr: \(stderr) journal-before-kill: \(journalText) stdout: \(String(decoding: outPipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self))")
            #expect(!FileManager.default.fileExists(atPath: dir.file("journal.json")))
            #expect(KnobSnapshot.take() == before)
        }

        @Test func `restore command restores a dead runner's journal`() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let (p, _, _) = try Memlab.start(Self.slowRun + ["--json", dir.file("r.json")], stateDir: dir.path)
            #expect(Self.waitForJournal(dir))
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            let out = try Memlab.run(["restore"], stateDir: dir.path)
            #expect(out.status == 0)
            // The startup check may already have restored it (and said so on stderr); either
            // way the knobs read as before.
            #expect((out.stdout + out.stderr).contains("restored"), "\(out.stdout)\(out.stderr)")
            #expect(KnobSnapshot.take() == before)
            let again = try Memlab.run(["restore"], stateDir: dir.path)
            #expect(again.stdout.contains("nothing to restore"))
        }

        /// Every command restores a dead memlab's journal first, even one whose arguments are
        /// wrong (it still exits 2 for them); and a nested state directory is created whole.
        @Test(arguments: [["run", "no-such-scenario"], ["compare", "missing.json"]])
        func anyCommandRestoresADeadRunnersJournal(_ args: [String]) throws {
            let dir = TempDir()
            let state = dir.file("nested/state")
            let before = KnobSnapshot.take()
            let (p, _, _) = try Memlab.start(Self.slowRun + ["--json", dir.file("r.json")], stateDir: state)
            #expect(waitFor(20) { FileManager.default.fileExists(atPath: state + "/journal.json") && KnobSnapshot.take().values["/sys/kernel/mm/ksm/run"] == "1" })
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            let next = try Memlab.run(args, stateDir: state)
            #expect(next.status == 2, "stderr: \(next.stderr)")
            #expect(next.stderr.contains("restored settings left changed by pid \(p.processIdentifier)"), "stderr: \(next.stderr)")
            #expect(!FileManager.default.fileExists(atPath: state + "/journal.json"))
            #expect(KnobSnapshot.take() == before)
        }

        /// Two runs at once: the second waits (saying for whom), or with --no-wait fails at
        /// once with exit 4; knobs are never changed by both.
        @Test func twoRunsAtOnce() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let (first, _, _) = try Memlab.start(["run", "ksm:merge", "--set", "pages=16384", "--set", "pages_to_scan=200",
                                                  "--repeat", "1", "--quiet", "--json", dir.file("a.json")], stateDir: dir.path)
            #expect(Self.waitForJournal(dir))
            let busy = try Memlab.run(["run", "ksm:merge", "--no-wait", "--quiet", "--json", dir.file("b.json")], stateDir: dir.path)
            #expect(busy.status == 4)
            #expect(busy.stderr.contains("pid \(first.processIdentifier)"), "stderr: \(busy.stderr)")
            #expect(!FileManager.default.fileExists(atPath: dir.file("b.json")))
            let waiting = try Memlab.run(["run", "ksm:merge", "--set", "pages=1024", "--repeat", "1", "--quiet",
                                          "--json", dir.file("c.json")], stateDir: dir.path)
            first.waitUntilExit()
            #expect(first.terminationStatus == 0)
            #expect(waiting.status == 0, "stderr: \(waiting.stderr)")
            #expect(waiting.stderr.contains("waiting for the settings lock held by pid \(first.processIdentifier)"), "stderr: \(waiting.stderr)")
            #expect(KnobSnapshot.take() == before)
        }
    }
}
