#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LinuxMM

/// Traffic-control queueing disciplines a migration test can shape a link with. Probed by
/// trying: `tc qdisc add` on the loopback device of a throwaway network namespace
/// (`unshare -n`, gone when the command exits), since a kernel without a qdisc module only
/// says so when asked to create one.
public enum Qdisc {
    public struct Probe: Sendable {
        public let name: String
        public let usable: Bool
        public let reason: String?
    }

    /// The qdiscs memlab uses: tbf and htb shape bandwidth, netem adds delay.
    public static let candidates: [(String, String)] = [
        ("tbf", "tbf rate 10mbit burst 32kbit latency 50ms"),
        ("htb", "htb default 1"),
        ("netem", "netem delay 1ms"),
    ]

    public static func probeAll() -> [Probe] {
        guard System.isRoot else {
            return candidates.map { Probe(name: $0.0, usable: false, reason: "trying a qdisc needs root (a network namespace)") }
        }
        let tools = ["/usr/bin/unshare", "/usr/sbin/ip", "/usr/sbin/tc"]
        if let missing = tools.first(where: { access($0, X_OK) != 0 }) {
            return candidates.map { Probe(name: $0.0, usable: false, reason: "\(missing) not found (util-linux / iproute2)") }
        }
        return candidates.map { name, spec in
            let script = "ip link set lo up && tc qdisc add dev lo root \(spec)"
            guard let pid = try? ChildProcess.spawn("/usr/bin/unshare", ["-n", "/bin/sh", "-c", script], outputPath: "/dev/null") else {
                return Probe(name: name, usable: false, reason: "could not start unshare")
            }
            switch ChildProcess.wait(pid, deadline: 10) {
            case .exited(0): return Probe(name: name, usable: true, reason: nil)
            case .exited: return Probe(name: name, usable: false, reason: "tc qdisc add \(name) fails: kernel built without sch_\(name)\(name == "netem" ? " (memlab's transport adds delay itself)" : "")")
            case .signaled(let s): return Probe(name: name, usable: false, reason: "probe killed by signal \(s)")
            case .timedOut: return Probe(name: name, usable: false, reason: "probe timed out")
            }
        }
    }
}

/// A real link inside one process: the calling thread moves into a new network namespace
/// (and so does everything it starts afterwards: threads, children, sockets), whose loopback
/// netem shapes — half the round trip each way (both directions pass lo's one qdisc) and the
/// bandwidth. The namespace belongs to the repetition's child and dies with it: nothing of the
/// machine's is changed, so nothing is borrowed.
public enum NetemLoopback {
    /// Why a netem loopback cannot be made here, or nil.
    public static var missing: String? {
        guard System.isRoot else { return "a network namespace needs root" }
        for t in ["/usr/sbin/ip", "/usr/sbin/tc", "/usr/bin/unshare"] where access(t, X_OK) != 0 { return "\(t) not found (iproute2 / util-linux)" }
        if let n = Qdisc.probeAll().first(where: { $0.name == "netem" }), !n.usable { return n.reason ?? "netem unusable" }
        return nil
    }

    public static func enter(rttMs: Double, bandwidthMbit: Double) throws(SystemError) {
        guard memlab_unshare_net() == 0 else { throw SystemError.current("unshare(CLONE_NEWNET)") }
        let oneWayUS = max(Int((rttMs * 500).rounded()), 0)
        let kbit = max(Int((bandwidthMbit * 1000).rounded()), 8)
        try run("/usr/sbin/ip", ["link", "set", "lo", "up"])
        try run("/usr/sbin/tc", ["qdisc", "add", "dev", "lo", "root", "netem", "delay", "\(oneWayUS)us", "rate", "\(kbit)kbit", "limit", "100000"])
    }

    private static func run(_ tool: String, _ args: [String]) throws(SystemError) {
        let pid: pid_t
        do { pid = try ChildProcess.spawn(tool, args, outputPath: "/dev/null") } catch { throw SystemError(errno: EIO, call: "start \(tool): \(error)") }
        let exit = ChildProcess.wait(pid, deadline: 10)
        guard exit == .exited(0) else { throw SystemError(errno: EIO, call: "\(tool) \(args.joined(separator: " ")) in the run's network namespace: \(exit)") }
    }
}
