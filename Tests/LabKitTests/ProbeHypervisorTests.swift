#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
@testable import LabKit
import LinuxMM

/// `memlab probe`'s hypervisor rows (issue 13) on this real machine: libvirt's order, the
/// module serving /dev/kvm named, QEMU usable exactly when its binary runs.
@Suite struct ProbeHypervisorTests {
    @Test func fiveRowsInLibvirtsOrder() {
        let rows = ProbeReport.hypervisors()
        #expect(rows.map(\.name) == ["xen", "kvm", "qemu", "lxc", "libvirt"])
        for r in rows {
            // An unusable row says why; a usable one has nothing to excuse.
            #expect(r.usable == (r.reason == nil), "\(r.name): usable=\(r.usable) reason=\(r.reason ?? "nil")")
        }
    }

    @Test func kvmRowNamesTheServingModule() throws {
        guard ProcFile.exists("/dev/kvm") else { return }
        let kvm = try #require(ProbeReport.hypervisors().first { $0.name == "kvm" })
        let module = try #require(ProbeReport.kvmModule(procModules: ProcFile.readIfPresent("/proc/modules"),
                                                        sysModuleExists: { ProcFile.exists("/sys/module/\($0)") }))
        #expect(kvm.detail.contains("module \(module.name)"), "\(kvm.detail)")
        if module.name == "kvm_pvm" {
            #expect(!kvm.usable)
            #expect(kvm.reason?.contains("failed to set MSR 0x10a") == true)
        }
        if access("/dev/kvm", R_OK | W_OK) == 0 {
            #expect(kvm.detail.contains("API version 12"), "\(kvm.detail)")
        }
    }

    @Test func qemuUsableIffItsBinaryIsExecutable() throws {
        let qemu = try #require(ProbeReport.hypervisors().first { $0.name == "qemu" })
        let executable = access(ProbeReport.qemuBinary, X_OK) == 0
        #expect(qemu.usable == executable, "\(qemu.detail) \(qemu.reason ?? "")")
        if executable {
            #expect(qemu.detail.hasPrefix("QEMU emulator version"), "\(qemu.detail)")
        } else {
            #expect(qemu.reason?.contains("apt-get install --no-install-recommends qemu-system-x86") == true)
        }
    }

    @Test func aHungBinaryCannotHangTheProbe() {
        let start = Clock.nanoseconds()
        let r = ProbeReport.runForOutput("/bin/sleep", ["30"], deadline: 0.3)
        #expect(Clock.seconds(since: start) < 5)
        guard case .failure(let why) = r else { Issue.record("sleep 30 finished within 0.3 s"); return }
        #expect(why.description.contains("killed"), "\(why)")
    }

    @Test func kvmModuleVendorFirstThenSysModule() {
        let mods = "kvm_pvm 1234 0 - Live 0x0\nkvm 99 1 kvm_pvm, Live 0x0\n"
        #expect(ProbeReport.kvmModule(procModules: mods, sysModuleExists: { _ in false })?.name == "kvm_pvm")
        #expect(ProbeReport.kvmModule(procModules: "kvm 1 0 - Live 0x0\nkvm_intel 2 0 - Live 0x0\n", sysModuleExists: { _ in false })?.name == "kvm_intel")
        #expect(ProbeReport.kvmModule(procModules: nil, sysModuleExists: { $0 == "kvm_amd" || $0 == "kvm" })?.name == "kvm_amd")
        #expect(ProbeReport.kvmModule(procModules: "", sysModuleExists: { _ in false }) == nil)
    }

    @Test func cgroupControllersFromV1AndV2() {
        let mounts = """
        cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0
        cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
        cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
        """
        let c = ProbeReport.cgroupControllers(mounts: mounts, v2Controllers: { _ in "pids hugetlb\n" }, v1Directory: { _ in false })
        #expect(c == ["cpu": "v1", "memory": "v1", "pids": "v2"])
        let none = ProbeReport.cgroupControllers(mounts: nil, v2Controllers: { _ in nil }, v1Directory: { $0 == "pids" })
        #expect(none == ["pids": "v1"])
    }

    @Test func jsonMatchesTheOtherRows() throws {
        let data = try JSONEncoder().encode(ProbeReport.hypervisors())
        let rows = try #require(JSONSerialization.jsonObject(with: data) as? [[String: Any]])
        for r in rows { #expect(Set(r.keys) == ["name", "usable", "detail", "reason"]) }
    }
}
