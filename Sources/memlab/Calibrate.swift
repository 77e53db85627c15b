import ArgumentParser
import Foundation
import LabKit
import Scenarios
import LazyRestore
import Migration
import LinuxMM

/// `memlab calibrate`: this machine's floors for lazy restore, measured now, with the floor a
/// remote figure should be read against.
struct Calibrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "calibrate",
        abstract: "Measure this machine's floors for fault handling (first-touch fault, UFFDIO_COPY, fault round trip per wait mode, loopback TCP, source process) and migration's switch costs.",
        discussion: "The same measurements as `memlab run lazy-restore:floors`, printed as a table. Needs userfaultfd for kernel faults (root, or vm.unprivileged_userfaultfd=1).")

    @Option(help: "Region size in MiB for the first-touch and UFFDIO_COPY floors (at most 64).")
    var sizeMB = 64

    @Flag(help: "Skip the floors with a source process (Unix socket, TCP).")
    var noSources = false

    func run() throws {
        defer { RunDirectory.removeOwn() }
        guard (1...64).contains(sizeMB) else { throw UsageError("--size-mb must be 1...64") }
        let p = LazyRestore.LazyRestoreScenario().probe(variant: "floors")
        if case .unusable(let reason) = p {
            writeStderr("memlab calibrate: skipped: \(reason)\n")
            throw ExitCode(ExitStatus.skipped)
        }
        let (floors, notes) = try Calibration.measure(size: sizeMB << 20, sources: !noSources)
        print("memlab calibrate: this machine's floors, measured in this run")
        for f in floors {
            let value: String
            switch f.unit {
            case .bytesPerSecond: value = String(format: "%10.2f GB/s", f.value / 1e9)
            case .ns: value = f.value >= 10_000 ? String(format: "%10.1f µs  ", f.value / 1000) : String(format: "%10.0f ns  ", f.value)
            default: value = String(format: "%10.3f %@", f.value, f.unit.rawValue)
            }
            print(f.name.padding(toLength: 34, withPad: " ", startingAt: 0) + value + "  " + f.help)
        }
        for n in notes { print("note: \(n)") }
        // Migration's model: what the stop and the post-copy switch cost here beyond the link
        // (the same measurement each migration repetition makes with model_costs=measure).
        if WriteProtectTracking.probe().usable {
            let costs = try SwitchCosts.measure()
            print("migration: the stop and the switch to post-copy, beyond the link (predicted downtime adds these)")
            for (name, v, help) in costs.named {
                let value = v >= 1e-5 ? String(format: "%10.1f µs  ", v * 1e6) : String(format: "%10.1f ns  ", v * 1e9)
                print(name.padding(toLength: 34, withPad: " ", startingAt: 0) + value + "  " + help)
            }
        } else {
            print("migration switch costs skipped: asynchronous write-protect tracking is unusable here")
        }
    }
}
