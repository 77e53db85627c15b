#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import Histogram
import LabKit
import LinuxMM
import Workloads
import Transfer
import Synchronization

/// `memlab bench`, fault section: memlab's fault engine against CLinuxMM's minimal C handler
/// (memlab_ref_fault_handler: one message per read, one UFFDIO_COPY per fault) in the same
/// wait mode, the same workload (WorkloadRun, sequential first touches), alternating rounds.
extension Bench {
    static func faultImage(pages: Int) throws -> (PageImage, AccessTraces) {
        let image = try PageImage(pages: pages, seed: 11, zeroRatio: 0)
        let traces = AccessTraces(pattern: .sequential, pages: pages, threads: 1, opsPerThread: pages,
                                  writeRatio: 0, zipfSkew: 1, seed: 11, image: image)
        return (image, traces)
    }

    static func medianNS(_ xs: [UInt64]) -> Double {
        var h = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        for v in xs { _ = h.record(max(v, 1)) }
        return Double(h.valueAtPercentile(50))
    }

    /// Median fault round trip (first touch → installed and woken) with memlab's engine.
    static func memlabRoundTrip(_ image: PageImage, _ traces: AccessTraces, wait: EngineConfig.WaitMode) throws -> Double {
        var c = EngineConfig()
        c.wait = wait
        let r = try performRestore(config: c, image: image, traces: traces, link: EmulatedLink(bytesPerSecond: 0, rttNS: 0, preempt: false),
                                   reapOrder: nil, deadlineS: 30)
        if let f = r.failed { throw ScenarioError.failed("bench (memlab handler): \(f)") }
        return medianNS(r.workload.firstTouchNS)
    }

    /// Faults resolved per second by memlab's engine: every operation of the sequential
    /// first-touch workload is one fault, so this is its measured rate (median of `rounds`),
    /// not a figure derived from the latency.
    static func memlabFaultRate(wait: EngineConfig.WaitMode, oneCPU: Bool = false, rounds: Int = 3) throws -> Double {
        let (image, traces) = try faultImage(pages: 4096)
                // One CPU: handler and workload threads (created below) inherit this thread's
        // affinity, so a fault is served without a cross-CPU wake-up.
        let saved = NUMA.currentAffinity()
        if oneCPU, let first = saved.first { try NUMA.setAffinity(cpus: [first]) }
        defer { if oneCPU { try? NUMA.setAffinity(cpus: saved) } }
        var rates: [Double] = []
        for _ in 0..<max(1, rounds) {
            var c = EngineConfig()
            c.wait = wait
            let r = try performRestore(config: c, image: image, traces: traces, link: EmulatedLink(bytesPerSecond: 0, rttNS: 0, preempt: false),
                                       reapOrder: nil, deadlineS: 30)
            if let f = r.failed { throw ScenarioError.failed("bench (fault rate): \(f)") }
            rates.append(r.workload.opsPerSecond)
        }
        return Statistics.median(rates)
    }

    /// The measured fault rate for the blocking and the busy-polling handler.
    public static func memlabFaultRates() -> [(wait: String, faultsPerSecond: Double)] {
        var out = [EngineConfig.WaitMode.blocking, .busy].compactMap { w in (try? memlabFaultRate(wait: w)).map { (w.rawValue, $0) } }
        if let r = try? memlabFaultRate(wait: .blocking, oneCPU: true) { out.append(("blocking on one CPU", r)) }
        return out
    }

    /// The same with the C reference handler on its own thread.
    static func cRoundTrip(_ image: PageImage, _ traces: AccessTraces, wait: EngineConfig.WaitMode) throws -> Double {
        let length = image.bytes
        let region = try AnonymousMapping(length: length, kind: .base)
        let doorbell = try AnonymousMapping(length: System.pageSize, kind: .base)
        let uffd = try Userfaultfd.Descriptor(nonBlocking: wait != .blocking)
        try uffd.register(region.base, length: length, mode: .missing)
        try uffd.register(doorbell.base, length: System.pageSize, mode: .missing)
        let mode: Int32 = wait == .blocking ? 0 : wait == .poll ? 1 : wait == .epoll ? 3 : 2
        let fd = uffd.fd
        let src = UInt(bitPattern: image.base), dst = UInt(bitPattern: region.base)
        let served = Lock<Int>(0)
        let handler = try OSThread {
            let n = memlab_ref_fault_handler(fd, UnsafeRawPointer(bitPattern: src), UnsafeMutableRawPointer(bitPattern: dst), length, mode)
            served.withLock { $0 = n }
        }
        let w = WorkloadRun(traces: traces, region: region.base, seed: image.seed)
        try w.start()
        w.release(at: Clock.nanoseconds())
        let out = w.join()
        memlab_ref_touch(doorbell.base, 1, System.pageSize) // through C: never optimized away
        handler.join()
        try uffd.unregister(region.base, length: length)
        try uffd.unregister(doorbell.base, length: System.pageSize)
        let n = served.withLock { $0 }
        if n < 0 { throw ScenarioError.failed("bench (C handler): \(SystemError(errno: Int32(-n), call: "memlab_ref_fault_handler"))") }
        if image.mismatches(region.base, include: { traces.touched[$0] != 0 }) != 0 { throw ScenarioError.failed("bench (C handler): contents differ") }
        return medianNS(out.firstTouchNS)
    }

