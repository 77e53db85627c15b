import LinuxMM
import Synchronization

/// The emulated link between source and destination: a bandwidth (the link is busy for
/// bytes ÷ bandwidth per transfer — a token bucket of depth zero), a round-trip time, and two
/// priorities. `schedule` answers when a transfer's last byte arrives; the caller really waits
/// until then. With `preempt` off, urgent pages (a thread is faulting) queue behind every bulk
/// byte already sent (one shared FIFO, like a single TCP stream); with it on, they go out
/// ahead of queued bulk data, which is pushed back (QEMU's postcopy-preempt channel).
public final class EmulatedLink: Sendable {
    public let bytesPerSecond: Double   // 0 = unlimited
    public let rttNS: UInt64
    public let preempt: Bool

    private struct State {
        var sharedBusy: UInt64 = 0   // FIFO: when the single queue drains
        var urgentBusy: UInt64 = 0   // preempt: when urgent transfers drain
        var bulkBusy: UInt64 = 0     // preempt: when bulk transfers drain
        var bytes: UInt64 = 0
        var transfers: UInt64 = 0
    }
    private let state = Lock(State())

    public init(bytesPerSecond: Double, rttNS: UInt64, preempt: Bool) {
        self.bytesPerSecond = bytesPerSecond
        self.rttNS = rttNS
        self.preempt = preempt
    }

    public var isInstant: Bool { bytesPerSecond == 0 && rttNS == 0 }

    @inline(__always)
    public func transmitNS(_ bytes: Int) -> UInt64 {
        bytesPerSecond > 0 ? UInt64(Double(bytes) * 1e9 / bytesPerSecond) : 0
    }

    /// Arrival time of `bytes` asked for at `now`. Urgent transfers are requests: half an RTT
    /// for the request to reach the source first. Bulk transfers are pushed unasked.
    @inline(__always)
    public func schedule(bytes: Int, urgent: Bool, now: UInt64) -> UInt64 {
        let half = rttNS / 2
        let tx = transmitNS(bytes)
        return state.withLock { s in
            s.bytes &+= UInt64(bytes)
            s.transfers &+= 1
            let ready = urgent ? now &+ half : now
            if !preempt {
                let start = max(ready, s.sharedBusy)
                s.sharedBusy = start &+ tx
                return s.sharedBusy &+ half
            }
            if urgent {
                let start = max(ready, s.urgentBusy)
                s.urgentBusy = start &+ tx
                // The bulk stream yields the link for this long.
                if s.bulkBusy > start { s.bulkBusy &+= tx }
                return s.urgentBusy &+ half
            }
            let start = max(ready, s.bulkBusy, s.urgentBusy)
            s.bulkBusy = start &+ tx
            return s.bulkBusy &+ half
        }
    }

    /// How far ahead of `now` the bulk queue is booked (ns): a pusher keeps this under its
    /// window so it never floods the link far beyond what a socket buffer would hold.
    @inline(__always)
    public func bulkBacklog(now: UInt64) -> UInt64 {
        state.withLock { s in
            let busy = preempt ? s.bulkBusy : s.sharedBusy
            return busy > now ? busy - now : 0
        }
    }

    public var bytesTransferred: UInt64 { state.withLock { $0.bytes } }
    public var transfers: UInt64 { state.withLock { $0.transfers } }
}
