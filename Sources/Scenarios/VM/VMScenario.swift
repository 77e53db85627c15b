#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Guests
import LabKit
import LinuxMM

/// Real guests: QEMU virtual machines booted from memlab's own image (Debian's kernel and
/// busybox, memlab's agent), driven over QMP and the agent. Each variant exercises one
/// feature virtualization brought into the kernel with real VMs: KSM across guests, the
/// backing of guest RAM, ballooning, live migration against memlab's model, vCPU pinning.
public struct VMScenario: TypedScenario {
    public init() {}
    public let id = "vm"
    public let summary = "Real QEMU guests: KSM across guests, RAM backing and the 2D walk, balloon, live migration vs the model, vCPU pinning"

    public enum Variant: String, ScenarioVariant {
        case ksm, density, backing, balloon, migrate, pinning
        public var summary: String {
            switch self {
            case .ksm: return "K guests fill identical (or unique) pages; host KSM merges across them: pages_sharing against what the agents wrote, savings per guest, ksmd CPU"
            case .density: return "guests boot one by one into a memory cgroup limit, filling identical pages, with KSM on or off: how many fit before the OOM killer takes one"
            case .backing: return "guest RAM from 4K pages, THP or hugetlb (memfd); verified in QEMU's smaps; pointer-chase in the guest against the host (the 2D walk, KVM only)"
            case .balloon: return "virtio-balloon inflate and deflate over QMP, and free page reporting: QEMU's RSS given back, how fast, the guest's MemTotal"
            case .migrate: return "QEMU live migration over TCP (pre-copy, post-copy, auto-converge, xbzrle, multifd) of a dirtying guest; memory checked; memlab's model on the same figures"
            case .pinning: return "vCPU threads pinned with the emulator thread, apart from it, or free: the guest's fill throughput and chase latency for each"
            }
        }
    }

    public enum Pattern: String, CaseIterable, ParameterChoice { case identical, unique }
    public enum Backing: String, CaseIterable, ParameterChoice {
        case anon4k = "4k", thp, hugetlb2m = "hugetlb-2m", hugetlb1g = "hugetlb-1g"
        var hugetlbBytes: Int? {
            switch self {
            case .hugetlb2m: return 2 << 20
            case .hugetlb1g: return 1 << 30
            default: return nil
            }
        }
    }
    public enum OnOff: String, CaseIterable, ParameterChoice { case on, off }
    public enum MigrationMode: String, CaseIterable, ParameterChoice {
        case precopy, postcopy
        case postcopyPreempt = "postcopy-preempt"
    }
    public enum Pin: String, CaseIterable, ParameterChoice { case free, same, apart }
    public enum Link: String, CaseIterable, ParameterChoice { case shaped, qemu }

