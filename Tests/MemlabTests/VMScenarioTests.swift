#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Guests
import LabKit
import LinuxMM
import Testing

/// The vm scenario with real QEMU guests (TCG here), at small sizes: each variant's physics
/// checks must agree, the machine must read as before, and no QEMU may outlive its run.
extension KernelTests {
    @Suite(.enabled(if: isRoot, "needs root: KSM, THP and hugetlb knobs are root-only"),
           .enabled(if: GuestImage.missing == nil, "\(GuestImage.missing ?? "")"))
    struct VirtualMachines {
        /// Runs `vm:VARIANT` with `sets`; returns the run after asserting it is ok, every check
        /// agrees, the accelerator is recorded and the knobs read as before.
        /// `mayDisagree`: checks that report a real, known defect rather than memlab's (QEMU
        /// 7.2's TCG loses a few dirty pages in a pre-copy; the check must still be there).
        func run(_ variant: String, _ sets: [String], mayDisagree: Set<String> = []) throws -> [String: Any] {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            var args = ["run", "vm:\(variant)", "--repeat", "1", "--json", dir.file("r.json"), "--quiet"]
            for s in sets { args += ["--set", s] }
            let out = try Memlab.run(args, stateDir: dir.path)
            #expect(out.status == 0, "stderr: \(out.stderr)")
            let run = try #require(runs(try loadJSON(dir.file("r.json"))).first)
            #expect(run["status"] as? String == "ok", "\(run["reason"] ?? "")")
            let checks = run["checks"] as? [[String: Any]] ?? []
            let notes = run["notes"] as? [String] ?? []
            // Only TCG's known defect may disagree; under KVM every check must hold.
            let excused = notes.contains { $0.hasPrefix("accelerator: tcg") } ? mayDisagree : []
            #expect(!checks.isEmpty)
            #expect(checks.allSatisfy { $0["agrees"] as? Bool == true || excused.contains($0["name"] as? String ?? "") }, "\(checks)")
            #expect(notes.contains { $0.hasPrefix("accelerator: ") }, "every result says which accelerator ran the guests")
            #expect(notes.contains { $0.hasPrefix("guest consoles: ") })
            #expect(median(run, "boot_time").map { $0 > 0 } == true)
            #expect(KnobSnapshot.take() == before)
            #expect(qemuProcesses().isEmpty, "no QEMU outlives its run")
            return run
        }

        /// KSM across two identical guests: pages_sharing grows by exactly the pages one guest
        /// wrote (the scenario's own check), and the host's share of each guest falls.
        @Test func ksmMergesIdenticalGuests() throws {
            let r = try run("ksm", ["memory_mib=160", "fill_mib=8", "guests=2"])
            #expect(median(r, "pages_sharing") .map { abs($0 - 2048) <= 21 } == true, "\(median(r, "pages_sharing") ?? -1)")
            #expect((median(r, "ksmd_cpu_time") ?? 0) > 0)
        }

        /// Guests boot into a memory limit until the OOM killer takes one; the kills the cgroup
        /// counts match the guests lost.
        @Test func densityCountsTheGuestsThatFit() throws {
            let r = try run("density", ["memory_mib=128", "fill_mib=8", "guests=4", "memory_limit_mib=320", "ksm=on"])
            #expect((median(r, "guests_fit") ?? 0) >= 1)
            #expect((median(r, "max_usage") ?? .infinity) <= Double(320 << 20))
        }

        /// hugetlb-backed guest RAM: every page of it preallocated from the (borrowed) pool.
        @Test func hugetlbBackingIsVerifiedInSmaps() throws {
            let r = try run("backing", ["memory_mib=128", "fill_mib=8", "working_set_mib=4", "accesses=20000", "backing=hugetlb-2m"])
            #expect(median(r, "ram_kernel_page_size") == Double(2 << 20))
            #expect(median(r, "ram_hugetlb") == Double(128 << 20))
        }

        /// Ballooning takes MemTotal from the guest and gives it back; free page reporting
        /// returns freed guest memory to the host by itself.
        @Test func balloonInflatesAndDeflates() throws {
            // Reporting starts only while a zone's free memory stays above its low watermark plus
            // 32 blocks of 2 MiB: a 256 MiB guest freeing 64 MiB is above it, 160/32 is not.
            let r = try run("balloon", ["memory_mib=256", "balloon_mib=64"])
            #expect(median(r, "guest_memtotal_drop") == Double(64 << 20))
            #expect((median(r, "inflate_time") ?? 0) > 0)
        }

