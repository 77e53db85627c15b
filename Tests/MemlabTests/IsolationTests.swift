#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing

extension KernelTests {
    /// Each repetition runs in a child: whatever kills the child becomes `failed` with the
    /// reason, and the runner carries on to the next run.
    @Suite struct Isolation {
        @Test(arguments: [
            ("selftest:crash", "Fatal error"),
            ("selftest:sigbus", "killed by SIGBUS"),
            ("selftest:hang", "timed out"),
        ])
        func childDeathBecomesFailedAndRunnerCarriesOn(target: String, reason: String) throws {
            let dir = TempDir()
            // The failing run first, then one that succeeds: the runner must get to it.
            let out = try Memlab.run(["run", target, "selftest:ok", "--repeat", "1", "--set", "deadline_s=1.5",
                                      "--json", dir.file("r.json"), "--quiet"], stateDir: dir.path)
            #expect(out.status == 1)
            let rs = runs(try loadJSON(dir.file("r.json")))
            #expect(rs.count == 2)
            #expect(rs[0]["status"] as? String == "failed")
            let why = rs[0]["reason"] as? String ?? ""
            #expect(why.contains(reason), "reason: \(why)")
            #expect(rs[1]["status"] as? String == "ok")
            #expect((median(rs[1], "fill_throughput") ?? 0) > 0)
        }

