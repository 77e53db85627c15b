#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import Foundation
import LabKit
import LinuxMM

/// The progress line on a terminal: which run of how many, scenario and the point of a sweep,
/// the phase (setting up, warm-up or repetition i/n), time elapsed and an estimate of what is
/// left. Drawn on stderr, redrawn in place, only once the work has taken a second, and
/// never when stderr is not a terminal or with --quiet. It does not touch the results.
final class ProgressLine: @unchecked Sendable {
    // @unchecked: every var is read and written under `lock`.
    private let enabled: Bool
    private let lock = NSLock()
    private let started = Date()
    private let totalChildren: Int
    private let runCount: Int
    private var runIndex = 0
    private var what = ""
    private var phase = "starting"
    private var childrenStarted = 0
    private var childStartedAt: Date?
    private var finished = false
    private var drawn = false

    init(enabled: Bool, requests: [RunRequest]) {
        self.enabled = enabled
        self.runCount = requests.count
        self.totalChildren = requests.reduce(0) { $0 + $1.warmup + $1.repetitions }
        guard enabled else { return }
        // Redraws until finished; detached: a line that cannot be drawn is no reason to fail.
        try? OSThread { [weak self] in
            while let s = self, !s.isFinished {
                s.draw()
                usleep(250_000)
            }
        }.detach()
    }

    private var isFinished: Bool { lock.withLock { finished } }

    /// A run begins.
    func run(_ index: Int, _ r: RunRequest) {
        lock.withLock {
            runIndex = index + 1
            what = "\(r.scenario.id):\(r.variant)"
            if let sw = r.sweep {
                what += " " + sw.parameters.map { "\($0.parameter)=\(r.params[$0.parameter]?.description ?? "?")" }.joined(separator: " ")
                what += " (point \(sw.point)/\(sw.points))"
            }
            phase = "setting up"
        }
    }

    /// The runner's report: "ksm:merge repetition 2/3" as a child starts.
    func runner(_ line: String) {
        lock.withLock {
            childrenStarted += 1
            childStartedAt = Date()
            if let space = line.firstIndex(of: " ") { phase = String(line[line.index(after: space)...]) } else { phase = line }
        }
    }

    func finish() {
        lock.withLock {
            finished = true
            if enabled && drawn { writeStderr("\u{1B}[2K\r") }
        }
    }

    private func draw() {
        lock.withLock {
            guard enabled, !finished else { return }
            let elapsed = Date().timeIntervalSince(started)
            guard elapsed >= 1 else { return }
            var line = "memlab [\(runIndex)/\(runCount)] \(what) · \(phase) · \(Self.duration(elapsed))"
            let done = max(0, childrenStarted - 1)
            if done > 0, totalChildren > done {
                // Time per finished child so far, times the children still to come.
                let perChild = (childStartedAt ?? Date()).timeIntervalSince(started) / Double(done)
                let inCurrent = Date().timeIntervalSince(childStartedAt ?? Date())
                let left = max(0, perChild * Double(totalChildren - done) - inCurrent)
                line += " elapsed, ~\(Self.duration(left)) left"
            } else {
                line += " elapsed"
            }
            let width = Int(ProcessInfo.processInfo.environment["COLUMNS"] ?? "") ?? Self.terminalWidth()
            if line.count > width - 1 { line = String(line.prefix(max(20, width - 2))) + "…" }
            writeStderr("\u{1B}[2K\r" + line)
            drawn = true
        }
    }

    static func duration(_ s: Double) -> String {
        if s < 60 { return String(format: "%.1f s", s) }
        let m = Int(s) / 60
        return "\(m) min \(Int(s) % 60) s"
    }

    static func terminalWidth() -> Int {
        var ws = winsize()
        if memlab_ioctl_ptr(2, UInt(TIOCGWINSZ), &ws) == 0, ws.ws_col > 0 { return Int(ws.ws_col) }
        return 80
    }
}
