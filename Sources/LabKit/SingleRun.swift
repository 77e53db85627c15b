/// A run measured outside the runner (one process did the work in place, as `memlab migrate`
/// does): one repetition's output summarised exactly as the runner summarises its children's,
/// so the document reads like any `memlab run` result (memlab.result/1).
extension RunResult {
    public static func single(scenario: String, variant: String, params: Params, output: RepetitionOutput,
                              durationS: Double, placement: Placement = Placement()) -> RunResult {
        var r = RunResult(scenario: scenario, variant: variant, params: params, placement: placement,
                          status: output.status, reason: output.reason, settings: SettingsRecord(),
                          repetitions: output.status == .ok ? 1 : 0, warmup: 0)
        r.notes = output.notes
        r.metrics = Runner.aggregate([output], notes: &r.notes)
        r.timeseries = output.timeseries.map { $0.finite() }
        r.checks = output.checks.filter { $0.expected.isFinite && $0.observed.isFinite }.map { var c = $0; c.repetition = 1; return c }
        let disagreements = Set(r.checks.filter { !$0.agrees }.map(\.name))
        if !disagreements.isEmpty {
            r.notes.append("the kernel's figures disagree with the expected ones for: \(disagreements.sorted().joined(separator: ", ")) (see checks)")
        }
        r.durationS = durationS
        return r
    }
}
