#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import Histogram
import LabKit
import LinuxMM

extension LazyRestoreScenario {
    /// The floors a remote figure is read against, measured in this run on this machine.
    func runFloors(_ ctx: RunContext) throws {
        let p = ctx.params
        let size = min(p.int("size"), 64 << 20)
        let pages = size / 4096

        // 1. Kernel first-touch fault (anonymous, 4K), no userfaultfd.
        prewarm(length: size, kind: .base)
        let a = try AnonymousMapping(length: size, kind: .base)
        var t0 = Clock.nanoseconds()
        touchPages(a.base, length: size, stride: 4096)
        ctx.record("first_touch_fault", Double(Clock.nanoseconds() - t0) / Double(pages), .ns, better: .lower)

        // 2. UFFDIO_COPY per page and in bulk (2M per ioctl), no waiter.
        let src = try AnonymousMapping(length: size, kind: .base)
        memset(src.base, 0x5A, size)
        do {
            let uffd = try Userfaultfd.Descriptor()
            let d = try AnonymousMapping(length: size, kind: .base)
            try uffd.register(d.base, length: size, mode: .missing)
            t0 = Clock.nanoseconds()
            for i in 0..<pages { try uffd.copy(to: d.base + i * 4096, from: src.base + i * 4096, length: 4096, dontWake: true) }
            ctx.record("uffdio_copy_page", Double(Clock.nanoseconds() - t0) / Double(pages), .ns, better: .lower)
            try uffd.unregister(d.base, length: size)
        }
        do {
            let uffd = try Userfaultfd.Descriptor()
            let d = try AnonymousMapping(length: size, kind: .base)
            try uffd.register(d.base, length: size, mode: .missing)
            let chunk = 2 << 20
            t0 = Clock.nanoseconds()
            var off = 0
            while off < size { try uffd.copy(to: d.base + off, from: src.base + off, length: min(chunk, size - off), dontWake: true); off += chunk }
            ctx.record("uffdio_copy_bulk", Double(size) / (Double(Clock.nanoseconds() - t0) / 1e9), .bytesPerSecond, better: .higher)
            try uffd.unregister(d.base, length: size)
        }

        // 3. The local fault round trip per wait mode: instant link, on demand, one thread.
        let image = try PageImage(pages: min(pages, 8192), seed: 3, zeroRatio: 0)
        defer { image.release() }
        let traces = AccessTraces(pattern: .sequential, pages: image.pages, threads: 1, opsPerThread: image.pages,
                                  writeRatio: 0, zipfSkew: 1, seed: 3, image: image)
        defer { traces.release() }
        for mode in [RestoreConfig.WaitMode.blocking, .poll, .busy] {
            var c = RestoreConfig()
            c.wait = mode
            let r = try performRestore(config: c, image: image, traces: traces, link: EmulatedLink(bytesPerSecond: 0, rttNS: 0, preempt: false),
                                       reapOrder: nil, deadlineS: 30)
            if let f = r.failed { throw ScenarioError.failed("floor (\(mode.rawValue)): \(f)") }
            var h = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
            for v in r.workload.firstTouchNS { _ = h.record(max(v, 1)) }
            ctx.record("fault_round_trip_\(mode.rawValue)", Double(h.valueAtPercentile(50)), .ns, better: .lower)
            ctx.record("fault_round_trip_\(mode.rawValue)_p99", Double(h.valueAtPercentile(99)), .ns, better: .lower)
        }

        // 4. Loopback TCP round trip (8-byte ping-pong between two threads).
        if let rtt = loopbackTCPRoundTrip(rounds: 2000) {
            ctx.record("loopback_tcp_rtt", rtt, .ns, better: .lower)
        } else {
            ctx.note("loopback TCP round trip not measured: could not set up a loopback socket pair")
        }
        ctx.note("on \(System.onlineCPUs) CPUs; a fault round trip includes a cross-CPU wake-up of the handler and of the faulting thread")
        withExtendedLifetime((a, src)) {}
    }
}

/// Median round trip of `rounds` 8-byte messages over a loopback TCP connection (ns).
func loopbackTCPRoundTrip(rounds: Int) -> Double? {
    let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard listener >= 0 else { return nil }
    defer { close(listener) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = 0
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    let ok = withUnsafeMutablePointer(to: &addr) { ap in
        ap.withMemoryRebound(to: sockaddr.self, capacity: 1) { sp in
            bind(listener, sp, len) == 0 && listen(listener, 1) == 0 && getsockname(listener, sp, &len) == 0
        }
    }
    guard ok else { return nil }
    let port = addr.sin_port
    let server = OSThread {
        let c = accept(listener, nil, nil)
        guard c >= 0 else { return }
        var one: Int32 = 1
        setsockopt(c, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(4))
        var buf: UInt64 = 0
        for _ in 0..<rounds {
            if recv(c, &buf, 8, Int32(MSG_WAITALL)) != 8 { break }
            if send(c, &buf, 8, 0) != 8 { break }
        }
        close(c)
    }
    let c = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard c >= 0 else { server.join(); return nil }
    defer { close(c) }
    var to = sockaddr_in()
    to.sin_family = sa_family_t(AF_INET)
    to.sin_addr.s_addr = inet_addr("127.0.0.1")
    to.sin_port = port
    let connected = withUnsafePointer(to: &to) { ap in
        ap.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(c, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
    }
    guard connected else { server.join(); return nil }
    var one: Int32 = 1
    setsockopt(c, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(4))
    var samples: [UInt64] = []
    samples.reserveCapacity(rounds)
    var buf: UInt64 = 7
    for _ in 0..<rounds {
        let t = Clock.nanoseconds()
        if send(c, &buf, 8, 0) != 8 || recv(c, &buf, 8, Int32(MSG_WAITALL)) != 8 { break }
        samples.append(Clock.nanoseconds() - t)
    }
    server.join()
    guard !samples.isEmpty else { return nil }
    samples.sort()
    return Double(samples[samples.count / 2])
}
