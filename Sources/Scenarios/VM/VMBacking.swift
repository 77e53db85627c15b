#if canImport(Glibc)
import Glibc
#endif
import Guests
import LabKit
import LinuxMM
import Workloads

extension VMScenario {
    /// Guest RAM from 4K pages, THP or hugetlb (a preallocated memfd): the backing is verified
    /// in QEMU's smaps; the agent fills memory and pointer-chases a working set (one pointer
    /// per page, each step a TLB miss), and the same chase runs on the host. Under KVM the
    /// ratio is the cost of the two-dimensional page walk; under TCG the guest's latency is
    /// emulation, so the comparison is skipped and said so.
    func runBacking(_ lab: VMLab, _ ctx: RunContext, _ p: Values) throws {
        var config = GuestConfig(memoryMiB: p.memoryMiB)
        config.merge = false
        config.kernelArguments = ["transparent_hugepage=\(p.guestTHP == .on ? "always" : "never")"]
        if let b = p.backing.hugetlbBytes { config.backing = .memfd(hugetlbKiB: b >> 10) }
        let g = try lab.boot(config)
        lab.recordBoot([g])
        let agent = try lab.agent(g)
        let fillBytes = UInt64(p.fillMiB) << 20
        let f = try agent.fill(region: 0, bytes: fillBytes, seed: 0x6261_636B, hugepage: p.guestTHP == .on, timeoutS: 300)
        ctx.record("fill_rate", Double(fillBytes) / f.seconds, .bytesPerSecond, better: .higher)

        // The backing, as the host kernel reports QEMU's guest-RAM mapping.
        let ramBytes = UInt64(p.memoryMiB) << 20
        guard let smaps = g.qemu.guestRAMSmaps(bytes: ramBytes) else {
            throw ScenarioError.failed("no mapping of at least \(ramBytes) bytes in QEMU's smaps: cannot verify the backing")
        }
        let rss = Double(smaps["Rss"] ?? 0), anonHuge = Double(smaps["AnonHugePages"] ?? 0)
        let pageSize = Double(smaps["KernelPageSize"] ?? 0)
        let hugetlb = Double((smaps["Shared_Hugetlb"] ?? 0) + (smaps["Private_Hugetlb"] ?? 0))
        ctx.record("ram_kernel_page_size", pageSize, .bytes, better: .none)
        ctx.record("ram_rss", rss, .bytes, better: .none)
        ctx.record("ram_anon_huge", anonHuge, .bytes, better: .none)
        ctx.record("ram_hugetlb", hugetlb, .bytes, better: .none)
        switch p.backing {
        case .anon4k:
            ctx.check("ram_anon_huge", expected: 0, observed: anonHuge, tolerance: 0, describe: "host THP off: no huge page behind guest RAM")
            ctx.check("ram_kernel_page_size", expected: 4096, observed: pageSize, tolerance: 0, describe: "4 KiB pages")
        case .thp:
            // QEMU asks for THP (MADV_HUGEPAGE) and the host has it on: what the guest touched
            // is mostly 2 MiB pages (a range's first touch faults in the whole huge page).
            let ratio = rss > 0 ? anonHuge / rss : 0
            ctx.record("ram_anon_huge_ratio", ratio, .ratio, better: .higher)
            ctx.check("ram_anon_huge_ratio", expected: 1, observed: ratio, accepted: 0.5...1.0,
                      describe: "at least half of guest RAM's resident memory in THPs")
        case .hugetlb2m, .hugetlb1g:
            let b = Double(p.backing.hugetlbBytes!)
            ctx.check("ram_kernel_page_size", expected: b, observed: pageSize, tolerance: 0, describe: "hugetlb pages of the asked size")
            ctx.check("ram_hugetlb", expected: Double(ramBytes), observed: hugetlb, tolerance: 0,
                      describe: "all guest RAM preallocated from the hugetlb pool (prealloc=on)")
        }

        let set = UInt64(p.workingSetMiB) << 20
        let guestNS = try agent.chase(region: 0, workingSet: set, accesses: UInt64(p.accesses), seed: 0x2D57, timeoutS: 600)
        ctx.record("guest_chase_latency", guestNS, .ns, better: .lower)
        let hostNS = try hostChase(bytes: Int(set), steps: p.accesses, kind: p.backing == .anon4k ? .base : .thp)
        ctx.record("host_chase_latency", hostNS, .ns, better: .lower)
        if lab.accelerator == .kvm {
            ctx.record("chase_guest_host_ratio", guestNS / hostNS, .ratio, better: .lower)
        } else {
            ctx.note("backing: the guest/host chase comparison (the 2D walk) is skipped under TCG: an emulated vCPU's latency is QEMU's softmmu, not the hardware walk; the backing is verified in smaps all the same")
        }
        ctx.note("backing: guest RAM \(p.backing.rawValue), THP in the guest \(p.guestTHP.rawValue); host chase on \(p.backing == .anon4k ? "4 KiB pages" : "THP")")
    }

    /// ns per step of memlab's pointer chase on the host, one pointer per page.
    func hostChase(bytes: Int, steps: Int, kind: PageKind) throws -> Double {
        let m = try AnonymousMapping(length: bytes, kind: kind)
        let chase = PointerChase(base: m.base, bytes: bytes, seed: 0x2D57)
        blackHole(PointerChase.run(m.base, start: chase.start, steps: chase.elements))   // resident, warm
        let t0 = Clock.nanoseconds()
        blackHole(PointerChase.run(m.base, start: chase.start, steps: steps))
        return Double(Clock.nanoseconds() - t0) / Double(steps)
    }
}
