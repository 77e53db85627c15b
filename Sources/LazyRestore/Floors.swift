#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import Histogram
import LabKit
import LinuxMM
import Workloads
import Transfer

/// One floor of this machine, measured in this run.
public struct Floor: Sendable {
    public let name: String
    public let value: Double
    public let unit: MetricUnit
    public let better: Better
    public let help: String
}

/// The floors a remote figure is read against (shared by `lazy-restore:floors` and
/// `memlab calibrate`): kernel first-touch fault, UFFDIO_COPY per page and in bulk, the local
/// fault round trip per wait mode, the loopback TCP round trip, and one page fetched from a
/// source process over a Unix socket and over TCP.
public enum Calibration {
    public static func measure(size requested: Int = 64 << 20, sources: Bool = true) throws -> (floors: [Floor], notes: [String]) {
        var out: [Floor] = []
        var notes: [String] = []
        func add(_ n: String, _ v: Double, _ u: MetricUnit, _ b: Better, _ h: String) { out.append(Floor(name: n, value: v, unit: u, better: b, help: h)) }
        let size = min(requested, 64 << 20)
        let pages = size / System.pageSize

        // 1. Kernel first-touch fault (anonymous, 4K), no userfaultfd.
        let (firstTouch, a) = try firstTouchNS(size: size)
        add("first_touch_fault", firstTouch, .ns, .lower, "kernel first-touch fault of a 4K anonymous page, no userfaultfd")

        // 2. UFFDIO_COPY per page and in bulk (2M per ioctl), no waiter.
        let (copyPage, src) = try copyPageNS(size: size)
        add("uffdio_copy_page", copyPage, .ns, .lower, "one UFFDIO_COPY of one 4K page (no waiter)")
        var t0 = Clock.nanoseconds()
        do {
            let uffd = try Userfaultfd.Descriptor()
            let d = try AnonymousMapping(length: size, kind: .base)
            try uffd.register(d.base, length: size, mode: .missing)
            let chunk = 2 << 20
            t0 = Clock.nanoseconds()
            var off = 0
            while off < size { try uffd.copy(to: d.base + off, from: src.base + off, length: min(chunk, size - off), dontWake: true); off += chunk }
            add("uffdio_copy_bulk", Double(size) / (Double(Clock.nanoseconds() - t0) / 1e9), .bytesPerSecond, .higher, "UFFDIO_COPY of 2M per ioctl into an empty registered region")
            try uffd.unregister(d.base, length: size)
        }

        // 3. The local fault round trip per wait mode: instant link, on demand, one thread.
        let image = try PageImage(pages: min(pages, 8192), seed: 3, zeroRatio: 0)
                let traces = AccessTraces(pattern: .sequential, pages: image.pages, threads: 1, opsPerThread: image.pages,
                                  writeRatio: 0, zipfSkew: 1, seed: 3, image: image)
                func roundTrip(_ c: EngineConfig, _ source: PageSource?, _ label: String) throws -> (Double, Double) {
            let r = try performRestore(config: c, image: image, traces: traces, link: EmulatedLink(bytesPerSecond: 0, rttNS: 0, preempt: false),
                                       reapOrder: nil, deadlineS: 30, source: source)
            if let f = r.failed { throw ScenarioError.failed("floor (\(label)): \(f)") }
            var h = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
            for v in r.workload.firstTouchNS { _ = h.record(max(v, 1)) }
            return (Double(h.valueAtPercentile(50)), Double(h.valueAtPercentile(99)))
        }
        for mode in EngineConfig.WaitMode.allCases {
            var c = EngineConfig()
            c.wait = mode
            let (p50, p99) = try roundTrip(c, nil, mode.rawValue)
            add("fault_round_trip_\(mode.rawValue)", p50, .ns, .lower, "median local fault round trip, handler waiting by \(mode.rawValue) (the workload's first touch → installed and woken)")
            add("fault_round_trip_\(mode.rawValue)_p99", p99, .ns, .lower, "its 99th percentile")
        }

        // 4. Loopback TCP round trip (8-byte ping-pong between two threads).
        if let rtt = loopbackTCPRoundTrip(rounds: 2000) {
            add("loopback_tcp_rtt", rtt, .ns, .lower, "median 8-byte ping-pong over loopback TCP (TCP_NODELAY)")
        } else {
            notes.append("loopback TCP round trip not measured: could not set up a loopback socket pair")
        }

        // 5. The fault round trip with a real source process (blocking wait, instant link).
        if sources {
            for kind in [PageSource.Kind.unix, .tcp] {
                do {
                    let s = try PageSource.process(kind: kind, image: image, channels: 2, tcpAddress: "127.0.0.1:0", timeoutS: 10, directory: "/tmp")
                    defer { s.stop() }
                    let (p50, _) = try roundTrip(EngineConfig(), s, kind.rawValue)
                    add("fault_round_trip_\(kind.rawValue)_source", p50, .ns, .lower, "median fault round trip with pages from a source process over \(kind == .unix ? "a Unix socket" : "loopback TCP") (blocking wait, no link model)")
                } catch {
                    notes.append("fault round trip with a \(kind.rawValue) source not measured: \(error)")
                }
            }
        }
        notes.append("on \(System.onlineCPUs) CPUs; a fault round trip includes a cross-CPU wake-up of the handler and of the faulting thread")
        notes.append("read a remote figure against fault_round_trip_<wait mode> (memory source, link none), against fault_round_trip_<unix|tcp>_source for a real source process with link none, and add the link's RTT and size ÷ bandwidth for an emulated link; bulk prefetch against uffdio_copy_bulk")
        withExtendedLifetime((a, src)) {}
        return (out, notes)
    }
}

