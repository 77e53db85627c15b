#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Foundation
import Guests
import LabKit
import LinuxMM
import Scenarios

/// `memlab _guest-run --job DIR`: the memlab inside a `--guest` guest (GuestRunner). It runs
/// the job's runs with its own Runner and settings guard — the guest kernel's knobs borrowed
/// and restored exactly as a host run does — and writes the guest's facts and each run's
/// result into the job directory as it ends, saying its progress on the console.
struct GuestRunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "_guest-run", abstract: "Run a job inside a memlab guest (started by the guest's init).", shouldDisplay: false)

    @Option(help: "The job directory (shared with the host).")
    var job: String

    func run() throws {
        guard let data = GuestJob.read(job, GuestJob.jobFile, limit: 16 << 20),
              let spec = try? JSONDecoder().decode(GuestJob.self, from: data), spec.version == GuestJob.version else {
            throw UsageError("\(job)/\(GuestJob.jobFile): not a memlab guest job of version \(GuestJob.version)")
        }
        let host = ResultDocument.Host.current()
        try AtomicFile.write(Array(try JSONEncoder().encode(host)), to: "\(job)/\(GuestJob.hostFile)")

        let g = SettingsGuard()
        if let status = Session.takeLock(g, wait: true) { throw ExitCode(status) }
        SignalCleanup.shared.install(settingsGuard: g)
        defer { g.releaseLock() }
        var current = 0
        let runner = try Runner(settingsGuard: g, registry: allScenarios, progress: { label in
            print("memlab-guest: progress \(current) \(label)")
            fflush(nil)
        })
        for (i, request) in spec.requests(registry: allScenarios).enumerated() {
            current = i
            let result: RunResult
            switch request {
            case .success(let r): result = runner.execute(r)
            case .failure(let e):
                let r = spec.runs[i]
                result = RunResult(scenario: r.scenario, variant: r.variant, params: r.params, placement: r.placement, status: .failed,
                                   reason: e.message, settings: SettingsRecord(), repetitions: 0, warmup: r.warmup)
            }
            do { try AtomicFile.write(Array(try JSONEncoder().encode(result)), to: "\(job)/\(GuestJob.runFile(i))") } catch {
                writeStderr("memlab _guest-run: cannot write the result of run \(i): \(error)\n")
            }
        }
    }
}
