#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
@testable import LabKit
import LinuxMM

/// The one list of watched settings: what scenarios borrow is in it, nothing else is, the
/// guard refuses to borrow outside it, and the picture lists what is watched.
@Suite struct WatchedSettingsTests {
    @Test func everyKnobTheScenariosBorrowIsWatched() {
        var knobs = [KSM.Knobs.run, KSM.Knobs.pagesToScan, KSM.Knobs.sleepMillisecs, KSM.Knobs.useZeroPages,
                     KSM.Knobs.mergeAcrossNodes, KSM.Knobs.maxPageSharing, KSM.Knobs.smartScan,
                     THP.enabled, THP.defrag, THP.Khugepaged.pagesToScan, THP.Khugepaged.scanSleepMillisecs,
                     THP.Khugepaged.allocSleepMillisecs, THP.Khugepaged.maxPtesNone, THP.Khugepaged.defrag,
                     Overcommit.memory, Overcommit.ratio, Overcommit.kbytes, Overcommit.pageCluster, Overcommit.swappiness,
                     Zswap.enabled, Zswap.compressor, Zswap.maxPoolPercent, Zswap.shrinkerEnabled]
        for size in [64 << 10, 2 << 20] { knobs.append(THP.sizeEnabled(bytes: size)) }
        for size in [2 << 20, 1 << 30] {
            knobs += [HugeTLB.poolKnob(pageBytes: size), HugeTLB.overcommitKnob(pageBytes: size),
                      HugeTLB.nodePoolKnob(node: 0, pageBytes: size), HugeTLB.nodePoolKnob(node: 12, pageBytes: size)]
        }
        for k in knobs { #expect(WatchedSettings.watches(k.path), "\(k.path)") }
    }

    @Test func nothingElseIsWatched() {
        for p in ["/proc/sys/vm/drop_caches", "/proc/sys/vm/min_free_kbytes", "/etc/shadow", "/sys/kernel/mm/ksm/run/x",
                  "/sys/kernel/mm/ksm/../../../etc/passwd", "/sys/kernel/mm/hugepages/hugepages-2048kB/../../../../etc/passwd",
                  "/sys/kernel/mm/hugepages/./hugepages-2048kB/nr_hugepages", "/sys/devices/system/node/node0/meminfo",
                  "/sys/kernel/mm/ksm//run", "sys/kernel/mm/ksm/run", "", "/"] {
            #expect(!WatchedSettings.watches(p), "\(p)")
        }
    }

    @Test func theGuardBorrowsNothingOutsideTheList() throws {
        let dir = NSTemporaryDirectory() + "memlab-watched-\(getpid())-\(Clock.nanoseconds())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let file = dir + "/knob"
        try "0\n".write(toFile: file, atomically: false, encoding: .utf8)
        let g = SettingsGuard(stateDirectory: dir, command: "test")
        #expect(throws: GuardError.notWatched(knob: file)) { try g.set(Knob(file), to: "1") }
        do { try g.set(Knob(file), to: "1") } catch { #expect(error.errno == nil, "no system call failed: \(error)") }
        #expect(try String(contentsOfFile: file, encoding: .utf8) == "0\n", "not written")
        #expect(!FileManager.default.fileExists(atPath: g.journalPath), "nothing journaled")
    }

    @Test func thePictureNamesOnlyWatchedKnobs() {
        let a = WatchedSettings.snapshot()
        for line in a where line.hasPrefix("/") {
            let path = String(line.prefix { $0 != "=" })
            #expect(WatchedSettings.watches(path), "\(path)")
        }
        #expect(a.contains { $0.hasPrefix("swap_areas=") } && a.contains { $0.hasPrefix("hugetlb_in_use=") })
        if ProcFile.exists(KSM.Knobs.run.path) { #expect(a.contains { $0.hasPrefix(KSM.Knobs.run.path + "=") }) }
        if ProcFile.exists("\(HugeTLB.directory)/hugepages-2048kB/nr_hugepages") {
            #expect(a.contains { $0.hasPrefix("\(HugeTLB.directory)/hugepages-2048kB/nr_hugepages=") }, "patterns are expanded")
        }
    }
}
