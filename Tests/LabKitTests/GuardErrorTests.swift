#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import LabKit
import LinuxMM

/// The guard's errors: a kernel's refusal keeps its errno; a knob that reads back short is a
/// case of its own (the runner skips a run whose capacity the kernel could not give), never
/// an errno of 0.
@Suite struct GuardErrorTests {
    @Test func aPoolThatCouldNotGrowSaysSoAndHasNoErrno() {
        let pool = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
        let e = GuardError.readBack(knob: pool, wrote: "512", read: "130")
        #expect(e.errno == nil)
        #expect(e.shortfall == "the kernel accepted '512' but reads back '130': the pool could not grow that far (not enough free, contiguous memory)")
        #expect(e.description == "\(e.shortfall!) (\(pool))")
        let ksm = GuardError.readBack(knob: "/sys/kernel/mm/ksm/run", wrote: "1", read: "0")
        #expect(ksm.description == "the kernel accepted '1' but reads back '0' (/sys/kernel/mm/ksm/run)")
    }

    @Test func aSystemCallsErrnoIsKept() {
        let e = GuardError.system(SystemError(errno: EBUSY, call: "rmdir", path: "/sys/fs/cgroup/memlab-1"))
        #expect(e.errno == EBUSY && e.shortfall == nil)
        #expect(e.description == "rmdir /sys/fs/cgroup/memlab-1: \(String(cString: strerror(EBUSY))) (EBUSY)")
        for other in [GuardError.notWatched(knob: "/etc/shadow"), .stopping(reason: "SIGINT"), .journalInTheWay(path: "/j", why: "w"), .journalEncoding("x")] {
            #expect(other.errno == nil && other.shortfall == nil)
        }
    }

    /// A guard sealed by a signal refuses to borrow, saying so (it used to claim EINTR).
    @Test func aSealedGuardRefuses() throws {
        let g = SettingsGuard(stateDirectory: "/nonexistent/memlab-sealed", command: "test")
        g.seal("SIGTERM")
        #expect(throws: GuardError.stopping(reason: "SIGTERM")) { try g.set(Knob("/proc/sys/vm/overcommit_memory"), to: "1") }
    }
}