    public struct Parameters: ParameterSet {
        public init() {}
        let memoryMiB = Parameter<Int>("memory_mib", 128...16384, default: 256, unit: .mib, help: "guest RAM")
        let kernel = Parameter<String>("kernel", text: "", help: "a bzImage for the guests (default: the newest /boot/vmlinuz-*, Debian's linux-image-amd64)")
        let bootTimeoutS = Parameter<Double>("boot_timeout_s", 1...600, default: 90, unit: .s, help: "a guest whose agent has not answered after this long fails the run, with its console's last lines")
        let fillMiB = Parameter<Int>("fill_mib", 1...8192, default: 32, unit: .mib, help: "memory each guest's agent fills")
        let guests = Parameter<Int>("guests", 1...16, default: 2, unit: .count, help: "ksm: identical guests; density: at most this many")
        let pattern = Parameter<Pattern>("pattern", default: .identical, help: "ksm: identical: the same pages in every guest; unique: a different seed per guest (nothing to merge across guests)")
        let pagesToScan = Parameter<Int>("pages_to_scan", 1...100_000, default: 8000, unit: .pages, help: "ksm: ksmd pages per wake-up (borrowed)")
        let sleepMillisecs = Parameter<Int>("sleep_millisecs", 0...10_000, default: 10, unit: .ms, help: "ksm: ksmd sleep between wake-ups (borrowed)")
        let smartScan = Parameter<Bool>("smart_scan", default: false, help: "ksm: KSM's smart scan (skips pages that did not merge before; borrowed where the kernel has it)")
        let timeoutS = Parameter<Double>("timeout_s", 1...3600, default: 120, unit: .s, help: "ksm: give up waiting for ksmd; balloon and migrate: for the balloon or the migration")
        let memoryLimitMiB = Parameter<Int>("memory_limit_mib", 64...1_048_576, default: 512, unit: .mib, help: "density: the memory cgroup limit the guests share (no swap)")
        let ksm = Parameter<OnOff>("ksm", default: .on, help: "density: guest RAM mergeable and ksmd running (borrowed), or neither")
        let backing = Parameter<Backing>("backing", default: .thp, help: "backing: guest RAM from 4k anonymous pages (host THP off), thp (host THP on), hugetlb-2m or hugetlb-1g (memfd, preallocated; the pool is borrowed)")
        let guestTHP = Parameter<OnOff>("guest_thp", default: .on, help: "backing: THP inside the guest (transparent_hugepage=always or never on its command line)")
        let workingSetMiB = Parameter<Int>("working_set_mib", 1...8192, default: 16, unit: .mib, help: "backing, pinning: pointer-chase working set")
        let accesses = Parameter<Int>("accesses", 1000...100_000_000, default: 200_000, unit: .count, help: "backing, pinning: pointer-chase steps")
        let balloonMiB = Parameter<Int>("balloon_mib", 1...8192, default: 64, unit: .mib, help: "balloon: how much the balloon takes from the guest")
        let freePageReporting = Parameter<OnOff>("free_page_reporting", default: .on, help: "balloon: the device reports freed guest pages to the host")
        let mode = Parameter<MigrationMode>("mode", default: .precopy, help: "migrate: pre-copy, post-copy after the first round, or post-copy with the preempt channel")
        let dirtyRate = Parameter<Int>("dirty_rate", 0...10_000_000, default: 2000, unit: .pagesPerSecond, help: "migrate: pages/s the guest's agent dirties during the migration")
        let hotFraction = Parameter<Double>("hot_fraction", 0.0001...1, default: 1, unit: .ratio, help: "migrate: fraction of the filled memory the agent dirties")
        let bandwidthMbit = Parameter<Double>("bandwidth_mbit", 1...100_000, default: 1000, unit: .mbitPerSecond, help: "migrate: the link's bandwidth (and the model's)")
        let link = Parameter<Link>("link", default: .shaped, help: "migrate: shaped: QEMU's stream through memlab's loopback relay, held to bandwidth_mbit all the way (as a tbf-shaped link); qemu: QEMU's own max-bandwidth, which it lifts for the final stop-and-copy")
        let downtimeTargetMs = Parameter<Double>("downtime_target_ms", 1...100_000, default: 300, unit: .ms, help: "migrate: QEMU's downtime-limit, and the model's target")
        let autoConverge = Parameter<Bool>("auto_converge", default: false, help: "migrate: QEMU throttles the guest's vCPUs until pre-copy converges")
        let xbzrle = Parameter<Bool>("xbzrle", default: false, help: "migrate: QEMU sends re-dirtied pages as deltas against a cache")
        let multifd = Parameter<Int>("multifd", 0...16, default: 0, unit: .count, help: "migrate: parallel channels for page data (0: one stream)")
        let fillRateMiB = Parameter<Int>("fill_rate_mib", 0...100_000, default: 0, unit: .none, help: "pinning: MiB/s the agent's measured fill is paced to (0: as fast as it goes); checked within 5%")
        let pin = Parameter<Pin>("pin", default: .free, help: "pinning: the vCPU thread on the emulator thread's CPU (same), on another (apart), or not pinned (free)")
    }

    public func probe(_ variant: Variant) -> Availability {
        if let why = GuestImage.missing { return .unusable(why) }
        if (variant == .ksm || variant == .density) && !KSM.isAvailable { return .unusable("KSM is not available: /sys/kernel/mm/ksm is missing") }
        return .usable
    }

    public func probe(_ variant: Variant, _ p: Values) -> Availability {
        let base = probe(variant)
        guard base == .usable else { return base }
        if variant == .backing, let b = p.backing.hugetlbBytes, HugeTLB.pool(pageBytes: b) == nil {
            return .unusable("this kernel has no \(b >> 20) MiB hugetlb pool")
        }
        if variant == .pinning && System.onlineCPUs < 2 && p.pin == .apart { return .unusable("pin=apart needs two CPUs") }
        return .usable
    }