        /// A real pre-copy migration: destination memory equal to the source's page for page,
        /// the agent alive there, memlab's model ratios recorded.
        @Test func precopyMigrationKeepsEveryPageAndIsHeldAgainstTheModel() throws {
            let r = try run("migrate", ["memory_mib=160", "fill_mib=16", "dirty_rate=1000", "timeout_s=60"], mayDisagree: Self.tcgDefects)
            #expect(median(r, "converged") == 1)
            try expectMemoryChecked(r)
            #expect((median(r, "bytes_transferred") ?? 0) > Double(16 << 20))
            #expect(median(r, "total_time_model_ratio") != nil)
            #expect(median(r, "downtime_model_ratio") != nil)
        }

        /// Post-copy: pages fetched on demand at the destination, and still every page equal.
        @Test func postcopyMigrationKeepsEveryPage() throws {
            let r = try run("migrate", ["memory_mib=160", "fill_mib=16", "dirty_rate=1000", "mode=postcopy", "bandwidth_mbit=200", "timeout_s=60"],
                            mayDisagree: Self.tcgDefects)
            #expect(median(r, "converged") == 1)
            try expectMemoryChecked(r)
            #expect(median(r, "postcopy_requests") != nil)
        }

        /// Under TCG, QEMU 7.2 loses the dirty tracking of a few pages written during a
        /// pre-copy (measured: 16–45 pages of a 160 MiB guest in 4.8 s at 200 Mbit/s), and a
        /// destination may then oops. memlab must report it, page frames named, never hide it.
        static let tcgDefects: Set<String> = ["destination_mismatched_pages", "destination_alive"]

        func expectMemoryChecked(_ r: [String: Any]) throws {
            let checks = r["checks"] as? [[String: Any]] ?? []
            let memory = try #require(checks.first { $0["name"] as? String == "destination_mismatched_pages" })
            #expect(checks.contains { $0["name"] as? String == "destination_alive" })
            if memory["agrees"] as? Bool != true {
                let notes = r["notes"] as? [String] ?? []
                #expect(notes.contains { $0.contains("guest pages differ") && $0.contains("frames: 0x") }, "a mismatch names its pages")
            }
        }

        /// Pinning: the vCPU thread really runs where it was put.
        @Test func pinningApartRecordsThroughput() throws {
            let r = try run("pinning", ["memory_mib=128", "fill_mib=8", "working_set_mib=4", "accesses=20000", "pin=apart", "fill_rate_mib=32"])
            // The paced fill reaches the rate asked (the scenario's own check, within 5%).
            #expect(median(r, "fill_rate").map { abs($0 - Double(32 << 20)) <= Double(32 << 20) * 0.05 } == true)
            #expect(median(r, "vcpu_threads") == 1)
        }

        /// A runner SIGKILLed while its guests run leaves no QEMU: they die with the child that
        /// started them (PDEATHSIG), and the next memlab sweeps the run's directory.
        @Test func aKilledRunnerLeavesNoQEMU() throws {
            let dir = TempDir()
            let (p, _, _) = try Memlab.start(["run", "vm:balloon", "--repeat", "1", "--set", "memory_mib=128", "--set", "balloon_mib=16", "--quiet"], stateDir: dir.path)
            let t0 = Clock.nanoseconds()
            // A guest booting (seconds), not the accelerator probe's QEMU (gone at once here).
            func booting() -> Bool { qemuProcesses().contains { (try? ProcFile.read("/proc/\($0)/cmdline"))?.contains("virtserialport") == true } }
            while !booting() && Clock.seconds(since: t0) < 60 { Clock.sleep(nanoseconds: 50_000_000) }
            Clock.sleep(nanoseconds: 1_000_000_000)
            #expect(booting(), "the run started a guest")
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            let t1 = Clock.nanoseconds()
            while !qemuProcesses().isEmpty && Clock.seconds(since: t1) < 10 { Clock.sleep(nanoseconds: 50_000_000) }
            #expect(qemuProcesses().isEmpty, "QEMU outlived a SIGKILLed memlab")
            _ = try Memlab.run(["settings"], stateDir: dir.path)
            _ = try Memlab.run(["list"], stateDir: dir.path)
            let left = ProcFile.list("/tmp").filter { $0.hasPrefix("memlab-run-\(p.processIdentifier)-") }
            #expect(left.isEmpty, "run directories left: \(left)")
        }
    }
}

/// QEMU processes running now (any: the kernel tests run one at a time).
func qemuProcesses() -> [Int32] {
    ProcFile.list("/proc").compactMap { Int32($0) }.filter { pid in
        guard let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/exe") else { return false }
        return exe.hasSuffix("/qemu-system-x86_64")
    }
}
