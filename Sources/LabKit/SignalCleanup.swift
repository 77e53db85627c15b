#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import LinuxMM
import Synchronization

/// On SIGINT, SIGTERM or SIGHUP: kill the running child, give back every borrowed setting,
/// say so, and exit 128+signal. The handlers run on a dispatch queue, not in signal context,
/// so they may take locks and do I/O.
public final class SignalCleanup: Sendable {
    public static let shared = SignalCleanup()

    private let child = Atomic<Int32>(0)
    private let guardRef = Mutex<SettingsGuard?>(nil)
    private let sources = Mutex<[DispatchSourceSignal]>([])
    private let queue = DispatchQueue(label: "memlab.signals")

    public func install(settingsGuard: SettingsGuard) {
        guardRef.withLock { $0 = settingsGuard }
        sources.withLock { list in
            guard list.isEmpty else { return }
            for sig in [SIGINT, SIGTERM, SIGHUP] {
                signal(sig, SIG_IGN)
                let source = DispatchSource.makeSignalSource(signal: sig, queue: queue)
                source.setEventHandler { [self] in self.handle(sig) }
                source.resume()
                list.append(source)
            }
        }
    }

    public func setChild(_ pid: pid_t) { child.store(pid, ordering: .sequentiallyConsistent) }

    private func handle(_ sig: Int32) {
        let pid = child.load(ordering: .sequentiallyConsistent)
        if pid > 0 { kill(pid, SIGKILL) }
        let name = sig == SIGINT ? "SIGINT" : sig == SIGTERM ? "SIGTERM" : "SIGHUP"
        if let g = guardRef.withLock({ $0 }) {
            let report = g.restoreAll()
            g.releaseLock()
            var message = "\nmemlab: interrupted by \(name)"
            if !report.restoredLines.isEmpty {
                message += "; settings restored:\n" + report.restoredLines.map { "  \($0)" }.joined(separator: "\n")
            }
            if !report.failures.isEmpty {
                message += "\nmemlab: could NOT restore:\n" + report.failures.map { "  \($0)" }.joined(separator: "\n")
                    + "\nrun `memlab restore` as root"
            }
            writeStderr(message + "\n")
        }
        _exit(128 + sig)
    }
}
