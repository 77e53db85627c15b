#if canImport(Glibc)
import Glibc
#endif

/// CLOCK_MONOTONIC in nanoseconds: the one clock memlab times things with.
public enum Clock {
    @inline(__always)
    public static func nanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    @inline(__always)
    public static func seconds(since start: UInt64) -> Double {
        Double(nanoseconds() &- start) / 1e9
    }

    public static let ticksPerSecond: Int = { Int(sysconf(Int32(_SC_CLK_TCK))) }()

    /// Sleeps for `ns` nanoseconds (restarted on EINTR).
    public static func sleep(nanoseconds ns: UInt64) {
        var req = timespec(tv_sec: Int(ns / 1_000_000_000), tv_nsec: Int(ns % 1_000_000_000))
        var rem = timespec()
        while nanosleep(&req, &rem) != 0 && errno == EINTR { req = rem }
    }

    /// Sleeps until CLOCK_MONOTONIC reads `deadline` (ns); the last `spinNS` are spun, so a
    /// wait ends within about a microsecond of the deadline rather than a timer slack later.
    /// The emulated links' delays are real waits through this one function.
    public static func sleep(until deadline: UInt64, spinNS spin: UInt64 = 50_000) {
        var now = nanoseconds()
        if deadline > now + spin {
            let target = deadline - spin
            var ts = timespec(tv_sec: Int(target / 1_000_000_000), tv_nsec: Int(target % 1_000_000_000))
            while clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nil) == EINTR {}
            now = nanoseconds()
        }
        while now < deadline { now = nanoseconds() }
    }
}