    public func validate(_ variant: Variant, _ p: Values) throws(UsageError) {
        if !p.kernel.isEmpty {
            do { _ = try BzImage.release(of: p.kernel) } catch { throw UsageError("kernel=\(p.kernel): \(error)") }
        }
        let total = variant == .density ? p.memoryLimitMiB : variant == .ksm ? p.memoryMiB * p.guests : variant == .migrate ? 4 * p.memoryMiB : p.memoryMiB
        let hostMiB = Int((try? MemInfo.current())?.memTotal ?? 0) >> 20
        if hostMiB > 0 && total > hostMiB / 2 {
            throw UsageError("these guests need \(total) MiB, more than half of this machine's \(hostMiB) MiB: ask for less")
        }
        // pmemsave dumps guest-physical [0, RAM): on q35, RAM from 2816 MiB up is split around
        // the PCI hole, and both dumps (2 × RAM) go to the run directory.
        if variant == .migrate && p.memoryMiB > 2048 { throw UsageError("migrate: memory_mib must be at most 2048 (the memory check dumps RAM below the PCI hole, twice)") }
        if p.fillMiB > p.memoryMiB / 2 { throw UsageError("fill_mib=\(p.fillMiB) must be at most half of memory_mib=\(p.memoryMiB) (the guest kernel needs the rest)") }
        if variant == .balloon && p.balloonMiB >= p.memoryMiB / 2 { throw UsageError("balloon_mib must be under half of memory_mib") }
        if (variant == .backing || variant == .pinning) && p.workingSetMiB > p.fillMiB { throw UsageError("working_set_mib must be at most fill_mib") }
        if variant == .backing, let b = p.backing.hugetlbBytes, (p.memoryMiB << 20) % b != 0 {
            throw UsageError("memory_mib must be a multiple of the \(b >> 20) MiB hugetlb page")
        }
    }

    public func settings(_ variant: Variant, _ p: Values) -> [KnobSetting] {
        switch variant {
        case .ksm, .density:
            if variant == .density && p.ksm == .off { return [] }
            var s = [KnobSetting(KSM.Knobs.pagesToScan, String(p.pagesToScan)), KnobSetting(KSM.Knobs.sleepMillisecs, String(p.sleepMillisecs)),
                     KnobSetting(KSM.Knobs.useZeroPages, "0"), KnobSetting(KSM.Knobs.run, "1")]
            // Smart scan (6.7+) skips pages that did not merge on earlier scans: guest pages
            // scanned at boot and filled later would wait many scans. Off unless asked.
            if ProcFile.exists(KSM.Knobs.smartScan.path) { s.append(KnobSetting(KSM.Knobs.smartScan, p.smartScan ? "1" : "0")) }
            return s
        case .backing:
            switch p.backing {
            case .anon4k: return [KnobSetting(THP.enabled, "never")]
            case .thp: return [KnobSetting(THP.enabled, "always")]
            case .hugetlb2m, .hugetlb1g:
                let b = p.backing.hugetlbBytes!
                return [KnobSetting(HugeTLB.poolKnob(pageBytes: b), String((p.memoryMiB << 20) / b), isCapacity: true)]
            }
        default: return []
        }
    }

    public func deadline(_ variant: Variant, _ p: Values) -> Double {
        let guests = variant == .ksm || variant == .density ? Double(p.guests) : variant == .migrate ? 2 : 1
        return (p.bootTimeoutS + (variant == .density ? p.timeoutS : 0)) * guests + p.timeoutS + 300
    }

    public func memoryLimit(_ variant: Variant, _ p: Values) -> Int? {
        variant == .density ? p.memoryLimitMiB << 20 : nil
    }

    public func run(_ ctx: RunContext, _ variant: Variant, _ p: Values) throws {
        let lab = try VMLab(ctx: ctx, kernel: p.kernel, bootTimeoutS: p.bootTimeoutS)
        defer { lab.stopAll() }
        switch variant {
        case .ksm: try runKSM(lab, ctx, p)
        case .density: try runDensity(lab, ctx, p)
        case .backing: try runBacking(lab, ctx, p)
        case .balloon: try runBalloon(lab, ctx, p)
        case .migrate: try runMigrate(lab, ctx, p)
        case .pinning: try runPinning(lab, ctx, p)
        }
    }
}

