#if canImport(Glibc)
import Glibc
#endif
import Foundation
import LinuxMM
import Synchronization

/// Records chosen counters as time series at a fixed interval, on its own OS thread.
/// Storage is allocated up front and each read is a pread into a fixed buffer (CounterFile),
/// so the sampler does not allocate while it runs; ticks are absolute (no drift).
public final class Sampler: @unchecked Sendable {
    // @unchecked: the buffers are written by the sampling thread only, below `count`, and
    // read by the owner after `stop` has joined it; `startNS` is set before the thread starts.
    public struct Probe {
        public let name: String
        public let unit: MetricUnit
        public let file: CounterFile
        public init(_ name: String, _ unit: MetricUnit, _ file: CounterFile) {
            self.name = name
            self.unit = unit
            self.file = file
        }
    }

    public let intervalNS: UInt64
    private let probes: [Probe]
    private let capacity: Int
    private let times: UnsafeMutableBufferPointer<Double>
    private let values: UnsafeMutableBufferPointer<Double>
    private let count = Atomic<Int>(0)
    private let stopFlag = Atomic<Bool>(false)
    private let thread = Lock<OSThread?>(nil)
    private var startNS: UInt64 = 0

    public init(interval seconds: Double, capacity: Int = 100_000, probes: [Probe]) {
        self.intervalNS = UInt64(max(seconds, 0.0005) * 1e9)
        self.probes = probes
        self.capacity = capacity
        self.times = .allocate(capacity: capacity)
        self.values = .allocate(capacity: capacity * max(probes.count, 1))
    }

    deinit {
        times.deallocate()
        values.deallocate()
    }

    public func start() throws(SystemError) {
        startNS = Clock.nanoseconds()
        let t = try OSThread { [self] in self.loop() }
        thread.withLock { $0 = t }
    }

    private func loop() {
        var next = startNS
        while !stopFlag.load(ordering: .relaxed) {
            sampleOnce()
            next &+= intervalNS
            var ts = timespec(tv_sec: Int(next / 1_000_000_000), tv_nsec: Int(next % 1_000_000_000))
            while clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nil) == EINTR {}
        }
        sampleOnce()   // the state at stop
    }

    private func sampleOnce() {
        let i = count.load(ordering: .relaxed)
        guard i < capacity else { return }
        times[i] = Double(Clock.nanoseconds() &- startNS) / 1e9
        for (k, p) in probes.enumerated() {
            values[i * probes.count + k] = (try? p.file.read()).map(Double.init) ?? .nan
        }
        count.store(i + 1, ordering: .releasing)
    }

    /// Stops the thread and returns one series per probe.
    public func stop() -> [TimeSeries] {
        stopFlag.store(true, ordering: .relaxed)
        thread.withLock { $0 }?.join()
        let n = count.load(ordering: .acquiring)
        let t = Array(times[0..<n])
        return probes.enumerated().map { k, p in
            TimeSeries(name: p.name, unit: p.unit, intervalS: Double(intervalNS) / 1e9, t: t,
                       values: (0..<n).map { values[$0 * probes.count + k] })
        }
    }
}