extension Calibration {
    /// ns per first touch of a 4K anonymous page over `size` (pre-warmed); the mapping is
    /// returned so it outlives what else is measured in it.
    static func firstTouchNS(size: Int) throws -> (ns: Double, mapping: AnonymousMapping) {
        prewarm(length: size, kind: .base)
        let a = try AnonymousMapping(length: size, kind: .base)
        let t0 = Clock.nanoseconds()
        touchPages(a.base, length: size, stride: System.pageSize)
        return (Double(Clock.nanoseconds() - t0) / Double(size / System.pageSize), a)
    }

    /// ns per UFFDIO_COPY of one 4K page into an empty registered region (no waiter); also
    /// returns the filled source mapping for further copies.
    static func copyPageNS(size: Int) throws -> (ns: Double, source: AnonymousMapping) {
        let pages = size / System.pageSize
        let src = try AnonymousMapping(length: size, kind: .base)
        memset(src.base, 0x5A, size)
        let uffd = try Userfaultfd.Descriptor()
        let d = try AnonymousMapping(length: size, kind: .base)
        try uffd.register(d.base, length: size, mode: .missing)
        let t0 = Clock.nanoseconds()
        for i in 0..<pages { try uffd.copy(to: d.base + i * System.pageSize, from: src.base + i * System.pageSize, length: System.pageSize, dontWake: true) }
        let ns = Double(Clock.nanoseconds() - t0) / Double(pages)
        try uffd.unregister(d.base, length: size)
        return (ns, src)
    }

    /// The floors a restore's remote figures are read against, reduced to what fits inside
    /// one repetition (well under 0.3 s): first-touch fault and UFFDIO_COPY per page over 4M,
    /// the local fault round trip for `wait` over 1024 faults, and (`tcp`) the loopback TCP
    /// round trip over 200 pings. Names: `floor_*`, ns.
    static func quick(wait: EngineConfig.WaitMode, tcp: Bool) throws -> [Floor] {
        var out: [Floor] = []
        func add(_ n: String, _ v: Double, _ h: String) { out.append(Floor(name: n, value: v, unit: .ns, better: .none, help: h)) }
        let size = 4 << 20
        add("floor_first_touch", try firstTouchNS(size: size).ns, "kernel first-touch fault of a 4K anonymous page")
        add("floor_copy_page", try copyPageNS(size: size).ns, "one UFFDIO_COPY of one 4K page, no waiter")
        let image = try PageImage(pages: 1024, seed: 5, zeroRatio: 0)
                let traces = AccessTraces(pattern: .sequential, pages: image.pages, threads: 1, opsPerThread: image.pages,
                                  writeRatio: 0, zipfSkew: 1, seed: 5, image: image)
                var c = EngineConfig()
        c.wait = wait
        let r = try performRestore(config: c, image: image, traces: traces, link: EmulatedLink(bytesPerSecond: 0, rttNS: 0, preempt: false),
                                   reapOrder: nil, deadlineS: 10)
        if let f = r.failed { throw ScenarioError.failed("floor (fault round trip, \(wait.rawValue)): \(f)") }
        var h = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        for v in r.workload.firstTouchNS { _ = h.record(max(v, 1)) }
        add("floor_fault_round_trip", Double(h.valueAtPercentile(50)), "median local fault round trip with this run's wait mode (\(wait.rawValue)), memory source, no link")
        if tcp, let rtt = loopbackTCPRoundTrip(rounds: 200) {
            add("floor_loopback_tcp_rtt", rtt, "median 8-byte ping-pong over loopback TCP")
        }
        return out
    }
}

extension LazyRestoreScenario {
    /// The floors a remote figure is read against, measured in this run on this machine.
    func runFloors(_ ctx: RunContext, _ p: Values) throws {
        let (floors, notes) = try Calibration.measure(size: p.size)
        for f in floors { ctx.record(f.name, f.value, f.unit, better: f.better) }
        for n in notes { ctx.note(n) }
    }
}

/// Median round trip of `rounds` 8-byte messages over a loopback TCP connection (ns).
func loopbackTCPRoundTrip(rounds: Int) -> Double? {
    guard let listener = try? Listener.listen(.tcp(host: "127.0.0.1", port: 0), backlog: 1) else { return nil }
    guard let server = try? OSThread(body: {
        guard let c = try? listener.accept(timeoutS: 10) else { return }
        c.setNoDelay()
        var buf: UInt64 = 0
        for _ in 0..<rounds {
            if recv(c.fd, &buf, 8, Int32(MSG_WAITALL)) != 8 { break }
            if send(c.fd, &buf, 8, 0) != 8 { break }
        }
    }) else { return nil }
    defer { server.join() }
    guard let c = try? Socket.connect(.tcp(host: "127.0.0.1", port: listener.port), timeoutS: 10) else { return nil }
    c.setNoDelay()
    var samples: [UInt64] = []
    samples.reserveCapacity(rounds)
    var buf: UInt64 = 7
    for _ in 0..<rounds {
        let t = Clock.nanoseconds()
        if send(c.fd, &buf, 8, 0) != 8 || recv(c.fd, &buf, 8, Int32(MSG_WAITALL)) != 8 { break }
        samples.append(Clock.nanoseconds() - t)
    }
    c.close()
    guard !samples.isEmpty else { return nil }
    samples.sort()
    return Double(samples[samples.count / 2])
}