/// One run's guests: the image, the accelerator that really works (recorded), the guests
/// booted (stopped at the end, whatever happens), their consoles kept and named.
final class VMLab {
    let image: GuestImage
    let accelerator: Accelerator
    let directory: String
    let ctx: RunContext
    let bootTimeoutS: Double
    private(set) var guests: [Guests.Guest] = []

    init(ctx: RunContext, kernel: String, bootTimeoutS: Double) throws {
        self.ctx = ctx
        self.bootTimeoutS = bootTimeoutS
        directory = try RunDirectory.make()
        let cache = "\(SettingsGuard.defaultStateDirectory)/guests"
        try Self.makeDirectory(cache)
        image = try GuestImage.build(directory: cache, kernel: kernel.isEmpty ? nil : kernel)
        let (a, why) = Guests.Guest.probeAccelerator(image: image, directory: directory)
        accelerator = a
        ctx.note("accelerator: \(a.rawValue)\(why.map { " — \($0)" } ?? ""); guest kernel \(image.kernelRelease) (\(image.kernel))")
        ctx.record("accelerator_kvm", a == .kvm ? 1 : 0, .count, better: .none)
    }

    static func makeDirectory(_ path: String) throws {
        var st = stat()
        if stat(path, &st) == 0 { return }
        let parent = (path as NSString).deletingLastPathComponent
        if stat(parent, &st) != 0 { try makeDirectory(parent) }
        if mkdir(path, 0o700) != 0 && errno != EEXIST { throw SystemError.current("mkdir", path: path) }
    }

    /// Boots a guest; its console is kept (copied next to the image cache at the end) and
    /// named in the result.
    func boot(_ config: GuestConfig, waitForAgent: Bool = true) throws -> Guests.Guest {
        let g = try Guests.Guest(image: image, config: config, accelerator: accelerator, directory: directory,
                          timeoutS: bootTimeoutS, waitForAgent: waitForAgent)
        guests.append(g)
        return g
    }

    func agent(_ g: Guests.Guest) throws -> GuestAgent { try g.requireAgent() }

    /// Stops every guest and keeps each console under the state directory (the newest 64),
    /// named in the result's notes.
    func stopAll() {
        let keep = "\(SettingsGuard.defaultStateDirectory)/guests/consoles"
        try? Self.makeDirectory(keep)
        var kept: [String] = []
        for (i, g) in guests.enumerated() {
            g.stop()
            let name = "\(keep)/\(ctx.variant)-\(Int(Date().timeIntervalSince1970))-\(getpid())-\(i).log"
            if let data = FileManager.default.contents(atPath: g.consolePath), (try? data.write(to: URL(fileURLWithPath: name))) != nil {
                kept.append(name)
            }
        }
        guests = []
        if !kept.isEmpty { ctx.note("guest consoles: \(kept.joined(separator: ", "))") }
        let all = ProcFile.list(keep).filter { $0.hasSuffix(".log") }.sorted { a, b in
            var sa = stat(), sb = stat()
            stat("\(keep)/\(a)", &sa); stat("\(keep)/\(b)", &sb)
            return sa.st_mtim.tv_sec < sb.st_mtim.tv_sec
        }
        for old in all.dropLast(64) { unlink("\(keep)/\(old)") }
    }

    /// Records boot_time (and the guest's own uptime at agent ready) for guests that booted.
    func recordBoot(_ gs: [Guests.Guest]) {
        let boots = gs.compactMap(\.bootTimeS)
        guard !boots.isEmpty else { return }
        ctx.record("boot_time", boots.reduce(0, +) / Double(boots.count), .s, better: .lower)
        let up = gs.compactMap(\.guestUptimeS)
        if !up.isEmpty { ctx.record("guest_uptime_at_ready", up.reduce(0, +) / Double(up.count), .s, better: .lower) }
        if accelerator == .tcg { ctx.note("boot_time is under TCG (emulated vCPUs): compare it only with other TCG runs") }
    }
}
