#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Guests
import LabKit
import LinuxMM

extension VMScenario {
    /// The guest's vCPU thread (from query-cpus-fast) pinned on the emulator thread's CPU,
    /// on another, or left free (as `virsh vcpupin` and `emulatorpin` do); the agent's fill
    /// throughput and pointer-chase latency for each.
    func runPinning(_ lab: VMLab, _ ctx: RunContext, _ p: Values) throws {
        var config = GuestConfig(memoryMiB: p.memoryMiB)
        config.merge = false
        let g = try lab.boot(config)
        lab.recordBoot([g])
        let agent = try lab.agent(g)
        let vcpus = try g.qemu.vcpuThreads()
        let cpus = System.onlineCPUSet.sorted().filter { $0 < 1024 }
        guard let first = cpus.first else { throw ScenarioError.failed("no online CPU listed") }
        let other = cpus.first { $0 != first } ?? first
        switch p.pin {
        case .free: break
        case .same, .apart:
            // The emulator: every QEMU thread that is not a vCPU (main loop, RCU, workers),
            // as `virsh emulatorpin` does.
            for t in ProcFile.list("/proc/\(g.qemu.pid)/task").compactMap({ Int32($0) }) where !vcpus.contains(t) {
                try pin(t, cpu: first)
            }
            for t in vcpus { try pin(t, cpu: p.pin == .same ? first : other) }
        }
        if p.pin != .free {
            // What the kernel applied, read back: the vCPU thread's allowed CPUs.
            let want = p.pin == .same ? first : other
            for t in vcpus {
                let status = (try? ProcFile.read("/proc/\(g.qemu.pid)/task/\(t)/status")) ?? ""
                let line = status.split(separator: "\n").first { $0.hasPrefix("Cpus_allowed_list:") }
                let allowed = line.flatMap { try? CPUList.parse(String($0.dropFirst("Cpus_allowed_list:".count)).trimmingCharacters(in: .whitespaces)) } ?? []
                ctx.check("vcpu_pinned_cpu", expected: Double(want), observed: allowed.count == 1 ? Double(allowed[0]) : -1, tolerance: 0,
                          describe: "the vCPU thread may run on exactly the CPU it was pinned to (/proc/PID/task/TID/status)")
            }
        }
        let bytes = UInt64(p.fillMiB) << 20
        _ = try agent.fill(region: 0, bytes: bytes, seed: 1, timeoutS: 300)       // resident first
        let asked = UInt64(p.fillRateMiB) << 20
        let f = try agent.fill(region: 1, bytes: bytes, seed: 2, rateBytesPerS: asked, timeoutS: 300)
        let achieved = Double(bytes) / max(f.seconds, 1e-9)
        ctx.record("fill_rate", achieved, .bytesPerSecond, better: .higher)
        if asked > 0 {
            ctx.check("fill_rate", expected: Double(asked), observed: achieved, tolerance: Double(asked) * 0.05,
                      describe: "the agent's paced fill reaches the rate asked, within 5%")
        }
        let ns = try agent.chase(region: 1, workingSet: UInt64(p.workingSetMiB) << 20, accesses: UInt64(p.accesses), seed: 3, timeoutS: 600)
        ctx.record("chase_latency", ns, .ns, better: .lower)
        ctx.record("vcpu_threads", Double(vcpus.count), .count, better: .none)
        ctx.note("pinning: \(p.pin.rawValue) — emulator thread \(g.qemu.pid)\(p.pin == .free ? "" : " on CPU \(first)"), vCPU threads \(vcpus.map(String.init).joined(separator: ","))\(p.pin == .free ? " free" : " on CPU \(p.pin == .same ? first : other)"); accelerator \(lab.accelerator.rawValue)")
    }

    func pin(_ tid: pid_t, cpu: Int) throws { try NUMA.setAffinity(thread: tid, cpus: [cpu]) }
}
