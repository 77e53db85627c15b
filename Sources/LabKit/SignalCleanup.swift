#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import Foundation
import LinuxMM
import Synchronization

/// On SIGINT, SIGTERM or SIGHUP: kill the running child, give back every borrowed setting,
/// say so, and exit 128+signal. A C handler only writes the signal number to a pipe; a
/// dedicated thread reads it and does the work, so it may take locks and do I/O. (The
/// handler is installed with sigaction, so it works even when the shell started memlab with
/// SIGINT ignored, as non-interactive shells do for background jobs.)
public final class SignalCleanup: Sendable {
    public static let shared = SignalCleanup()

    private let child = Atomic<Int32>(0)
    private let guardRef = Mutex<SettingsGuard?>(nil)
    private let installed = Atomic<Bool>(false)

    public func install(settingsGuard: SettingsGuard) {
        guardRef.withLock { $0 = settingsGuard }
        guard !installed.exchange(true, ordering: .sequentiallyConsistent) else { return }
        var fds: [Int32] = [-1, -1]
        guard memlab_pipe2(&fds, O_CLOEXEC) == 0 else {
            writeStderr("memlab: warning: no signal pipe (\(SystemError.current("pipe2"))); Ctrl-C will not restore settings until the next memlab start\n")
            return
        }
        let readFD = fds[0]
        let thread = Thread { [self] in
            var b: UInt8 = 0
            while true {
                let n = read(readFD, &b, 1)
                if n == 1 { self.handle(Int32(b)) }
                if n < 0 && errno != EINTR { return }
            }
        }
        thread.name = "memlab-signals"
        thread.start()
        let signals: [Int32] = [SIGINT, SIGTERM, SIGHUP]
        _ = signals.withUnsafeBufferPointer { memlab_install_signal_pipe(fds[1], $0.baseAddress, Int32($0.count)) }
    }

    public func setChild(_ pid: pid_t) { child.store(pid, ordering: .sequentiallyConsistent) }

    private func handle(_ sig: Int32) {
        let pid = child.load(ordering: .sequentiallyConsistent)
        if pid > 0 {
            kill(pid, SIGKILL)
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        }
        let name = sig == SIGINT ? "SIGINT" : sig == SIGTERM ? "SIGTERM" : "SIGHUP"
        var message = "\nmemlab: interrupted by \(name)"
        if let g = guardRef.withLock({ $0 }) {
            // The run's own thread may have seen its child die (killed just now) and restored
            // first; then its report is the one to show.
            var report = g.restoreAll()
            if report.restoredLines.isEmpty && report.failures.isEmpty, let earlier = g.lastRestoreReport { report = earlier }
            g.releaseLock()
            if !report.restoredLines.isEmpty {
                message += "; settings restored:\n" + report.restoredLines.map { "  \($0)" }.joined(separator: "\n")
            } else {
                message += "; no setting was borrowed at that moment (journal \(g.journalPath))"
            }
            if !report.failures.isEmpty {
                message += "\nmemlab: could NOT restore:\n" + report.failures.map { "  \($0)" }.joined(separator: "\n")
                    + "\nrun `memlab restore` as root"
            }
        }
        writeStderr(message + "\n")
        _exit(128 + sig)
    }
}
