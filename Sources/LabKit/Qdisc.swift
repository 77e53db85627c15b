#if canImport(Glibc)
import Glibc
#endif
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
