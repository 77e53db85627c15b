#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing

/// Reads a sysfs/procfs value, trimmed.
func readKnob(_ path: String) -> String? {
    (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
}

/// A pid that belonged to a process that has exited (a dead owner for a crafted journal).
func deadPID() throws -> Int32 {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/bin/true")
    try p.run()
    p.waitUntilExit()
    return p.processIdentifier
}

extension KernelTests {
    /// Signals, SIGKILL and recovery: whatever happens to a run, the machine gets its settings
    /// back, nothing is borrowed after the restore, and the record of what was borrowed is
    /// never lost (issue 11's reproduced failures, one test each).
    @Suite(.enabled(if: isRoot, "needs root: the guard borrows /sys/kernel/mm/ksm knobs"),
           .enabled(if: hasKSM, "kernel without KSM (no /sys/kernel/mm/ksm)"))
    struct Recovery {
        static let slowRun = SettingsGuardTests.slowRun

        /// Ctrl-C during a sweep used to leave ksm/pages_to_scan changed now and then: the
        /// signal thread restored while the main thread borrowed for the next point. Trials at
        /// seeded moments spread over the whole sweep, between points included.
        @Test func aSignalDuringASweepLeavesNothingBorrowed() throws {
            var rng = SplitMix(seed: 11)
            let before = KnobSnapshot.take()
            for trial in 0..<12 {
                let dir = TempDir()
                let sig = [SIGINT, SIGTERM, SIGHUP][trial % 3]
                let (p, _, err) = try Memlab.start(["run", "ksm:merge", "--set", "pages=512", "--set", "pages_to_scan=101,202,303,404,505,606,707,808",
                                                    "--repeat", "1", "--quiet", "--json", dir.file("r.json")], stateDir: dir.path)
                usleep(UInt32(100_000 + rng.next() % 3_000_000))
                kill(p.processIdentifier, sig)
                let stderr = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
                p.waitUntilExit()
                #expect(p.terminationStatus == 128 + sig || p.terminationStatus == 0, "trial \(trial): status \(p.terminationStatus) \(stderr)")
                #expect(KnobSnapshot.take() == before, "trial \(trial) (\(sig)): the knobs must read as before right after memlab exits\n\(stderr)")
                #expect(!FileManager.default.fileExists(atPath: dir.file("journal.json")), "trial \(trial)")
                #expect(memlabLitter().isEmpty, "trial \(trial): \(memlabLitter())")
                if KnobSnapshot.take() != before { _ = try Memlab.run(["restore"], stateDir: dir.path) }
            }
        }

        /// A run with its own MEMLAB_STATE_DIR killed by SIGKILL used to leave KSM on: a start
        /// with another (or the default) state directory never looked there.
        @Test func aStartWithAnotherStateDirectoryFindsTheJournal() throws {
            let a = TempDir(), b = TempDir()
            let before = KnobSnapshot.take()
            let (p, _, _) = try Memlab.start(Self.slowRun + ["--json", a.file("r.json")], stateDir: a.path)
            #expect(SettingsGuardTests.waitForJournal(a))
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            let next = try Memlab.run(["list"], stateDir: b.path)
            #expect(next.status == 0)
            #expect(next.stderr.contains("restored settings left changed by pid \(p.processIdentifier)"), "stderr: \(next.stderr)")
            #expect(next.stderr.contains(a.file("journal.json")), "it says which journal: \(next.stderr)")
            #expect(!FileManager.default.fileExists(atPath: a.file("journal.json")))
            #expect(KnobSnapshot.take() == before)
        }

        /// A run killed between registering its journal and first writing it leaves a registry
        /// entry that names no journal (found by the kill trials: a SIGKILLed tmem:zswap run).
        /// Nothing is borrowed, but the next start must prune it, not leave it forever.
        @Test func aRegistrationWithoutItsJournalIsPrunedByTheNextStart() throws {
            let dir = TempDir()
            let registry = "/var/lib/memlab/journals"
            try FileManager.default.createDirectory(atPath: registry, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            let entry = "\(registry)/0123456789abcdef.path"
            try (dir.file("never-written/journal.json") + "\n").write(toFile: entry, atomically: false, encoding: .utf8)
            defer { unlink(entry) }
            let out = try Memlab.run(["list"], stateDir: dir.path)
            #expect(out.status == 0)
            #expect(!FileManager.default.fileExists(atPath: entry), "the dangling entry must be pruned")
            #expect(!out.stderr.contains("waits to be restored"), "nothing was borrowed: nothing to say\n\(out.stderr)")
        }

        /// A SIGKILL between a journal's write and its rename leaves the temporary file (found
        /// by the kill trials: a `tmem:zswap` run with zram). The next start removes it.
        @Test func aJournalWriteCutShortLeavesNoTemporaryFile() throws {
            let dir = TempDir()
            let stray = dir.file(".journal.json.memlab-AbC123")
            try "{\"entries\":[".write(toFile: stray, atomically: false, encoding: .utf8)
            let out = try Memlab.run(["list"], stateDir: dir.path)
            #expect(out.status == 0)
            #expect(!FileManager.default.fileExists(atPath: stray), "the cut-short write's temporary file must be removed")
        }

        /// Two runs with MEMLAB_LOCK_FILE pointed at different files used to interleave (one
        /// restored the other's borrowed value as its "original"): the lock is fixed now.
        @Test func theLockCannotBeSplitByTheEnvironment() throws {
            let a = TempDir(), b = TempDir()
            let before = KnobSnapshot.take()
            let (first, _, _) = try Memlab.start(Self.slowRun + ["--json", a.file("r.json")], stateDir: a.path,
                                                 env: ["MEMLAB_LOCK_FILE": a.file("lock")])
            #expect(SettingsGuardTests.waitForJournal(a))
            let second = try Memlab.run(["run", "ksm:merge", "--no-wait", "--quiet", "--json", b.file("r.json")], stateDir: b.path,
                                        env: ["MEMLAB_LOCK_FILE": b.file("lock")])
            #expect(second.status == 4, "stderr: \(second.stderr)")
            #expect(second.stderr.contains("pid \(first.processIdentifier)"), "stderr: \(second.stderr)")
            kill(first.processIdentifier, SIGINT)
            first.waitUntilExit()
            #expect(KnobSnapshot.take() == before)
        }

        /// A recovery that fails (a cgroup still busy) used to have its journal overwritten by
        /// the next run, losing the original values. Now the journal stays, `restore` and every
        /// start say what could not be restored and why, and the next run takes the journal
        /// over (keeping the originals) instead of overwriting it.
        @Test(.enabled(if: FileManager.default.fileExists(atPath: "/sys/fs/cgroup/memory/cgroup.procs"), "needs the cgroup v1 memory controller"))
        func aFailedRecoveryKeepsItsJournal() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let knob = "/sys/kernel/mm/ksm/pages_to_scan"
            let original = try #require(readKnob(knob))
            // A memory cgroup with a live task in it: rmdir fails with EBUSY.
            let cgroup = "/sys/fs/cgroup/memory/memlab-test-busy-\(getpid())"
            try FileManager.default.createDirectory(atPath: cgroup, withIntermediateDirectories: false)
            let sleeper = Process()
            sleeper.executableURL = URL(fileURLWithPath: "/bin/sleep")
            sleeper.arguments = ["120"]
            try sleeper.run()
            // SIGKILL: the test process may block SIGTERM, and its children inherit the mask.
            func stopSleeper() { if sleeper.isRunning { kill(sleeper.processIdentifier, SIGKILL); sleeper.waitUntilExit() } }
            defer {
                stopSleeper()
                rmdir(cgroup)
                try? original.write(toFile: knob, atomically: false, encoding: .utf8)
            }
            try "\(sleeper.processIdentifier)".write(toFile: cgroup + "/cgroup.procs", atomically: false, encoding: .utf8)
            // This test plays a memlab that died after borrowing both.
            try "777".write(toFile: knob, atomically: false, encoding: .utf8)
            let journal: [String: Any] = [
                "owner_pid": try deadPID(), "owner_start": 1, "command": "memlab run (a test's dead runner)",
                "entries": [["path": knob, "original": original, "value": "777"]],
                "created_directories": [cgroup],
            ]
            try JSONSerialization.data(withJSONObject: journal).write(to: URL(fileURLWithPath: dir.file("journal.json")))
            chmod(dir.file("journal.json"), 0o600)

            let first = try Memlab.run(["list"], stateDir: dir.path)
            #expect(first.stderr.contains("could NOT restore"), "stderr: \(first.stderr)")
            #expect(first.stderr.contains("rmdir") && first.stderr.contains("EBUSY"), "it says why: \(first.stderr)")
            #expect(FileManager.default.fileExists(atPath: dir.file("journal.json")), "the journal stays")
            #expect(readKnob(knob) == original, "what could be restored was")

            // The next run in that directory takes the journal over rather than overwrite it.
            let run = try Memlab.run(["run", "ksm:merge", "--set", "pages=512", "--set", "pages_to_scan=555", "--repeat", "1", "--quiet",
                                      "--json", dir.file("r.json")], stateDir: dir.path)
            #expect(run.status == 1, "settings not all restored is a failure: \(run.stderr)")
            let kept = try loadJSON(dir.file("journal.json"))
            #expect((kept["adopted_from"] as? [Int])?.isEmpty == false, "journal: \(kept)")
            #expect(kept["created_directories"] as? [String] == [cgroup], "only what is still borrowed: \(kept)")
            #expect((kept["entries"] as? [Any])?.isEmpty == true, "the knobs were given back: \(kept)")
            #expect(readKnob(knob) == original)

            let refused = try Memlab.run(["restore"], stateDir: dir.path)
            #expect(refused.status == 1)
            #expect(refused.stderr.contains("could NOT restore") && refused.stderr.contains("EBUSY"), "stderr: \(refused.stderr)")

            stopSleeper()
            let done = try Memlab.run(["restore"], stateDir: dir.path)
            #expect(done.status == 0, "stdout: \(done.stdout) stderr: \(done.stderr)")
            #expect(done.stdout.contains("removed \(cgroup)"), "stdout: \(done.stdout)")
            #expect(!FileManager.default.fileExists(atPath: dir.file("journal.json")))
            #expect(!FileManager.default.fileExists(atPath: cgroup))
            #expect(KnobSnapshot.take() == before)
        }

        /// A journal anyone could have written is not followed by root: it names what root
        /// would write.
        @Test func aJournalNamingAnythingElseIsNotFollowed() throws {
            let dir = TempDir()
            let victim = dir.file("victim")
            try "keep".write(toFile: victim, atomically: false, encoding: .utf8)
            let journal: [String: Any] = [
                "owner_pid": try deadPID(), "owner_start": 1, "command": "forged",
                "entries": [["path": victim, "original": "overwritten", "value": "keep"]],
                "created_directories": [] as [String],
            ]
            try JSONSerialization.data(withJSONObject: journal).write(to: URL(fileURLWithPath: dir.file("journal.json")))
            chmod(dir.file("journal.json"), 0o600)
            let out = try Memlab.run(["restore"], stateDir: dir.path)
            #expect(out.status == 1)
            #expect(out.stderr.contains("never borrows"), "stderr: \(out.stderr)")
            #expect(readKnob(victim) == "keep")
            // Nor does a run in that directory take it over (and give its "originals" back)
            // or write over it: it refuses to borrow, and the journal stays as it was.
            let before = KnobSnapshot.take()
            let run = try Memlab.run(["run", "ksm:merge", "--set", "pages=512", "--repeat", "1", "--quiet", "--json", dir.file("r.json")], stateDir: dir.path)
            #expect(run.status == 1, "stdout: \(run.stdout) stderr: \(run.stderr)")
            #expect(run.stdout.contains("will not write over it"), "stdout: \(run.stdout)")
            #expect(readKnob(victim) == "keep")
            #expect((try? String(contentsOfFile: dir.file("journal.json"), encoding: .utf8))?.contains("forged") == true)
            #expect(KnobSnapshot.take() == before)
            unlink(dir.file("journal.json"))
        }

        /// A journal is not followed through a link, and a FIFO in its place does not make
        /// every memlab start hang.
        @Test(.timeLimit(.minutes(1))) func aJournalThatIsALinkOrAFifoIsNotRead() throws {
            let dir = TempDir()
            symlink("/etc/hostname", dir.file("journal.json"))
            let linked = try Memlab.run(["restore"], stateDir: dir.path)
            #expect(linked.status == 1 && linked.stderr.contains("symbolic link"), "stderr: \(linked.stderr)")
            unlink(dir.file("journal.json"))
            mkfifo(dir.file("journal.json"), 0o600)
            let fifo = try Memlab.run(["--version"], stateDir: dir.path)
            #expect(fifo.status == 0, "stderr: \(fifo.stderr)")
            #expect(fifo.stderr.contains("not a regular file"), "stderr: \(fifo.stderr)")
            unlink(dir.file("journal.json"))
        }

        /// As root, an output that names a device or a link is written through it, never
        /// replaced: renaming a temporary file over /dev/null would replace it for the machine.
        @Test func outputsToDevicesAndLinksAreWrittenThrough() throws {
            let dir = TempDir()
            _ = try Memlab.run(["run", "selftest:ok", "--set", "size=1M", "--repeat", "1", "--quiet", "--json", dir.file("r.json")], stateDir: dir.path)
            for args in [["report", dir.file("r.json"), "-o", "/dev/null"], ["compare", dir.file("r.json"), dir.file("r.json"), "--json", "/dev/null"]] {
                let out = try Memlab.run(args, stateDir: dir.path)
                #expect(out.status == 0, "\(args): \(out.stderr)")
                var st = stat()
                #expect(lstat("/dev/null", &st) == 0 && (st.st_mode & S_IFMT) == S_IFCHR, "/dev/null must stay a device")
            }
            symlink(dir.file("real.html"), dir.file("link.html"))
            let viaLink = try Memlab.run(["report", dir.file("r.json"), "-o", dir.file("link.html")], stateDir: dir.path)
            #expect(viaLink.status == 0, "stderr: \(viaLink.stderr)")
            var st = stat()
            #expect(lstat(dir.file("link.html"), &st) == 0 && (st.st_mode & S_IFMT) == S_IFLNK, "the link stays a link")
            #expect((try? String(contentsOfFile: dir.file("real.html"), encoding: .utf8))?.contains("<html") == true, "the file it names holds the report")
            // A run's document must land in a file: a device is refused before the run.
            let run = try Memlab.run(["run", "selftest:ok", "--repeat", "1", "--json", "/dev/null"], stateDir: dir.path)
            #expect(run.status == 2, "stderr: \(run.stderr)")
        }

        /// Every command restores a dead memlab's settings first — also --version, --help and
        /// a command line that does not parse.
        @Test(arguments: [["--version"], ["--help"], ["run", "--no-such-flag"], ["probe", "extra"]])
        func everyStartRestoresFirst(_ args: [String]) throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let (p, _, _) = try Memlab.start(Self.slowRun + ["--json", dir.file("r.json")], stateDir: dir.path)
            #expect(SettingsGuardTests.waitForJournal(dir))
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            let next = try Memlab.run(args, stateDir: dir.path)
            #expect(next.stderr.contains("restored settings left changed by pid \(p.processIdentifier)"), "\(args): \(next.stderr)")
            #expect(KnobSnapshot.take() == before)
        }

        /// A SIGKILLed runner's child may still hold hugetlb pages when the next start restores
        /// the pool: the pool used to stay up until the start after. The child is recorded in
        /// the journal and waited for now.
        @Test(.enabled(if: FileManager.default.fileExists(atPath: "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"), "no 2M hugetlb pool"))
        func aChildHoldingHugePagesIsWaitedFor() throws {
            let pool = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
            let before = KnobSnapshot.take()
            for kind in ["hugetlb-2m", "hugetlb-1g"] {
                let dir = TempDir()
                let (p, _, _) = try Memlab.start(["run", "hugepages:fault", "--set", "kind=\(kind)", "--set", kind == "hugetlb-1g" ? "size=1G" : "size=768M",
                                                  "--repeat", "40", "--quiet", "--json", dir.file("r.json")], stateDir: dir.path)
                let borrowed = waitFor(20) {
                    !p.isRunning || (try? String(contentsOfFile: dir.file("journal.json"), encoding: .utf8))?.contains("\"processes\"") == true
                } && p.isRunning
                if !borrowed {
                    // The pool could not grow (no free 1G page): the run skipped; nothing to test.
                    kill(p.processIdentifier, SIGKILL); p.waitUntilExit()
                    continue
                }
                usleep(300_000)
                kill(p.processIdentifier, SIGKILL)
                p.waitUntilExit()
                let next = try Memlab.run(["list"], stateDir: dir.path)
                #expect(next.stderr.contains("restored settings left changed by pid \(p.processIdentifier)"), "\(kind): \(next.stderr)")
                #expect(!next.stderr.contains("could NOT"), "\(kind): \(next.stderr)")
                #expect(KnobSnapshot.take() == before, "\(kind): right after that one start, the pools read as before (\(readKnob(pool) ?? "?"))")
            }
        }

        /// Every killed run used to leave a /tmp/memlab.XXXXXX directory, a page source's log
        /// and socket, and (source=file) its snapshot file.
        @Test(arguments: ["unix", "tcp", "file"])
        func noLitterAfterAKill(source: String) throws {
            #expect(memlabLitter().isEmpty, "before: \(memlabLitter())")
            for sig in [SIGKILL, SIGINT] {
                let dir = TempDir()
                let (p, _, _) = try Memlab.start(["run", "lazy-restore", "--set", "source=\(source)", "--set", "size=64M", "--set", "accesses=200000",
                                                  "--set", "rtt_ms=1", "--repeat", "20", "--quiet", "--json", dir.file("r.json")], stateDir: dir.path)
                #expect(waitFor(20) { !memlabLitter().isEmpty }, "the run made its files")
                usleep(200_000)
                kill(p.processIdentifier, sig)
                p.waitUntilExit()
                if sig == SIGKILL { _ = try Memlab.run(["list"], stateDir: dir.path) }
                #expect(waitFor(5) { memlabLitter().isEmpty }, "\(source) after \(sig): \(memlabLitter())")
            }
        }

        /// ksm:merge at the quick suite's sizes, many times over: the global-counter deltas
        /// used to read 0 now and then (the baseline was taken while ksmd still counted the
        /// previous repetition's pages) while the kpageflags census agreed with the layout.
        @Test func ksmCountersAgreeWithTheLayoutEveryRepetition() throws {
            for (pages, reps) in [(2048, 15), (8192, 5)] {
                let dir = TempDir()
                let out = try Memlab.run(["run", "ksm:merge", "--set", "pages=\(pages)", "--repeat", "\(reps)", "--quiet", "--json", dir.file("r.json")],
                                         stateDir: dir.path)
                #expect(out.status == 0, "stderr: \(out.stderr)")
                let r = try #require(runs(try loadJSON(dir.file("r.json"))).first)
                let bad = ((r["checks"] as? [[String: Any]]) ?? []).filter { $0["agrees"] as? Bool != true }
                #expect(bad.isEmpty, "pages=\(pages): disagreeing checks \(bad)")
                #expect(((r["checks"] as? [[String: Any]]) ?? []).filter { $0["name"] as? String == "pages_sharing" }.count == reps)
            }
        }
    }
}

