import Scenarios
import Testing

/// The guests' swap-in histogram: buckets cover every value, percentiles come back within
/// the promised ±6.25%.
@Suite struct SwapinHistogramTests {
    @Test func bucketsAreMonotoneAndMiddlesAreClose() {
        var last = -1
        for ns: UInt64 in [0, 1, 15, 16, 17, 31, 32, 100, 1000, 4567, 1_000_000, 123_456_789, 60_000_000_000] {
            let b = Guest.SwapinHistogram.bucket(ns)
            #expect(b >= last)
            last = b
            let mid = Guest.SwapinHistogram.value(ofBucket: b)
            #expect(abs(mid - Double(ns)) <= max(0.5, Double(ns) * 0.0625), "\(ns) -> bucket \(b) -> \(mid)")
        }
    }

    @Test func percentilesOfAKnownDistribution() {
        var counts = [UInt64](repeating: 0, count: Guest.SwapinHistogram.buckets)
        for v in 1...1000 { counts[Guest.SwapinHistogram.bucket(UInt64(v) * 1000)] += 1 }   // 1 µs … 1 ms, uniform
        let p50 = Guest.SwapinHistogram.percentile(counts, 50)!
        let p99 = Guest.SwapinHistogram.percentile(counts, 99)!
        #expect(abs(p50 - 500_000) <= 500_000 * 0.0625, "p50 \(p50)")
        #expect(abs(p99 - 990_000) <= 990_000 * 0.0625, "p99 \(p99)")
        #expect(Guest.SwapinHistogram.percentile([UInt64](repeating: 0, count: 4), 50) == nil)
    }
}
