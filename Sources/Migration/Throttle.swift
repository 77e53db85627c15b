/// Convergence by throttling: slowing the guest so pre-copy can catch up. Both remedies are
/// QEMU's, engaged by QEMU's trigger (migration/ram.c, migration_trigger_throttle): after a
/// sync period whose dirtied bytes exceed `triggerPercent` % of the bytes sent in it, for the
/// second time, the guest is throttled down. memlab's period is a round (each round ends with
/// a sync); QEMU's is its bitmap sync period (about a second), which is a round when rounds
/// are long.
public struct ThrottlePolicy: Sendable, Equatable {
    public enum Mode: String, CaseIterable, Sendable {
        case none
        /// cpu-throttle: the vCPUs sleep `pct / (100 − pct)` of every 10 ms timeslice; the
        /// percentage starts at `initial` and rises by `increment` each time the trigger fires,
        /// up to `max` (QEMU: cpu-throttle-initial 20, cpu-throttle-increment 10, max-cpu-throttle 99).
        case autoConverge = "auto-converge"
        /// dirty-limit: each vCPU's dirty-page rate is held under `dirtyLimitPagesPerSecond`
        /// once the trigger fires (QEMU 8.1's dirty-limit capability, vcpu-dirty-limit, where KVM's
        /// dirty ring measures it; here the workload's own write pacing enforces it).
        case dirtyLimit = "dirty-limit"
    }
    public var mode: Mode
    public var initial: Int
    public var increment: Int
    public var max: Int
    public var triggerPercent: Int
    public var dirtyLimitPagesPerSecond: Double

    public init(mode: Mode, initial: Int = 20, increment: Int = 10, max: Int = 99, triggerPercent: Int = 50,
                dirtyLimitPagesPerSecond: Double = 256) {
        self.mode = mode
        self.initial = initial
        self.increment = increment
        self.max = max
        self.triggerPercent = triggerPercent
        self.dirtyLimitPagesPerSecond = dirtyLimitPagesPerSecond
    }
    public static let none = ThrottlePolicy(mode: .none)
}

/// The trigger and the throttle's state across rounds, applied to a `DirtyWorkload`.
public struct ThrottleController {
    public let policy: ThrottlePolicy
    private var highPeriods = 0
    /// The throttle in force (auto-converge), percent.
    public private(set) var percent = 0
    /// Whether the dirty limit is in force.
    public private(set) var limited = false
    /// Seconds since the migration started when the throttle first engaged.
    public private(set) var engagedAt: Double?
    public private(set) var triggers = 0

    public init(_ policy: ThrottlePolicy) { self.policy = policy }

    /// After a round: `sent` bytes went over the link while `dirtied` bytes were written.
    public mutating func afterRound(sent: Int, dirtied: Int, at t: Double, workload: DirtyWorkload) {
        guard policy.mode != .none else { return }
        // QEMU: bytes_dirty_period > bytes_xfer_period × threshold / 100, and ++count ≥ 2.
        let threshold = Double(sent) * Double(policy.triggerPercent) / 100
        guard Double(dirtied) > threshold else { return }
        highPeriods += 1
        guard highPeriods >= 2 else { return }
        highPeriods = 0
        triggers += 1
        if engagedAt == nil { engagedAt = t }
        switch policy.mode {
        case .none: break
        case .autoConverge:
            percent = percent == 0 ? policy.initial : Swift.min(percent + policy.increment, policy.max)
            workload.setThrottle(percent: percent)
        case .dirtyLimit:
            if !limited {
                limited = true
                workload.setDirtyLimit(pagesPerSecond: policy.dirtyLimitPagesPerSecond)
            }
        }
    }
}