/// A small seeded generator (SplitMix64) so a trial's timing can be replayed.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt32 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return UInt32(truncatingIfNeeded: z ^ (z >> 31))
    }
}

extension KernelTests {
    /// A result that cannot be written where asked is never lost: a full disk used to replace
    /// a valid result with truncated JSON. On a 64 KiB tmpfs (in a private mount namespace,
    /// nothing machine-wide) with one page left: the probe before the run passes, the document
    /// itself does not fit — the old file stays whole, the document goes to the fallback, and
    /// memlab says where and exits 1.
    @Suite(.enabled(if: isRoot, "needs root: mounts a tmpfs in a private mount namespace"),
           .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/unshare"), "needs unshare(1) from util-linux"))
    struct ResultsNeverLost {
        @Test func aFullDiskKeepsTheOldResultAndSavesTheNewOneElsewhere() throws {
            let dir = TempDir()
            let mnt = dir.file("small")
            try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
            let script = """
                set -e
                mount -t tmpfs -o size=64k tmpfs '\(mnt)'
                printf '{"old": true}' > '\(mnt)/r.json'
                dd if=/dev/zero of='\(mnt)/fill' bs=4096 count=14 status=none 2>/dev/null || true
                set +e
                '\(Memlab.binary)' run selftest:ok --set size=1M --repeat 60 --quiet --json '\(mnt)/r.json'
                echo "status=$?"
                echo "old=$(cat '\(mnt)/r.json')"
                echo "left=$(ls -A '\(mnt)' | tr '\\n' ' ')"
                """
            let out = try Memlab.run([], stateDir: dir.path, prefix: ["/usr/bin/unshare", "-m", "/bin/sh", "-c", script, "sh"])
            let text = out.stdout + out.stderr
            #expect(text.contains("status=1"), "\(text)")
            #expect(text.contains("old={\"old\": true}"), "the old result is whole: \(text)")
            #expect(text.contains("left=fill r.json "), "no temporary file left behind: \(text)")
            let saved = try #require(out.stderr.split(separator: "\n").first { $0.contains("it is saved at ") }.map { String($0.split(separator: " ").last!) },
                                     "it says where: \(out.stderr)")
            let doc = try loadJSON(saved)
            #expect(runs(doc).count == 1 && runs(doc)[0]["repetitions"] as? Int == 60, "the whole document: \(saved)")
            #expect(saved.hasPrefix(dir.path + "/unsaved/"), "\(saved)")
        }
    }
}