        @Test(.enabled(if: isRoot, "needs root to create a memory cgroup"),
              .enabled(if: hasMemoryCgroup, "no memory cgroup controller mounted"))
        func oomKillInsideItsCgroupIsReported() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let out = try Memlab.run(["run", "selftest:oom", "selftest:ok", "--repeat", "1", "--set", "memory_limit=32M",
                                      "--set", "oom_touch=128M", "--json", dir.file("r.json"), "--quiet"], stateDir: dir.path)
            #expect(out.status == 1)
            let rs = runs(try loadJSON(dir.file("r.json")))
            let why = rs.first?["reason"] as? String ?? ""
            #expect(why.contains("killed by the OOM killer"), "reason: \(why)")
            #expect(why.contains("limit 33554432 bytes"), "reason: \(why)")
            #expect(rs.last?["status"] as? String == "ok")
            // The cgroup was removed: no memlab-* directory left behind.
            #expect(KnobSnapshot.take() == before)
        }
    }

    /// Bad input: a clear message, exit 2, nothing changed, no result written.
    @Suite struct BadInput {
        @Test(arguments: [
            (["run", "nosuch"], "unknown scenario 'nosuch'"),
            (["run", "ksm:nosuch"], "has no variant 'nosuch'"),
            (["run", "ksm", "--set", "bogus=1"], "has no parameter 'bogus'"),
            (["run", "ksm", "--set", "pages=lots"], "'lots' is not an integer"),
            (["run", "ksm", "--set", "pages=3"], "out of range"),
            (["run", "ksm", "--set", "duplicate_ratio=0.8", "--set", "zero_ratio=0.5"], "must not exceed 1"),
            (["run", "ksm", "--set", "mode=fast"], "is not one of the choices"),
            (["run", "ksm", "--set", "pages"], "expected NAME=VALUE"),
            (["run", "ksm", "--repeat", "0"], "--repeat must be"),
            (["run", "ksm", "--cpus", "99"], "CPU 99 is not online"),
            (["run", "ksm", "--node", "64"], "does not exist"),
            (["run", "selftest:oom", "--set", "oom_touch=8M"], "oom_touch > memory_limit"),
            (["suite", "nosuch"], "unknown suite"),
            (["run", "hugepages:hugetlb-reserve", "--set", "huge_size=1g", "--set", "pool_pages=4000"], "more than half of this machine"),
            (["run", "hugepages:fault", "--set", "kind=huge"], "is not one of the choices"),
            (["run", "hugepages:fault", "--set", "size=1X"], "is not a size"),
            (["frobnicate"], "Unexpected argument"),
        ])
        func rejected(args: [String], message: String) throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let out = try Memlab.run(args + ["--json", dir.file("r.json")].filter { _ in args.first == "run" }, stateDir: dir.path)
            #expect(out.status == 2, "stdout: \(out.stdout) stderr: \(out.stderr)")
            #expect(out.stderr.contains(message), "stderr: \(out.stderr)")
            #expect(!FileManager.default.fileExists(atPath: dir.file("r.json")))
            #expect(!FileManager.default.fileExists(atPath: dir.file("journal.json")))
            #expect(KnobSnapshot.take() == before)
        }

        @Test(arguments: [
            ("scenario = \"ksm\"\nrepeat = 2\n[params\npages = 1\n", "line"),
            ("variant = \"merge\"\n", "'scenario'"),
            ("scenario = \"ksm\"\nrepeats = 2\n", "unknown key 'repeats'"),
            ("scenario = \"ksm\"\n[params]\npages = 10\n", "out of range"),
            ("scenario = \"ksm\"\n[params]\nmode = 3\n", "wrong type"),
            ("scenario = \"ksm\"\ncpus = \"all\"\n", "'cpus' must be an array"),
            ("[[runs]]\nscenario = \"ksm\"\n[[runs]]\nscenario = \"nosuch\"\n", "unknown scenario"),
        ])
        func malformedScenarioFile(text: String, message: String) throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            try text.write(toFile: dir.file("bad.toml"), atomically: true, encoding: .utf8)
            let out = try Memlab.run(["run", dir.file("bad.toml"), "--json", dir.file("r.json")], stateDir: dir.path)
            #expect(out.status == 2)
            #expect(out.stderr.contains(message), "stderr: \(out.stderr)")
            #expect(!FileManager.default.fileExists(atPath: dir.file("r.json")))
            #expect(KnobSnapshot.take() == before)
        }

        @Test func missingScenarioFile() throws {
            let dir = TempDir()
            let out = try Memlab.run(["run", dir.file("absent.toml")], stateDir: dir.path)
            #expect(out.status == 2)
            #expect(out.stderr.contains("cannot read scenario file"))
        }
    }

    /// Without root, scenarios that borrow knobs are skipped with the reason, and nothing
    /// is touched.
    @Suite(.enabled(if: isRoot && hasSetpriv, "needs root (to drop privileges) and setpriv(1)"))
    struct NotRoot {
        static let nobody = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

        @Test func ksmIsSkippedWithTheReason() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let out = try Memlab.run(["run", "ksm", "--json", dir.file("r.json")], stateDir: dir.file("state"), prefix: Self.nobody)
            #expect(out.status == 3, "stdout: \(out.stdout) stderr: \(out.stderr)")
            let run = try #require(runs(try loadJSON(dir.file("r.json"))).first)
            #expect(run["status"] as? String == "skipped")
            #expect((run["reason"] as? String ?? "").contains("needs root"))
            #expect((run["metrics"] as? [Any])?.isEmpty == true)
            #expect(KnobSnapshot.take() == before)
        }

        @Test func aScenarioThatNeedsNoRootStillRuns() throws {
            let dir = TempDir()
            let out = try Memlab.run(["run", "selftest:ok", "--repeat", "1", "--json", dir.file("r.json")], stateDir: dir.file("state"), prefix: Self.nobody)
            #expect(out.status == 0, "stderr: \(out.stderr)")
        }

        @Test func probeSaysRootIsMissing() throws {
            let dir = TempDir()
            let out = try Memlab.run(["probe", "--json"], stateDir: dir.file("state"), prefix: Self.nobody)
            #expect(out.status == 0)
            let json = try #require(try JSONSerialization.jsonObject(with: Data(out.stdout.utf8)) as? [String: Any])
            #expect(json["root"] as? Bool == false)
            let features = try #require(json["features"] as? [[String: Any]])
            let ksm = try #require(features.first { $0["name"] as? String == "ksm" })
            if hasKSM {
                #expect(ksm["usable"] as? Bool == false)
                #expect((ksm["reason"] as? String ?? "").contains("root"))
            }
        }
    }
}

extension KernelTests {
    /// --cpus pins the children; the result records the placement that was applied.
    @Suite struct Placement {
        @Test func childrenRunOnTheChosenCPU() throws {
            let dir = TempDir()
            let cpu = sysconf(Int32(_SC_NPROCESSORS_ONLN)) - 1
            let out = try Memlab.run(["run", "selftest:ok", "--repeat", "1", "--cpus", "\(cpu)", "--node", "0",
                                      "--json", dir.file("r.json"), "--quiet"], stateDir: dir.path)
            #expect(out.status == 0, "stderr: \(out.stderr)")
            let run = try #require(runs(try loadJSON(dir.file("r.json"))).first)
            #expect(run["status"] as? String == "ok", "\(run["reason"] ?? "")")
            let placement = try #require(run["placement"] as? [String: Any])
            #expect(placement["cpus"] as? [Int] == [cpu])
            #expect(placement["node"] as? Int == 0)
        }
    }
}
