import Foundation
import Guests
import LabKit
import Scenarios

/// What comes back from a `--guest` guest (GuestRunner), all untrusted: the first byte picks
/// the input — 0: a run's result file (decoded, validated, matched against the run asked
/// for); 1: console bytes (cut into bounded lines, each read as a host event); 2: a `--guest`
/// spec as a user types it. Accepted: a result for the run asked for, a console that said
/// something to the host, a spec that parsed.
extension FuzzTarget {
    static let guestrun = FuzzTarget(name: "guestrun", maxLen: 1 << 16, summary: "a guest's run results and console lines; --guest specs") { data in
        var f = FuzzBytes(data)
        let mode = f.u8() % 3
        let rest = Data(f.rest())
        switch mode {
        case 0:
            guard let request = guestFuzzRequest else { return false }
            let r = GuestRunner.decode(rest, for: request)
            fuzzInvariant(r.scenario == request.scenario.id && r.variant == request.variant, "a decoded result names another run")
            return r.status == .ok
        case 1:
            var follower = ConsoleFollower(path: "")
            let lines = follower.feed(rest)
            fuzzInvariant(lines.allSatisfy { $0.utf8.count <= 4096 * 4 }, "a console line over the bound")
            for l in lines { if let p = GuestRunner.panicLine(l) { fuzzInvariant(p.unicodeScalars.count <= 161 && p.unicodeScalars.allSatisfy { ($0.value >= 0x20 && $0.value < 0x7f) || $0 == "…" }, "a panic line over the bound or not printable") } }
            return lines.contains { GuestRunner.event($0) != nil }
        default:
            do throws(UsageError) {
                let s = try GuestSpec.parse(String(decoding: rest, as: UTF8.self))
                fuzzInvariant(s.isHost || (GuestSpec.memoryRangeMiB.contains(s.memoryMiB) && GuestSpec.cpuRange.contains(s.cpus)
                                           && GuestSpec.nodeRange.contains(s.numaNodes)), "a spec out of range was accepted")
                fuzzInvariant(s.append.utf8.count <= GuestSpec.maxAppendBytes && s.append.utf8.allSatisfy { $0 >= 0x20 && $0 < 0x7f },
                              "kernel parameters a command line cannot take were accepted")
                if !s.isHost { _ = (0..<s.numaNodes).map(s.nodeMiB) }
                return true
            } catch { return false }
        }
    }
}

let guestFuzzRequest: RunRequest? = try? RunPlan.make(.init(targets: ["selftest:ok"]), registry: allScenarios).first