    /// Bulk install of a whole image, ns per page: memlab's engine (REAP-style blocking
    /// prefetch: one run, batched UFFDIO_COPY with DONTWAKE) against C-speed 2M ioctls.
    static func memlabBulk(_ image: PageImage, _ traces: AccessTraces) throws -> Double {
        let order = (0..<image.pages).map { Int32($0) }
        let r = try performRestore(config: EngineConfig(), image: image, traces: traces, link: EmulatedLink(bytesPerSecond: 0, rttNS: 0, preempt: false),
                                   reapOrder: order, deadlineS: 30)
        if let f = r.failed { throw ScenarioError.failed("bench (bulk): \(f)") }
        guard let s = r.fullyInstalledS else { throw ScenarioError.failed("bench (bulk): not fully installed") }
        return s * 1e9 / Double(image.pages)
    }

    static func rawBulk(_ image: PageImage) throws -> Double {
        let length = image.bytes
        let d = try AnonymousMapping(length: length, kind: .base)
        let uffd = try Userfaultfd.Descriptor()
        try uffd.register(d.base, length: length, mode: .missing)
        let t0 = Clock.nanoseconds()
        var off = 0
        while off < length { try uffd.copy(to: d.base + off, from: image.base + off, length: min(2 << 20, length - off), dontWake: true); off += 2 << 20 }
        let ns = Double(Clock.nanoseconds() - t0)
        try uffd.unregister(d.base, length: length)
        return ns / Double(image.pages)
    }

    /// Rows: fault round trip per wait mode (memlab vs C), and bulk install.
    public static func faultRows(rounds: Int = 7, sizeMB: Int = 64) throws -> [Row] {
        guard Userfaultfd.probe().usable else { return [] }
        let (image, traces) = try faultImage(pages: 4096)
                var rows: [Row] = []
        for wait in EngineConfig.WaitMode.allCases {
            rows.append(try compare("fault round trip, \(wait.rawValue)", unit: "ns/fault", rounds: rounds,
                                    swift: { try memlabRoundTrip(image, traces, wait: wait) },
                                    c: { try cRoundTrip(image, traces, wait: wait) }))
        }
        let (big, bigTraces) = try faultImage(pages: (min(sizeMB, 256) << 20) / System.pageSize)
                prewarm(length: big.bytes, kind: .base)
        rows.append(try compare("bulk install, batched UFFDIO_COPY", unit: "ns/page", rounds: rounds,
                                swift: { try memlabBulk(big, bigTraces) }, c: { try rawBulk(big) }))
        return rows
    }

    /// stress-ng's userfaultfd stressor on this machine (faults/s), or why not.
    public static func stressNG(seconds: Int = 5, oneCPU: Bool = false) -> (faultsPerSecond: Double?, note: String) {
        let candidates = ["/usr/bin/stress-ng", "/usr/local/bin/stress-ng"]
        guard let exe = candidates.first(where: { access($0, X_OK) == 0 }) else {
            return (nil, "stress-ng not installed (apt-get install -y stress-ng): comparison skipped")
        }
        // In the run's own directory only: a fixed name in /tmp is one anybody can plant a
        // link at, and the spawn below opens it O_TRUNC as root.
        guard let dir = try? RunDirectory.make() else { return (nil, "no run directory for stress-ng's log: comparison skipped") }
        let log = "\(dir)/stressng-\(getpid()).log"
        defer { unlink(log) }
        do {
            let pin = oneCPU ? ["--taskset", "\(NUMA.currentAffinity().first ?? 0)"] : []
            let pid = try ChildProcess.spawn(exe, ["--userfaultfd", "1", "--timeout", "\(seconds)", "--metrics-brief"] + pin, outputPath: log)
            _ = ChildProcess.wait(pid, deadline: Double(seconds) + 30)
        } catch { return (nil, "stress-ng did not start: \(error)") }
        let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        // "stress-ng: metrc: [pid] userfaultfd  <ops> <real s> <usr> <sys> <ops/s real> <ops/s usr+sys>"
        for line in text.split(separator: "\n") where line.contains("userfaultfd") {
            let f = line.split(separator: " ").map(String.init)
            if let i = f.firstIndex(of: "userfaultfd"), f.count > i + 5, let rate = Double(f[i + 5]) { return (rate, "stress-ng --userfaultfd 1 --timeout \(seconds)\(oneCPU ? " (one CPU)" : ""): \(rate) bogo ops/s (one op = one fault resolved)") }
        }
        return (nil, "stress-ng ran but printed no userfaultfd metrics: \(text.suffix(300))")
    }
}
