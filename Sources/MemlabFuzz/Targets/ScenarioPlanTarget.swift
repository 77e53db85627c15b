import LabKit
import Scenarios

/// A command line and a scenario file as `memlab run` plans them: `ScenarioFile.parse(bytes:)`
/// (TOML, NUL and UTF-8 checks), then `RunPlan.make` — `--set` parsing, sweep syntax and
/// expansion, every parameter checked against its scenario, `--cpus`/`--node`/`--repeat`/
/// `--warmup` — exactly the code the CLI runs, with the real registry of scenarios.
///
/// Input: the scenario file's bytes, then optionally a line `---` and command-line lines:
/// `target=NAME[:VARIANT]`, `cpus=LIST`, `node=N`, `repeat=N`, `warmup=N`, and anything else
/// as one `--set` argument. Accepted: a plan was made.
extension FuzzTarget {
    static let scenarioPlan = FuzzTarget(name: "toml", maxLen: 1 << 14,
                                         summary: "scenario file + --set + sweeps: ScenarioFile.parse + RunPlan.make") { data in
        let bytes = Array(data)
        var file = bytes
        var lines: [String] = []
        let marker = Array("\n---\n".utf8)
        if let at = firstIndex(of: marker, in: bytes) {
            file = Array(bytes[..<at])
            lines = String(decoding: bytes[(at + marker.count)...], as: UTF8.self).split(separator: "\n").map(String.init)
        }
        var o = RunPlan.Options(targets: ["fuzz.toml"])
        for l in lines.prefix(64) {
            if l.hasPrefix("target=") { o.targets.append(String(l.dropFirst(7))) }
            else if l.hasPrefix("cpus=") { o.cpus = String(l.dropFirst(5)) }
            else if l.hasPrefix("node="), let n = Int(l.dropFirst(5)) { o.node = n }
            else if l.hasPrefix("repeat="), let n = Int(l.dropFirst(7)) { o.repeats = n }
            else if l.hasPrefix("warmup="), let n = Int(l.dropFirst(7)) { o.warmup = n }
            else { o.sets.append(l) }
        }
        do {
            let plan = try RunPlan.make(o, registry: allScenarios, loadFile: { (name) throws(UsageError) in
                try ScenarioFile.parse(bytes: file, name: name)
            })
            // What a plan promises the runner.
            fuzzInvariant(!plan.isEmpty && plan.count <= Sweep.maxPoints, "\(plan.count) runs planned")
            for r in plan {
                fuzzInvariant((1...1000).contains(r.repetitions) && (0...100).contains(r.warmup), "repetitions \(r.repetitions), warmup \(r.warmup)")
                for p in r.scenario.parameters { fuzzInvariant(r.params[p.name] != nil, "\(r.scenario.id): \(p.name) unresolved") }
                if let s = r.sweep {
                    fuzzInvariant(!s.parameters.isEmpty && s.point >= 1 && s.point <= s.points, "sweep point \(s.point)/\(s.points)")
                }
            }
            return true
        } catch {
            _ = "\(error)"
            return false
        }
    }

    static func firstIndex(of needle: [UInt8], in hay: [UInt8]) -> Int? {
        guard needle.count <= hay.count else { return nil }
        for i in 0...(hay.count - needle.count) where hay[i] == needle[0] && Array(hay[i..<(i + needle.count)]) == needle { return i }
        return nil
    }
}
